"""The Optuna side: studies written only by the driver.

Each trial becomes one Optuna trial: its factors' levels (and tuned nuisance values) as params,
validation accuracy per epoch as intermediate values, its `TrialRecord` as user attributes and
a trial note (per-epoch table) for optuna-dashboard. Fixed settings live in the study's
attributes, not as params, so the dashboard's importance ranks only what varies.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import optuna
import sqlalchemy.exc
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import TrialState, create_trial

from pokestudy import UserError
from pokestudy.study.record import StudyRecord, TrialRecord
from pokestudy.study.spec import Work, tuning_study

optuna.logging.set_verbosity(logging.WARNING)
OBJECTIVE = "val_acc (last epoch)"  # the study's value: validation accuracy of the model as trained
TrialFigure = Callable[[TrialRecord, Path], Path]  # draws a finished trial (the report layer passes one in)
SCHEMA_TRIES = 10  # openings of a new database while other processes create its schema


@functools.cache
def storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna RDB storage, one per URL and process (each opening checks the schema);
    SQLite waits for readers (the dashboard) instead of failing."""
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    attempt = 1
    while True:
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception as e:  # sqlalchemy raises many kinds; all mean "cannot use this URL"
            if attempt < SCHEMA_TRIES and _lost_schema_race(e):
                time.sleep(0.05 * attempt)
                attempt += 1
                continue
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot open storage {url!r}: {first}; "
                            "pass --storage sqlite:///PATH or postgresql://…") from None


def _lost_schema_race(e: Exception) -> bool:
    """Another process (a second `pokestudy run` started at the same moment) created a table or schema
    row of a new database between Optuna's check and its own CREATE/INSERT: opening again finds them.
    Optuna creates its tables without a lock, so both SQLite and PostgreSQL can lose this race."""
    return isinstance(e, sqlalchemy.exc.IntegrityError) or (
        isinstance(e, sqlalchemy.exc.DatabaseError) and "already exists" in str(e))


def check_writable(results: Path) -> None:
    """Refuse a results folder that cannot be written before anything is computed or stored."""
    try:
        results.mkdir(parents=True, exist_ok=True)
        probe = results / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"results directory {results} is not writable ({e.strerror}); "
                        "pass --results DIR with a writable folder") from None


def artifact_store(results: Path) -> FileSystemArtifactStore:
    """Figures and per-trial files for optuna-dashboard: one folder beside the default database."""
    path = results / ".artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))


def read_artifact(store: FileSystemArtifactStore, url: str, trial: optuna.trial.FrozenTrial, filename: str) -> bytes:
    """A file attached to a trial; KeyError when the trial has none of that name."""
    ids = {m.filename: m.artifact_id for m in get_all_artifact_meta(trial, storage=storage(url))}
    with store.open_reader(ids[filename]) as f:
        return f.read()


def find_study(url: str, name: str) -> optuna.Study | None:
    """The stored study of that name, or None; creates nothing."""
    try:
        return optuna.load_study(study_name=name, storage=storage(url))
    except KeyError:
        return None


def open_study(url: str, name: str) -> optuna.Study:
    study = find_study(url, name)
    if study is None:
        raise UserError(f"no study {name!r} in {url}; `pokestudy studies --storage {url}` lists them")
    return study


