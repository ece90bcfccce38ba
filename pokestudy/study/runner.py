"""Run a study: hand Ray Tune the trials Optuna does not yet hold, record every epoch.

Ray Tune schedules the trials (a local Ray by default, a cluster with `address`); a Tune
callback on the driver is the bridge to Optuna, so workers never open the storage. Resuming
needs no Ray state: Optuna's COMPLETE keys are the memory, and only missing keys are run.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from pokestudy import UserError
from pokestudy.data import Prepared, prepare
from pokestudy.study.spec import Study, Work, condition_id
from pokestudy.study.store import Store, finished_keys, grid_distributions, study_attrs
from pokestudy.study.store import storage as open_storage
from pokestudy.train import Diverged, TrialConfig, run_trial


def trainable(config: dict, data: Prepared) -> None:
    """Ray Tune function trainable: one trial, each epoch reported; a divergence is a result, not a crash."""
    import torch
    from ray import tune

    torch.set_num_threads(max(1, int(config["cpus"])))
    cfg = TrialConfig.from_dict(config["work"]["settings"])
    try:
        summary = run_trial(cfg, data, on_epoch=tune.report)
    except Diverged as e:
        tune.report({"diverged": str(e)})
        return
    tune.report({**summary["final"], "summary": summary})


class Progress:
    """One calm status line: done / running / failed / total, elapsed, ETA, best validation accuracy."""

    def __init__(self, total: int, already: int):
        self.total, self.already, self.done, self.failed, self.running = total, already, already, 0, 0
        self.start, self.best = time.monotonic(), 0.0
        self.tty = sys.stderr.isatty()

    def show(self, event: str = "") -> None:
        elapsed = time.monotonic() - self.start
        finished = self.done + self.failed - self.already
        left = self.total - self.done - self.failed
        eta = _clock(elapsed / finished * left) if finished else "--:--"
        line = (f"trials {self.done}/{self.total} done · {self.running} running · {self.failed} failed · "
                f"{_clock(elapsed)} elapsed · ETA {eta} · best val {self.best:.3f}")
        if self.tty:
            print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)
        elif event:
            print(f"{line}  ({event})", file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m:02d}:{s:02d}"


def _bridge(owner: dict[str, Store], distributions: dict, progress: Progress):
    """A Ray Tune callback that writes each trial's epochs and outcome to Optuna (driver side).

    `owner` maps a trial key to the store that keeps it: the study's own, or while tuning
    nuisance parameters, the condition's tuning study.
    """
    from ray.tune import Callback

    class Bridge(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            work = Work(**trial.config["work"])
            if work.key not in owner[work.key].open:  # tuning trials are opened by the searcher; retries keep theirs
                owner[work.key].start(work, distributions)
            self._show(trials)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            key = trial.config["work"]["key"]
            if "summary" in result:
                owner[key].complete(key, result["summary"])
                progress.done += 1
                progress.best = max(progress.best, result["summary"]["best"]["val_acc"])
                self._show(trials, f"done {key}")
            elif "diverged" in result:
                self._failed(trials, key, result["diverged"])
            elif "val_acc" in result:
                owner[key].epoch(key, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            key = trial.config["work"]["key"]
            if key in owner[key].open:  # stopped by the scheduler (ASHA) before its summary
                owner[key].prune(key)
                progress.done += 1
                self._show(trials, f"stopped early {key}")

        def on_trial_error(self, iteration, trials, trial, **info):
            key = trial.config["work"]["key"]
            if key in owner[key].open:
                self._failed(trials, key, _error_text(trial))

        def _failed(self, trials, key: str, error: str) -> None:
            owner[key].fail(key, error)
            progress.failed += 1
            self._show(trials, f"FAILED {key}: {error.strip().splitlines()[-1][:200]}")

        def _show(self, trials, event: str = "") -> None:
            progress.running = sum(t.status == "RUNNING" for t in trials)
            progress.show(event)

    return Bridge()


def _asker(slots: list[tuple[dict, Store]], spec: Study, owner: dict[str, Store], cpus: float):
    """A Ray Tune searcher that asks each condition's Optuna study (TPE) for its next nuisance values."""
    from optuna.distributions import FloatDistribution
    from ray.tune.search import Searcher

    space = {k: FloatDistribution(r.low, r.high, log=r.log) for k, r in spec.nuisance.params.items()}

    class AskOptuna(Searcher):
        def suggest(self, trial_id: str):
            if not slots:
                return Searcher.FINISHED
            condition, store = slots.pop(0)
            trial = store.study.ask(space)  # the condition's sampler (TPE) proposes the values
            seed = spec.seeds[0]
            work = Work(key=f"{condition_id(condition)}/tune={trial.number}", condition=condition, seed=seed,
                        settings={**spec.settings(condition, seed), **trial.params})
            store.adopt(work, trial)
            owner[work.key] = store
            return {"work": vars(work), "cpus": cpus}

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
            pass  # the Bridge callback records outcomes

    return AskOptuna(metric="val_acc", mode="max")


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        return Path(path).read_text()
    return str(getattr(trial, "error_msg", None) or "the trial's worker failed")


