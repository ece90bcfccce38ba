"""The Optuna side: studies written only by the driver.

Each trial becomes one Optuna trial: the factors and settings as params, validation accuracy
per epoch as intermediate values, final and best-epoch metrics as user attributes. The trial
key (condition + seed, or condition + tuning number) is what makes a rerun resume instead of
repeat.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import TrialState, create_trial

from pokestudy import UserError
from pokestudy.study.spec import Study, Work, condition_id

optuna.logging.set_verbosity(logging.WARNING)
PACKAGES = ("pokestudy", "torch", "torchvision", "ray", "optuna", "optuna-dashboard")


@functools.cache
def storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna RDB storage, one per URL and process (each opening checks the schema);
    SQLite waits for readers (the dashboard) instead of failing."""
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as e:  # sqlalchemy raises many kinds; all mean "cannot use this URL"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot open storage {url!r}: {first}; pass --storage sqlite:///PATH or postgresql://…") from None


def open_study(url: str, name: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=storage(url))
    except KeyError:
        raise UserError(f"no study {name!r} in {url}; `pokestudy studies --storage {url}` lists them") from None


def finished_keys(url: str, name: str) -> set[str]:
    """Keys of the COMPLETE trials of a study, read without creating anything."""
    try:
        study = optuna.load_study(study_name=name, storage=storage(url))
    except KeyError:
        return set()
    return {t.user_attrs["key"] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "key" in t.user_attrs}


def study_attrs(spec: Study, manifest: dict) -> dict:
    """What a study's results depend on: the spec as loaded, the data, the package versions."""
    return {"spec": spec.model_dump(mode="json"), "spec_hash": spec.digest(), "data_manifest": manifest,
            "versions": {p: _version(p) for p in PACKAGES}}


def grid_distributions(plan: list[Work]) -> dict[str, BaseDistribution]:
    """Optuna needs one distribution per param across a study: every value the plan gives it."""
    values: dict[str, list] = {}
    for work in plan:
        for k, v in params(work).items():
            values.setdefault(k, []).append(v)
    return {k: CategoricalDistribution(list(dict.fromkeys(v))) for k, v in values.items()}


def params(work: Work) -> dict:
    """Params of a trial: every factor's level name and every setting it runs with (seed apart)."""
    return {**work.condition, **{k: v for k, v in work.settings.items() if k != "seed"}}


class Store:
    def __init__(self, url: str, study_name: str, attrs: dict,
                 sampler: optuna.samplers.BaseSampler | None = None):
        self.storage = storage(url)
        self.study = optuna.create_study(study_name=study_name, storage=self.storage, sampler=sampler,
                                         direction="maximize", load_if_exists=True)
        self.study_id = self.storage.get_study_id_from_name(study_name)
        self.open: dict[str, optuna.Trial] = {}
        self.reported: dict[str, set[int]] = {}
        for key, value in attrs.items():
            self.study.set_user_attr(key, value)

    def fail_stale(self) -> int:
        """Trials left RUNNING by a driver that died are marked FAIL; their keys run again."""
        stale = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for t in stale:
            self.study.tell(t.number, state=TrialState.FAIL)
        return len(stale)

    def start(self, work: Work, distributions: dict[str, BaseDistribution]) -> None:
        """Create the RUNNING trial with its params and key in one write, so no half-made trial exists."""
        p = params(work)
        template = create_trial(state=TrialState.RUNNING, params=p, distributions={k: distributions[k] for k in p},
                                user_attrs=_identity(work))
        self.open[work.key] = optuna.Trial(self.study, self.storage.create_new_trial(self.study_id, template))

    def adopt(self, work: Work, trial: optuna.Trial) -> None:
        for k, v in _identity(work).items():
            trial.set_user_attr(k, v)
        self.open[work.key] = trial

    def epoch(self, key: str, record: dict) -> None:
        """Validation accuracy at this epoch. A retried trial (its worker died) repeats epochs; the
        first attempt's values are kept for those, the retry's summary replaces the history."""
        step, reported = int(record["epoch"]), self.reported.setdefault(key, set())
        if step not in reported:
            self.open[key].report(record["val_acc"], step=step)
            reported.add(step)

    def complete(self, key: str, summary: dict) -> None:
        trial = self.open.pop(key)
        final, best = summary["final"], summary["best"]
        attrs = {k: v for k, v in final.items() if k.endswith(("_acc", "_gap", "_loss")) or k == "gap"}
        attrs.update({f"best_{k}": v for k, v in best.items() if k.endswith(("_acc", "gap"))})
        attrs.update(best_epoch=best["epoch"], epochs=final["epoch"], seconds=final["seconds"],
                     images_per_s=final["images_per_s"], test_predictions=summary["test_predictions"],
                     history={k: [r[k] for r in summary["history"]] for k in final if k.endswith("_acc")})
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        self.study.tell(trial, best["val_acc"])

    def fail(self, key: str, error: str) -> None:
        trial = self.open.pop(key)
        trial.set_user_attr("error", error[-2000:])
        self.study.tell(trial, state=TrialState.FAIL)

    def prune(self, key: str) -> None:
        """Stopped early by the scheduler (ASHA): its epochs stay, its value does not count."""
        self.study.tell(self.open.pop(key), state=TrialState.PRUNED)


def _identity(work: Work) -> dict:
    return {"key": work.key, "condition": condition_id(work.condition), "seed": work.seed}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
