"""Run a study: hand Ray Tune the trials Optuna does not yet hold as COMPLETE, record every epoch.

Ray Tune schedules the trials (a local Ray by default, a cluster with `address`); a Tune
callback on the driver is the bridge to Optuna, so workers never open the storage. Resuming
needs no Ray state: Optuna's COMPLETE keys are the memory, and only missing keys are run.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sys
import time
from pathlib import Path

from pokestudy import UserError
from pokestudy.data import Prepared, prepare
from pokestudy.study.spec import Study, Work
from pokestudy.study.store import Store
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


def _bridge(store: Store, progress: Progress):
    """A Ray Tune callback that writes each trial's epochs and outcome to Optuna (driver side)."""
    from ray.tune import Callback

    class Bridge(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            key = trial.config["work"]["key"]
            if key not in store.open:  # a retried trial keeps its Optuna trial
                store.start(Work(**trial.config["work"]))
            self._show(trials)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            key = trial.config["work"]["key"]
            if "summary" in result:
                store.complete(key, result["summary"])
                progress.done += 1
                progress.best = max(progress.best, result["summary"]["best"]["val_acc"])
                self._show(trials, f"done {key}")
            elif "diverged" in result:
                self._failed(trials, key, result["diverged"])
            elif "val_acc" in result:
                store.epoch(key, result)

        def on_trial_error(self, iteration, trials, trial, **info):
            key = trial.config["work"]["key"]
            if key in store.open:
                self._failed(trials, key, _error_text(trial))

        def _failed(self, trials, key: str, error: str) -> None:
            store.fail(key, error)
            progress.failed += 1
            self._show(trials, f"FAILED {key}: {error.strip().splitlines()[-1][:200]}")

        def _show(self, trials, event: str = "") -> None:
            progress.running = sum(t.status == "RUNNING" for t in trials)
            progress.show(event)

    return Bridge()


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        return Path(path).read_text()
    return str(getattr(trial, "error_msg", None) or "the trial's worker failed")


def _lock(results: Path, study_key: str):
    """One driver per study: a second `pokestudy run` on the same study and storage refuses."""
    lock_dir = results / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    handle = open(lock_dir / f"{hashlib.sha256(study_key.encode()).hexdigest()[:16]}.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError("another `pokestudy run` is already running this study on this storage; "
                        "wait for it, or watch it with `pokestudy dashboard`") from None
    return handle


def run(spec: Study, *, storage: str, results: Path, study_name: str, data: str | None = None,
        address: str | None = None, max_concurrent: int | None = None, gpus_per_trial: float | None = None,
        verbose: bool = False) -> Store:
    """Run every trial of `spec` not yet COMPLETE in the storage; returns the store for reporting."""
    _check_writable(results)
    lock = _lock(results, f"{storage}|{study_name}")
    prepared = prepare(data or spec.data.source, spec.data.res, spec.data.split_seed, spec.data.fractions)
    store = Store(storage, study_name, spec, prepared.manifest)
    stale = store.fail_stale()
    done = store.done_keys()
    plan = spec.trials()
    todo = [w for w in plan if w.key not in done]
    if not todo:
        print(f"study {study_name} is already finished ({len(plan)} trials); re-exporting its results",
              file=sys.stderr)
        lock.close()
        return store
    note = f", {stale} interrupted trial(s) will rerun" if stale else ""
    print(f"study {study_name}: {len(plan)} trials, {len(plan) - len(todo)} already done{note}", file=sys.stderr)
    try:
        _tune(spec, todo, prepared, store, Progress(len(plan), len(plan) - len(todo)), results, address,
              max_concurrent, gpus_per_trial, verbose)
    finally:
        lock.close()
    print(file=sys.stderr)
    return store


def _tune(spec: Study, todo: list[Work], prepared: Prepared, store: Store, progress: Progress, results: Path,
          address: str | None, max_concurrent: int | None, gpus: float | None, verbose: bool) -> None:
    import ray
    from ray import tune

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    cpus = spec.resources.cpus
    gpus = spec.resources.gpus if gpus is None else gpus
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=verbose, configure_logging=True,
                 logging_level=logging.INFO if verbose else logging.ERROR, ignore_reinit_error=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot connect to Ray at {address}: {str(e).splitlines()[0]}; "
                        "start one with `ray start --head` or omit --address") from None
    if not verbose:
        for name in ("ray", "ray.tune", "ray.train", "ray.air"):  # failures reach the progress line instead
            logging.getLogger(name).setLevel(logging.CRITICAL)
    works = [{"key": w.key, "condition": w.condition, "seed": w.seed, "settings": w.settings} for w in todo]
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, data=prepared), {"cpu": cpus, "gpu": gpus}),
        param_space={"work": tune.grid_search(works), "cpus": cpus},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"{store.study.study_name}-{int(time.time())}", storage_path=str((results / ".ray").resolve()),
            verbose=2 if verbose else 0, callbacks=[_bridge(store, progress)],
            failure_config=tune.FailureConfig(max_failures=spec.resources.retries)),
    )
    tuner.fit()


def _check_writable(results: Path) -> None:
    try:
        results.mkdir(parents=True, exist_ok=True)
        probe = results / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"results directory {results} is not writable ({e.strerror}); "
                        "pass --results DIR with a writable folder") from None