class Driver:
    """Everything one `pokestudy run` needs to hand trials to Ray Tune."""

    def __init__(self, spec: Study, prepared: Prepared, results: Path, address: str | None,
                 max_concurrent: int | None, gpus: float | None, verbose: bool):
        self.spec, self.prepared, self.results, self.address = spec, prepared, results, address
        self.max_concurrent, self.verbose = max_concurrent, verbose
        self.gpus = spec.resources.gpus if gpus is None else gpus

    def fit(self, owner: dict[str, Store], progress: Progress, name: str, *, works: list[Work] | None = None,
            searcher=None, samples: int = 1, distributions: dict | None = None) -> None:
        from ray import tune

        cpus = self.spec.resources.cpus
        scheduler = None
        if searcher is not None and self.spec.nuisance.asha_grace:
            # max_t one past the last epoch: ASHA stops a trial *at* max_t, which would cut off its summary.
            scheduler = tune.schedulers.ASHAScheduler(time_attr="epoch", max_t=int(self.spec.fixed.get("epochs", 20)) + 1,
                                                      grace_period=self.spec.nuisance.asha_grace)
        space = {"work": tune.grid_search([vars(w) for w in works]), "cpus": cpus} if works else {}
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(trainable, data=self.prepared), {"cpu": cpus, "gpu": self.gpus}),
            param_space=space,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=samples,
                                        metric="val_acc" if scheduler else None, mode="max" if scheduler else None,
                                        max_concurrent_trials=self.max_concurrent, reuse_actors=True,
                                        trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(
                name=f"{name}-{int(time.time())}", storage_path=str((self.results / ".ray").resolve()),
                verbose=2 if self.verbose else 0, callbacks=[_bridge(owner, distributions or {}, progress)],
                failure_config=tune.FailureConfig(max_failures=self.spec.resources.retries)),
        )
        tuner.fit()
        print(file=sys.stderr)

    def start_ray(self) -> None:
        _check_address(self.address)
        token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") \
            or (Path.home() / ".ray" / "auth_token").exists()
        if self.address and token:
            # `ray start` (Ray >= 2.59) enforces token auth, but a driver given an address sends
            # its token only when told to, and Ray reads this when it is first imported.
            os.environ.setdefault("RAY_AUTH_MODE", "token")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        import ray

        if ray.is_initialized():
            return
        try:
            ray.init(address=self.address or "local", include_dashboard=False, log_to_driver=self.verbose,
                     logging_level=logging.INFO if self.verbose else logging.ERROR)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"cannot connect to Ray at {self.address}: {str(e).splitlines()[0]}; "
                            "start one with `ray start --head` or omit --address") from None
        if not self.verbose:
            for logger in ("ray", "ray.tune", "ray.train", "ray.air"):  # failures reach the progress line instead
                logging.getLogger(logger).setLevel(logging.CRITICAL)


