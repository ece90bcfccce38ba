"""Trials placed beyond one CPU node, tested on this machine without owning a GPU or a second machine:
a Ray node that *advertises* a GPU, and a cluster of two nodes (issue 22). Each test starts its own
cluster with `ray start` in a temp folder, with a token of its own, and ends it by process group, never
with `ray stop` (which would end every Ray on the machine, this test session's own too)."""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
import torch

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def cluster(*nodes: list[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """A Ray cluster of `nodes` (each a list of `ray start` resource flags; the first is the head) on
    127.0.0.1: yields its address and the environment a driver needs to join it."""
    port, temp = _free_port(), tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": temp, "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_AUTH_MODE": "token"}
    groups: list[int] = []
    try:
        for i, flags in enumerate(nodes):
            where = (["--head", f"--port={port}", "--include-dashboard=false", f"--dashboard-port={_free_port()}"]
                     if i == 0 else [f"--address=127.0.0.1:{port}"])
            start = subprocess.Popen([RAY, "start", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                                      *where, *flags], env=env, start_new_session=True, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            groups.append(start.pid)  # its node's processes stay in its group after `ray start` returns
            out, _ = start.communicate(timeout=180)
            assert start.returncode == 0, out[-2000:]
        yield f"127.0.0.1:{port}", env
    finally:
        for group in groups:
            _end(group)
        shutil.rmtree(temp, ignore_errors=True)


def _end(group: int) -> None:
    try:
        os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            os.killpg(group, 0)  # raises once every process of the group is gone
            time.sleep(0.2)
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_smoke(address: str, env: dict[str, str], results: Path, *flags: str) -> list[dict]:
    """`pokestudy run --study smoke --address ADDRESS` as a user types it; the stored records."""
    out = subprocess.run([sys.executable, "-m", "pokestudy", "run", "--study", "smoke", "--address", address,
                          "--results", str(results), *flags], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{results / 'pokestudy.db'}")
    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]


def most_at_once(trials: list[optuna.trial.FrozenTrial]) -> int:
    """The most trials that were running at one moment (each is stored RUNNING when Ray starts it)."""
    events = sorted([(t.datetime_start, 1) for t in trials] + [(t.datetime_complete, -1) for t in trials])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def record(trial: optuna.trial.FrozenTrial) -> dict:
    return trial.system_attrs["pokestudy:record"]


def test_quarter_gpu_trials_run_four_at_a_time_on_an_advertised_gpu(tmp_path: Path):
    """8 CPUs would hold 8 trials; the one GPU, at 0.25 each, holds 4: the GPU is what binds."""
    with cluster(["--num-cpus=8", "--num-gpus=1"]) as (address, env):
        trials = run_smoke(address, env, tmp_path / "results", "--gpus-per-trial", "0.25")
    assert len(trials) == 16
    assert most_at_once(trials) == 4
    for trial in map(record, trials):
        assert trial["assigned_gpus"] == "0"  # Ray's CUDA_VISIBLE_DEVICES, seen inside the trial
        if torch.cuda.is_available():
            assert trial["device"].startswith("cuda") and not trial["cpu_fallback"]
        else:  # a GPU assigned that torch cannot see: trained on the CPU, and the record says so
            assert trial["device"] == "cpu" and trial["cpu_fallback"] is True


def test_a_study_runs_on_both_nodes_of_a_two_node_cluster_as_on_one(tmp_path: Path, smoke_run):
    """Each node has its own CPU; the results have the shape of a one-node run's (`smoke_run`)."""
    with cluster(["--num-cpus=1"], ["--num-cpus=1"]) as (address, env):
        trials = run_smoke(address, env, tmp_path / "results")
    nodes = {record(t)["node_id"] for t in trials}
    assert len(nodes) == 2, nodes
    assert all(record(t)["node_ip"] and record(t)["hostname"] == socket.gethostname() for t in trials)
    assert not any(record(t)["assigned_gpus"] or record(t)["cpu_fallback"] for t in trials)
    assert most_at_once(trials) == 2
    one_node = optuna.load_study(study_name="smoke", storage=smoke_run[0]).get_trials(deepcopy=False)
    one, two = ([record(t) for t in run if t.state == optuna.trial.TrialState.COMPLETE] for run in (one_node, trials))
    assert sorted(r["key"] for r in two) == sorted(r["key"] for r in one)
    assert {frozenset(r) for r in two} == {frozenset(r) for r in one}  # the same fields, placement included
    assert {frozenset(r["final"]) for r in two} == {frozenset(r["final"]) for r in one}
    written = tmp_path / "results" / "smoke"
    assert all((written / name).is_file() for name in ("trials.csv", "verdicts.csv", "summary.md"))