def finished(url: str, name: str, identity: str) -> dict[str, TrialRecord]:
    """The COMPLETE trials of a study that ran under `identity`, by key."""
    study = find_study(url, name)
    if study is None:
        return {}
    records = [TrialRecord.from_trial(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return {r.key: r for r in records if r.identity == identity}


def archive(url: str, name: str) -> str | None:
    """Keep a study and its tuning studies under new names, `NAME.archived-TIME…`, freeing NAME;
    returns the new name, or None when there was nothing to keep."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    names = [s.study_name for s in optuna.get_all_study_summaries(storage(url), include_best_trial=False)
             if s.study_name == name or s.study_name.startswith(tuning_study(name, ""))]
    for old in names:
        new = old.replace(name, f"{name}.archived-{stamp}", 1)
        optuna.copy_study(from_study_name=old, from_storage=storage(url), to_storage=storage(url), to_study_name=new)
        optuna.delete_study(study_name=old, storage=storage(url))
    return f"{name}.archived-{stamp}" if names else None


def grid_distributions(plan: list[Work], tuned: tuple[str, ...] = ()) -> dict[str, BaseDistribution]:
    """Optuna needs one distribution per param across a study: every value the plan gives it."""
    values: dict[str, list] = {}
    for work in plan:
        for k, v in params(work, tuned).items():
            values.setdefault(k, []).append(v)
    return {k: CategoricalDistribution(list(dict.fromkeys(v))) for k, v in values.items()}


def params(work: Work, tuned: tuple[str, ...] = ()) -> dict:
    """Params of a trial: the level of each factor, and the nuisance values tuned for its condition."""
    return {**work.condition, **{k: work.settings[k] for k in tuned}}


class Store:
    """One Optuna study, written by the driver: trials opened, epochs reported, records told."""

    def __init__(self, url: str, study_name: str, record: StudyRecord, artifacts: FileSystemArtifactStore,
                 sampler: optuna.samplers.BaseSampler | None = None, trial_figure: TrialFigure | None = None):
        self.storage, self.artifacts, self.trial_figure = storage(url), artifacts, trial_figure
        self.fixed = record.spec["fixed"]
        self.study = optuna.create_study(study_name=study_name, storage=self.storage, sampler=sampler,
                                         direction="maximize", load_if_exists=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study.set_metric_names([OBJECTIVE])
        # Optuna 5.0.0 has no public study id (Study._study_id is private); start and complete need it below
        self.study_id = self.storage.get_study_id_from_name(study_name)
        self.identity = record.identity["digest"]
        self.open: dict[str, optuna.Trial] = {}
        self.reported: dict[str, set[int]] = {}
        for key, value in record.attrs().items():
            self.study.set_user_attr(key, value)

    def fail_stale(self) -> int:
        """Trials left RUNNING by a driver that died are marked FAIL; their keys run again."""
        stale = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for t in stale:
            self.study.tell(t.number, state=TrialState.FAIL)
        return len(stale)

    def start(self, work: Work, distributions: dict[str, BaseDistribution], tuned: tuple[str, ...] = ()) -> None:
        """Create the RUNNING trial with its params and key in one write, so no half-made trial exists."""
        p = params(work, tuned)
        template = create_trial(state=TrialState.RUNNING, params=p, distributions={k: distributions[k] for k in p},
                                user_attrs=self._identity(work))
        # Optuna 5.0.0: no public call opens a RUNNING trial with params in one write (enqueue_trial + ask take several)
        self.open[work.key] = optuna.Trial(self.study, self.storage.create_new_trial(self.study_id, template))

    def adopt(self, work: Work, trial: optuna.Trial) -> None:
        for k, v in self._identity(work).items():
            trial.set_user_attr(k, v)
        self.open[work.key] = trial

    def _identity(self, work: Work) -> dict:
        """Shown while the trial runs (and kept if it fails): which trial this is."""
        return {"key": work.key, "identity": self.identity, "seed": work.seed, "split_seed": work.split_seed}

    def epoch(self, key: str, record: dict) -> None:
        """Validation accuracy at this epoch. A retried trial (its worker died) repeats epochs; the
        first attempt's values are kept for those, the retry's summary replaces the history."""
        step, reported = int(record["epoch"]), self.reported.setdefault(key, set())
        if step not in reported:
            self.open[key].report(record["val_acc"], step=step)
            reported.add(step)

    def complete(self, work: Work, summary: dict) -> TrialRecord:
        trial = self.open.pop(work.key)
        final = summary["final"]
        # per-epoch accuracies and gaps to 4 significant digits (finer than one image in 10,000): a small record
        history = {k: [float(f"{r[k]:.4g}") for r in summary["history"]] for k in final
                   if k.endswith(("_acc", "gap")) or k in ("lr", "train_acc_augmented", "train_eval_n")}
        record = TrialRecord(
            key=work.key, identity=self.identity, condition=work.condition, seed=work.seed, settings=work.settings,
            budget=work.budget, converged=summary["converged"], epochs=int(final["epoch"]),
            best_epoch=int(summary["best"]["epoch"]),
            seconds=final["seconds"], images_per_s=final["images_per_s"],
            final={k: v for k, v in final.items() if k not in ("epoch", "seconds", "images_per_s", "lr")},
            history=history, split_seed=work.split_seed,
            **summary.get("placement", {}))  # a trial's summary from outside Ray (the tests') has none
        # Optuna 5.0.0 has no Trial.set_system_attr; a user attr would put the record in every dashboard page load
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)
        self.storage.set_trial_system_attr(trial_id, TrialRecord.ATTR, record.attrs())
        for k, v in record.display().items():
            trial.set_user_attr(k, v)
        with tempfile.TemporaryDirectory() as tmp:
            predictions = Path(tmp) / "test_predictions.json"
            predictions.write_text(json.dumps(summary["test_predictions"]))
            self._attach(trial, predictions, "application/json")
            if self.trial_figure:
                self._attach(trial, self.trial_figure(record, Path(tmp) / "curves.png"), "image/png")
        self._note(trial, record)
        self.study.tell(trial, final["val_acc"])
        return record

    def _attach(self, trial: optuna.Trial, path: Path, mimetype: str) -> None:
        """Large per-trial data goes to the artifact store, not the user attributes that every
        dashboard page load carries (and only while the trial runs: Optuna freezes finished ones)."""
        upload_artifact(artifact_store=self.artifacts, file_path=str(path), study_or_trial=trial, mimetype=mimetype)

    def _note(self, trial: optuna.Trial, record: TrialRecord) -> None:
        """The trial's own page in optuna-dashboard (the report rewrites it in the current format)."""
        from optuna_dashboard import save_note

        save_note(trial, record.note(self.fixed))

    def fail(self, key: str, error: str) -> None:
        trial = self.open.pop(key)
        trial.set_user_attr("error", error[-2000:])
        self.study.tell(trial, state=TrialState.FAIL)

    def prune(self, key: str) -> None:
        """Stopped early by the scheduler (ASHA): its epochs stay, its value does not count."""
        self.study.tell(self.open.pop(key), state=TrialState.PRUNED)
