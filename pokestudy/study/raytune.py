"""Everything that talks to Ray: the trainable, the Tune callback that bridges to Optuna, the
searcher that asks Optuna for nuisance values, progress display, and starting or joining Ray.

Workers only train and report; the callback on the driver is the one writer to the storage.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pokestudy import UserError
from pokestudy.data import Pool
from pokestudy.study.record import cpu_model
from pokestudy.study.spec import Study, Work, condition_id
from pokestudy.study.store import Store
from pokestudy.train import Diverged, TrialConfig, resolve_device, run_trial

if TYPE_CHECKING:
    import torch

_FITTING = threading.Event()  # a Tune run is going
_STOPPING = threading.Event()  # Ctrl-C or SIGTERM came during it: it ends after its current step


def stop_between_steps() -> bool:
    """Called from a signal handler: ask the Tune run in progress to end after its current step, so no
    storage write is cut in half; `Driver.fit` then raises KeyboardInterrupt. False when no run is going
    or a stop was already asked (a second Ctrl-C stops at once)."""
    if not _FITTING.is_set() or _STOPPING.is_set():
        return False
    _STOPPING.set()
    return True


def stopping() -> bool:
    """Whether a stop was asked (a function, not the Event: Tune pickles its stopper, locks do not pickle)."""
    return _STOPPING.is_set()


def trainable(config: dict, data: Pool) -> None:
    """Ray Tune function trainable: one trial on its replicate's split, each epoch reported; a divergence
    is a result, not a crash."""
    import torch
    from ray import tune

    torch.set_num_threads(max(1, int(config["cpus"])))
    work = Work(**config["work"])
    cfg = TrialConfig.from_dict(work.settings)
    where = placement(resolve_device(cfg.device))
    try:
        summary = run_trial(cfg, data.split(work.split_seed), on_epoch=tune.report)
    except Diverged as e:
        tune.report({"diverged": str(e), "val_acc": 0.0})  # ASHA ranks every result on val_acc: the worst
        return
    tune.report({**summary["final"], "summary": {**summary, "placement": where}})


def placement(device: torch.device) -> dict[str, Any]:
    """Where this trial runs (the fields of `TrialRecord.PLACEMENT`): its Ray node and the device torch trains
    on. Ray assigns a GPU by setting CUDA_VISIBLE_DEVICES; a torch that sees no CUDA then trains on the CPU,
    which without this record looks like a slow GPU trial."""
    import ray
    import torch

    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    assigned = os.environ.get("CUDA_VISIBLE_DEVICES")
    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(), "device": str(device), "assigned_gpus": assigned,
            "cpu_fallback": bool(assigned) and device.type == "cpu", "cpu": cpu_model()}


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


def _bridge(owner: dict[str, Store], distributions: dict, tuned: tuple[str, ...], progress: Progress, clock: Clock):
    """A Ray Tune callback that writes each trial's epochs and outcome to Optuna (driver side).

    `owner` maps a trial key to the store that keeps it: the study's own, or while tuning
    nuisance parameters, the condition's tuning study.
    """
    from ray.tune import Callback

    class Bridge(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            work = Work(**trial.config["work"])
            if work.key not in owner[work.key].open:  # tuning trials are opened by the searcher; retries keep theirs
                owner[work.key].start(work, distributions, tuned)
            self._show(trials)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            key = trial.config["work"]["key"]
            if "summary" in result:
                work = Work(**trial.config["work"])
                owner[key].complete(work, result["summary"])
                clock.record(work.condition, work.budget, result["summary"]["final"]["seconds"])
                progress.done += 1
                progress.best = max(progress.best, result["summary"]["best"]["val_acc"])
                self._show(trials, f"done {key}")
            elif "diverged" in result:
                self._failed(trials, key, result["diverged"])
            elif "val_acc" in result:
                owner[key].epoch(key, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            key = trial.config["work"]["key"]
            if key in owner[key].open and not stopping():  # stopped by the scheduler (ASHA) before its summary
                owner[key].prune(key)
                progress.done += 1
                self._show(trials, f"stopped early {key}")

        def on_trial_error(self, iteration, trials, trial, **info):
            key = trial.config["work"]["key"]
            if key in owner[key].open and not stopping():  # while stopping, left RUNNING: the rerun runs it
                self._failed(trials, key, _error_text(trial))

        def _failed(self, trials, key: str, error: str) -> None:
            owner[key].fail(key, error)
            progress.failed += 1
            self._show(trials, f"FAILED {key}: {error.strip().splitlines()[-1][:200]}")

        def _show(self, trials, event: str = "") -> None:
            # RUNNING in Tune until its function returns: a trial whose summary is stored is done, not running
            progress.running = sum(t.status == "RUNNING" and (k := t.config["work"]["key"]) in owner[k].open
                                   for t in trials)
            progress.show(event)

    return Bridge()


class Clock:
    """A run's wall-clock budget: a trial starts only when it can finish by the deadline, judged by the
    measured wall times of finished trials (its condition's median, else all conditions'), scaled by its
    budget multiple. With nothing measured yet a trial starts, and is measured."""

    def __init__(self, deadline: float | None = None):
        self.deadline, self.seconds = deadline, {}
        self.refused = False  # a trial was not started for lack of time

    def record(self, condition: dict[str, str], budget: float, seconds: float) -> None:
        self.seconds.setdefault(condition_id(condition), []).append(seconds / budget)

    def fits(self, condition: dict[str, str], budget: float) -> bool:
        if self.deadline is None:
            return True
        times = self.seconds.get(condition_id(condition)) or [t for ts in self.seconds.values() for t in ts]
        if times and time.time() + statistics.median(times) * budget > self.deadline:
            self.refused = True
        return not self.refused


@dataclass
class Slot:
    """A trial to hand out: its condition and budget (to judge whether it fits in time), and how to make its
    Work (for a tuning trial that asks Optuna, so it is asked only when it will run)."""

    condition: dict[str, str]
    budget: float
    make: Callable[[], Work]


def feeder(slots: list[Slot], cpus: float, clock: Clock):
    """A Ray Tune searcher that hands out the slots in order while the clock allows; the first that does not
    fit ends the run (the running trials finish)."""
    from ray.tune.search import Searcher

    class Feed(Searcher):
        def suggest(self, trial_id: str):
            if not slots or not clock.fits(slots[0].condition, slots[0].budget):
                return Searcher.FINISHED
            return {"work": vars(slots.pop(0).make()), "cpus": cpus}

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
            pass  # the Bridge callback records outcomes

    return Feed()  # no metric of its own: Tune would then demand one in every result, a divergence's too


def tuning_slots(condition: dict[str, str], n: int, spec: Study, store: Store, owner: dict[str, Store]) -> list[Slot]:
    """`n` tuning trials of a condition: each asks the condition's Optuna sampler (TPE) for its values."""
    from optuna.distributions import FloatDistribution

    space = {k: FloatDistribution(r.low, r.high, log=r.log) for k, r in spec.nuisance.params.items()}

    def make() -> Work:
        trial = store.study.ask(space)
        work = spec.tuning_work(condition, trial.number, trial.params)
        store.adopt(work, trial)
        owner[work.key] = store
        return work

    return [Slot(condition, 1.0, make) for _ in range(n)]


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        return Path(path).read_text()
    return str(getattr(trial, "error_msg", None) or "the trial's worker failed")