def run(spec: Study, *, storage: str, results: Path, study_name: str, data: str | None = None,
        address: str | None = None, max_concurrent: int | None = None, gpus_per_trial: float | None = None,
        verbose: bool = False) -> optuna.Study:
    """Run every trial of `spec` not yet COMPLETE in the storage; returns the Optuna study to report.

    Everything a user can get wrong (results folder, storage URL, data, Ray address) is checked
    before the first write to the storage.
    """
    _check_writable(results)
    open_storage(storage)
    lock = _lock(results, f"{storage}|{study_name}")
    try:
        prepared = prepare(data or spec.data.source, spec.data.res, spec.data.split_seed, spec.data.fractions)
        driver = Driver(spec, prepared, results, address, max_concurrent, gpus_per_trial, verbose)
        attrs = study_attrs(spec, prepared.manifest)
        tuned = _tune_nuisance(driver, storage, study_name, attrs) if spec.nuisance else None
        plan = spec.trials(tuned)
        done = finished_keys(storage, study_name)
        todo = [w for w in plan if w.key not in done]
        if not todo:
            print(f"study {study_name} is already finished ({len(plan)} trials); re-exporting its results",
                  file=sys.stderr)
            return optuna.load_study(study_name=study_name, storage=open_storage(storage))
        driver.start_ray()
        store = Store(storage, study_name, attrs)
        stale = store.fail_stale()
        note = f", {stale} interrupted trial(s) will rerun" if stale else ""
        print(f"study {study_name}: {len(plan)} trials, {len(plan) - len(todo)} already done{note}", file=sys.stderr)
        driver.fit({w.key: store for w in todo}, Progress(len(plan), len(plan) - len(todo)), study_name,
                   works=todo, distributions=grid_distributions(plan))
        return store.study
    finally:
        lock.close()


def _tune_nuisance(driver: Driver, storage: str, study_name: str, attrs: dict) -> dict[str, dict]:
    """Stage 1: per condition, `trials` Optuna trials (TPE or random) on validation accuracy.

    Each condition has its own Optuna study, `<study>.tune.<condition>`, so the sampler models
    one condition at a time. Returns each condition's best nuisance values for the seeded stage.
    """
    spec = driver.spec
    driver.start_ray()
    stores: dict[str, Store] = {}
    slots: list[tuple[int, dict, Store]] = []
    for condition in spec.conditions():
        cid = condition_id(condition)
        sampler = (optuna.samplers.TPESampler(n_startup_trials=max(2, spec.nuisance.trials // 2), seed=0)
                   if spec.nuisance.sampler == "tpe" else optuna.samplers.RandomSampler(seed=0))
        store = stores[cid] = Store(storage, f"{study_name}.tune.{cid}", attrs, sampler=sampler)
        store.fail_stale()
        used = [t for t in store.study.get_trials(deepcopy=False)
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or "error" in t.user_attrs]
        slots += [(i, condition, store) for i in range(spec.nuisance.trials - len(used))]
    slots.sort(key=lambda s: s[0])  # round-robin over conditions: each sampler learns as trials finish
    total = len(stores) * spec.nuisance.trials
    if slots:
        print(f"study {study_name}: tuning {', '.join(spec.nuisance.params)} with {spec.nuisance.trials} trials "
              f"per condition, {total - len(slots)} already done", file=sys.stderr)
        owner: dict[str, Store] = {}
        searcher = _asker([(c, s) for _, c, s in slots], spec, owner, spec.resources.cpus)
        driver.fit(owner, Progress(total, total - len(slots)), f"{study_name}-tune", searcher=searcher,
                   samples=len(slots))
    best = {}
    for cid, store in stores.items():
        try:
            best[cid] = store.study.best_trial.params
        except ValueError:
            raise UserError(f"no tuning trial of {cid} finished; `pokestudy dashboard` shows their errors") from None
    return best


def _lock(results: Path, study_key: str):
    """One driver per study: a second `pokestudy run` on the same study and storage refuses."""
    lock_dir = results / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    handle = open(lock_dir / f"{hashlib.sha256(study_key.encode()).hexdigest()[:16]}.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError("another `pokestudy run` is already running this study on this storage; "
                        "wait for it, or watch it with `pokestudy dashboard`") from None
    return handle


def _check_address(address: str | None) -> None:
    """Refuse at once when nothing listens at HOST:PORT (ray.init would retry for minutes)."""
    host, _, port = (address or "").rpartition(":")
    if not port.isdigit() or "://" in address:
        return  # "auto", "ray://…" and other forms: let Ray decide
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as e:
        raise UserError(f"no Ray cluster at {address} ({e.strerror or e}); start one with `ray start --head` "
                        "or omit --address to run on this machine") from None


def _check_writable(results: Path) -> None:
    try:
        results.mkdir(parents=True, exist_ok=True)
        probe = results / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"results directory {results} is not writable ({e.strerror}); "
                        "pass --results DIR with a writable folder") from None