def _when_stopping():
    """A Tune stopper that ends the whole run once `stop_between_steps` was called."""
    from ray.tune import Stopper

    class WhenStopping(Stopper):
        def __call__(self, trial_id: str, result: dict) -> bool:
            return False

        def stop_all(self) -> bool:
            return stopping()

    return WhenStopping()


class Driver:
    """Everything one `pokestudy run` needs to hand trials to Ray Tune."""

    def __init__(self, spec: Study, prepared: Pool, results: Path, address: str | None,
                 max_concurrent: int | None, gpus: float | None, verbose: bool):
        self.spec, self.prepared, self.results, self.address = spec, prepared, results, address
        self.max_concurrent, self.verbose = max_concurrent, verbose
        self.gpus = spec.resources.gpus if gpus is None else gpus

    def fit(self, owner: dict[str, Store], progress: Progress, name: str, slots: list[Slot], clock: Clock, *,
            tuning: bool = False, distributions: dict | None = None, tuned: tuple[str, ...] = ()) -> None:
        """Run `slots` in order as the clock allows (`tuning`: a condition's tuning trials, under ASHA
        when the spec asks for it)."""
        from ray import tune

        cpus = self.spec.resources.cpus
        scheduler = None
        if tuning and self.spec.nuisance.asha_grace:
            # max_t one past the last epoch: ASHA stops a trial *at* max_t, which would cut off its summary.
            scheduler = tune.schedulers.ASHAScheduler(time_attr="epoch", max_t=self._epoch_cap() + 1,
                                                      grace_period=self.spec.nuisance.asha_grace)
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(trainable, data=self.prepared), {"cpu": cpus, "gpu": self.gpus}),
            tune_config=tune.TuneConfig(search_alg=feeder(slots, cpus, clock), scheduler=scheduler,
                                        num_samples=len(slots),
                                        metric="val_acc" if scheduler else None, mode="max" if scheduler else None,
                                        max_concurrent_trials=self._concurrency(), reuse_actors=True,
                                        trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(
                name=f"{name}-{int(time.time())}", storage_path=str((self.results / ".ray").resolve()),
                verbose=2 if self.verbose else 0,
                callbacks=[_bridge(owner, distributions or {}, tuned, progress, clock)],
                failure_config=tune.FailureConfig(max_failures=self.spec.resources.retries), stop=_when_stopping()),
        )
        _STOPPING.clear()  # a stop asked of an earlier run in this process (`run_study` called in-process) is spent
        _FITTING.set()
        try:
            tuner.fit()
        finally:
            _FITTING.clear()
        print(file=sys.stderr)
        if stopping():  # between Tune's steps: every trial is stored whole or left RUNNING for the rerun
            raise KeyboardInterrupt

    def _concurrency(self) -> int:
        """At most this many trials at once: the user's limit, else as many as the cluster's nodes hold.
        Without a limit Tune keeps one trial of a custom searcher pending at a time, so trials start one
        by one, each after the previous one's worker came up (short trials never overlapped), and under
        a budget it would ask for one trial more than can run, which starts later than the clock judged."""
        return self.max_concurrent or max(1, sum(self._fits(node) for node in self._nodes()))

    def _need(self) -> dict[str, float]:
        return {"CPU": float(self.spec.resources.cpus), "GPU": float(self.gpus)}

    def _fits(self, have: dict[str, float]) -> int:
        """How many trials one node's resources hold at once (a small tolerance: 1 GPU holds ten 0.1s)."""
        return min(int(have.get(k, 0.0) / v + 1e-9) for k, v in self._need().items() if v > 0)

    @staticmethod
    def _nodes() -> list[dict[str, float]]:
        import ray

        return [node["Resources"] for node in ray.nodes() if node["Alive"]]

    def _epoch_cap(self) -> int:
        return max(TrialConfig.from_dict(self.spec.settings(c)).epochs for c in self.spec.conditions())

    def cluster(self) -> dict[str, float]:
        """CPUs and GPUs of the Ray cluster the trials run on (for the study's provenance)."""
        import ray

        if not ray.is_initialized():
            return {}
        return {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}

    def start_ray(self) -> None:
        """Start or join Ray, then refuse a trial that no node of it can hold."""
        check_address(self.address)
        token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") \
            or (Path.home() / ".ray" / "auth_token").exists()
        if self.address and token:
            # `ray start` (Ray >= 2.59) enforces token auth, but a driver given an address sends
            # its token only when told to, and Ray reads this when it is first imported.
            os.environ.setdefault("RAY_AUTH_MODE", "token")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        # Tune's own Ctrl-C handler ends `fit` as if the study were done (it was then reported, exit 0);
        # the CLI's handler stops it through `stop_between_steps` instead.
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        import ray

        if not ray.is_initialized():
            self._init_ray(ray)
        self._check_fits()

    def _init_ray(self, ray) -> None:
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(address=self.address or "local", include_dashboard=False, log_to_driver=self.verbose,
                     logging_level=logging.INFO if self.verbose else logging.ERROR)
        except (OSError, RuntimeError, ValueError) as e:  # ConnectionError is an OSError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if self.address:
                raise UserError(f"cannot connect to Ray at {self.address}: {first}; "
                                "start one with `ray start --head` or omit --address") from None
            raise UserError(f"cannot start a local Ray: {first}; check that its temp folder (RAY_TMPDIR, default "
                            "/tmp) is writable and has space, or pass --address of a running cluster") from None
        if sigterm is not None:
            # Ray's core worker installs a C++ SIGTERM handler that prints a stack trace and aborts;
            # keep the process's own (the CLI's: stop like Ctrl-C), or the default.
            signal.signal(signal.SIGTERM, sigterm)
        if not self.verbose:
            for logger in ("ray", "ray.tune", "ray.train", "ray.air"):  # failures reach the progress line instead
                logging.getLogger(logger).setLevel(logging.CRITICAL)

    def _check_fits(self) -> None:
        """Ray waits forever, saying nothing, for a trial larger than every node: refuse it now,
        before the study is stored. (An autoscaling cluster's future nodes are not counted.)"""
        nodes = self._nodes()
        if any(self._fits(have) for have in nodes):
            return
        need = self._need()
        most = {k: max((have.get(k, 0.0) for have in nodes), default=0.0) for k in need}
        raise UserError(f"a trial asks for {need['CPU']:g} CPU and {need['GPU']:g} GPU, but no Ray node has that "
                        f"much (the most on one node: {most['CPU']:g} CPU, {most['GPU']:g} GPU); lower "
                        "--gpus-per-trial or the spec's resources.cpus, or use a cluster with such a node")


def local_ray_died(wait: float = 1.0) -> bool:
    """Whether a process of the local Ray this driver started has died: SIGTERM to the whole process
    group (`timeout`, systemd) ends them with the driver, and then `ray.shutdown` at exit would wait a
    minute for the dead GCS and print an error. `wait`: how long they may take to die after the signal."""
    if "ray" not in sys.modules:
        return False
    import ray

    node = ray._private.worker._global_node  # no public API tells this (checked on Ray 2.60); None when not init
    if node is None:
        return False
    deadline = time.monotonic() + wait
    while not node.dead_processes():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def check_address(address: str | None) -> None:
    """Refuse at once when nothing listens at HOST:PORT (ray.init would retry for minutes)."""
    host, _, port = (address or "").rpartition(":")
    if not port.isdigit() or "://" in address:
        return  # "auto", "ray://…" and other forms: let Ray decide
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as e:
        raise UserError(f"no Ray cluster at {address} ({e.strerror or e}); start one with `ray start --head` "
                        "or omit --address to run on this machine") from None
