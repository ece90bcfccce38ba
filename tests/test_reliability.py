"""Reliability: interruptions, crashed workers, concurrent readers and bad input lose nothing."""

from __future__ import annotations

import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from optuna.trial import TrialState

from pokestudy.cli import main
from pokestudy.study import spec
from pokestudy.study.record import TrialRecord
from tests.conftest import cli, pokestudy

SMOKE = yaml.safe_load(spec.available()["smoke"])


def launch(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pokestudy", "run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver, then whatever Ray processes it started (they share its session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def count(db: Path, state: str = "COMPLETE") -> int:
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return con.execute("select count(*) from trials where state = ?", (state,)).fetchone()[0]
    except sqlite3.Error:
        return 0


def assert_one_line_error(err: str) -> None:
    """What every user mistake gets: `pokestudy: error: …` and nothing else on stderr."""
    assert err.startswith("pokestudy: error: ") and len(err.strip().splitlines()) == 1, err


def study_names(url: str) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(url)]


def tiny_spec(tmp_path: Path, name: str, **changes) -> str:
    """A spec file of smoke's data and settings, cut down to `changes` (a few trials instead of 16)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**SMOKE, "name": name, "report": {}, **changes}))
    return str(path)


def test_three_kill_9s_then_a_normal_run_lose_nothing_and_duplicate_nothing(tmp_path: Path, ray_local, capsys):
    """Each killed run is a process of its own; the normal run runs in-process, on the session's Ray."""
    db = tmp_path / "pokestudy.db"
    rng = random.Random(0)
    seen: dict[int, dict] = {}
    for _ in range(3):
        proc = launch("--study", "smoke", "--results", str(tmp_path))
        time.sleep(rng.uniform(8, 20))  # a random moment: Ray start, data, or mid-trial
        os.kill(proc.pid, signal.SIGKILL)
        kill_tree(proc)
        study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{db}") if db.exists() else None
        for t in study.get_trials() if study else []:
            if t.state == TrialState.COMPLETE:
                seen.setdefault(t.number, (t.user_attrs, t.system_attrs[TrialRecord.ATTR]))
    out = cli(capsys, "run", "--study", "smoke", "--results", str(tmp_path))
    assert out.returncode == 0, out.stderr
    trials = optuna.load_study(study_name="smoke", storage=f"sqlite:///{db}").get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 16 and len({t.user_attrs["key"] for t in complete}) == 16
    by_number = {t.number: t for t in trials}
    for number, attrs in seen.items():  # every trial complete before a kill is still complete, unchanged
        after = by_number[number]
        assert after.state == TrialState.COMPLETE and (after.user_attrs, after.system_attrs[TrialRecord.ATTR]) == attrs
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_a_killed_worker_is_retried_then_recorded_failed_and_the_study_finishes(tmp_path: Path):
    path = tmp_path / "crash.yaml"
    path.write_text(yaml.safe_dump({**SMOKE, "name": "crash", "seeds": [0], "factors": {"arch": ["cnn"]}, "report": {},
                                    "fixed": {**SMOKE["fixed"], "epochs": 400},
                                    "resources": {"cpus": 1, "retries": 1}}))
    proc = launch("--study", str(path), "--results", str(tmp_path))
    kills = 0
    deadline = time.monotonic() + 240
    try:
        while kills < 2 and time.monotonic() < deadline:
            workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                       if "ImplicitFunc" in " ".join(p.cmdline())]
            if workers and count(tmp_path / "pokestudy.db", "RUNNING"):
                time.sleep(3)
                workers[0].kill()
                kills += 1
                time.sleep(5)
            time.sleep(0.5)
        _, err = proc.communicate(timeout=120)
    finally:
        kill_tree(proc)
    assert kills == 2
    assert proc.returncode == 1 and "no trial of crash finished" in err, err
    (trial,) = optuna.load_study(study_name="crash", storage=f"sqlite:///{tmp_path / 'pokestudy.db'}").get_trials()
    assert trial.state == TrialState.FAIL and "died" in trial.user_attrs["error"].lower()


def test_readers_do_not_disturb_a_running_study(tmp_path: Path, capsys):
    proc = launch("--study", "smoke", "--results", str(tmp_path))
    url = f"sqlite:///{tmp_path / 'pokestudy.db'}"
    reads = 0
    try:
        while proc.poll() is None:
            if count(tmp_path / "pokestudy.db") >= 2:
                study = optuna.load_study(study_name="smoke", storage=url)
                for t in study.get_trials(states=(TrialState.COMPLETE,)):
                    TrialRecord.from_trial(t)  # a COMPLETE trial is never seen half-written
                reads += 1
                if reads == 3:
                    report = cli(capsys, "report", "--study", "smoke", "--results", str(tmp_path), "--format", "csv")
                    assert report.returncode == 0, report.stderr
            time.sleep(0.2)
        _, err = proc.communicate()
    finally:
        kill_tree(proc)
    assert proc.returncode == 0 and "locked" not in err, err
    assert reads >= 3 and count(tmp_path / "pokestudy.db") == 16


def test_a_second_run_of_the_same_study_refuses_while_the_first_runs(tmp_path: Path, capsys):
    first = launch("--study", "smoke", "--results", str(tmp_path))
    try:
        deadline = time.monotonic() + 60
        while not list((tmp_path / ".locks").glob("*.lock")) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        second = cli(capsys, "run", "--study", "smoke", "--results", str(tmp_path))  # refused before Ray starts
        assert second.returncode == 2 and "already running this study" in second.stderr
    finally:
        kill_tree(first)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bad(tmp_path: Path, case: str) -> list[str]:
    """Arguments to `pokestudy run` for one user mistake."""
    def spec_file(**changes) -> str:
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump({**SMOKE, **changes}))
        return str(p)

    folder = tmp_path / "data"
    if case == "no class folders":
        folder.mkdir()
    if case == "only undecodable files":
        (folder / "a").mkdir(parents=True)
        (folder / "a" / "x.jpg").write_text("not an image")
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("name: [unclosed\n")
    unwritable = tmp_path / "a-file"
    unwritable.write_text("")
    return {
        "unknown study": ["--study", "no-such-study"],
        "yaml syntax error": ["--study", str(syntax)],
        "unknown key": ["--study", spec_file(epochz=3)],
        "wrong type": ["--study", spec_file(fixed={"epochs": "three"})],
        "empty factor": ["--study", spec_file(factors={"arch": []})],
        "seeds not integers": ["--study", spec_file(seeds=[0.5, "x"])],
        "resolution out of range": ["--study", spec_file(data={"source": "synthetic", "res": 5000})],
        "missing data path": ["--study", "smoke", "--data", str(tmp_path / "missing")],
        "no class folders": ["--study", "smoke", "--data", str(folder)],
        "only undecodable files": ["--study", "smoke", "--data", str(folder)],
        "malformed storage URL": ["--study", "smoke", "--storage", "not-a-url"],
        "unreachable storage": ["--study", "smoke", "--storage", f"postgresql://nobody@127.0.0.1:{_free_port()}/x"],
        "no Ray cluster at --address": ["--study", "smoke", "--address", f"127.0.0.1:{_free_port()}"],
        "unwritable results directory": ["--study", "smoke", "--results", str(unwritable / "results")],
        "negative --gpus-per-trial": ["--study", "smoke", "--gpus-per-trial", "-1"],
        "--gpus-per-trial nan": ["--study", "smoke", "--gpus-per-trial", "nan"],
        "--gpus-per-trial 1.5": ["--study", "smoke", "--gpus-per-trial", "1.5"],
        "--max-concurrent 0": ["--study", "smoke", "--max-concurrent", "0"],
        "negative --max-concurrent": ["--study", "smoke", "--max-concurrent", "-3"],
    }[case]


@pytest.mark.fast
@pytest.mark.parametrize("case", [
    "unknown study", "yaml syntax error", "unknown key", "wrong type", "empty factor", "seeds not integers",
    "resolution out of range", "missing data path", "no class folders", "only undecodable files",
    "malformed storage URL", "unreachable storage", "no Ray cluster at --address", "unwritable results directory",
    "negative --gpus-per-trial", "--gpus-per-trial nan", "--gpus-per-trial 1.5", "--max-concurrent 0",
    "negative --max-concurrent",
])
def test_bad_input_is_one_line_exit_2_and_nothing_is_stored(tmp_path: Path, case: str, capsys):
    args = _bad(tmp_path, case)
    if "--results" not in args:
        args += ["--results", str(tmp_path / "results")]
    code = main(["run", *args])  # in-process: the same entry point as the console script, minus 5 s of imports
    err = capsys.readouterr().err
    assert code == 2, err
    assert_one_line_error(err)
    db = tmp_path / "results" / "pokestudy.db"
    if db.exists():
        assert optuna.get_all_study_summaries(f"sqlite:///{db}") == []


@pytest.mark.fast
def test_the_dashboard_on_a_port_in_use_is_one_line_exit_2(tmp_path: Path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["dashboard", "--port", str(port), "--results", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert_one_line_error(err)
    assert f"127.0.0.1:{port}" in err and "--port" in err


@pytest.mark.parametrize("command", ["report", "compare"])
def test_report_and_compare_into_an_unwritable_results_folder_are_one_line_exit_2(smoke_run, tmp_path: Path,
                                                                                  command: str, capsys):
    url, _ = smoke_run
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    studies = ["--study", "smoke"] if command == "report" else ["smoke", "smoke"]
    code = main([command, *studies, "--storage", url, "--results", str(blocker / "results")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert_one_line_error(err)
    assert "--results" in err


@pytest.mark.parametrize("case", ["more GPUs than any node", "more CPUs than any node"])
def test_a_trial_no_node_can_hold_is_refused_at_once_and_nothing_is_stored(tmp_path: Path, ray_local, case: str,
                                                                           capsys):
    """Ray would wait forever for a node that does not exist; --restart must not archive first either. The run
    is in-process, on the session's Ray (2 CPUs, no GPU)."""
    url = f"sqlite:///{tmp_path / 'pokestudy.db'}"
    if case == "more GPUs than any node":  # this machine has none
        optuna.create_study(study_name="smoke", storage=url)
        args, before = ["--study", "smoke", "--gpus-per-trial", "1", "--restart"], ["smoke"]
    else:
        args, before = ["--study", tiny_spec(tmp_path, "big", resources={"cpus": 64})], []
    out = cli(capsys, "run", *args, "--results", str(tmp_path))
    assert out.returncode == 2, out.stderr
    assert_one_line_error(out.stderr)
    assert "no Ray node" in out.stderr
    assert study_names(url) == before


def test_a_local_ray_that_cannot_start_says_so_without_an_address_of_none(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**os.environ, "RAY_TMPDIR": str(blocker / "ray")}  # Ray cannot make its session folder
    out = pokestudy("run", "--study", "smoke", "--results", str(tmp_path), env=env, timeout=120)
    assert out.returncode == 2, out.stderr
    assert_one_line_error(out.stderr)
    assert "local Ray" in out.stderr and "None" not in out.stderr


def test_sigterm_and_ctrl_c_stop_a_run_with_one_line_and_the_rerun_finishes_it(tmp_path: Path, ray_local,
                                                                               capsys):
    """SIGTERM to the driver (`kill PID`), SIGTERM to its whole process group (`timeout`, systemd: Ray's
    own processes end too) and Ctrl-C (SIGINT to the terminal's process group), each once one more trial
    is stored: one line and a prompt exit, no C++ stack, no report; the rerun (in-process, on the session's
    Ray) finishes the study."""
    study = tiny_spec(tmp_path, "stop", factors={"arch": ["cnn", "resnet"]}, seeds=[0, 1, 2, 3],
                      fixed={**SMOKE["fixed"], "epochs": 4})
    db = tmp_path / "pokestudy.db"
    for stop, group in [(signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGINT, True)]:
        before = count(db)
        proc = launch("--study", study, "--results", str(tmp_path))
        try:
            deadline = time.monotonic() + 240
            while count(db) <= before and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert count(db) > before and proc.poll() is None, "no further trial stored while the run ran"
            sent = time.monotonic()
            (os.killpg if group else os.kill)(proc.pid, stop)
            _, err = proc.communicate(timeout=90)
        finally:
            kill_tree(proc)
        assert proc.returncode == 128 + stop, err
        assert err.strip().splitlines()[-1].startswith("pokestudy: interrupted"), err
        assert not [s for s in ("Traceback", "SIGTERM received", "PC: @", "GCS") if s in err], err
        assert time.monotonic() - sent < 45, "exit waited for a Ray that was gone"  # it waited 60 s
    assert not (tmp_path / "stop" / "summary.md").exists()  # an interrupted study is not reported as finished
    rerun = cli(capsys, "run", "--study", study, "--results", str(tmp_path))
    assert rerun.returncode == 0, rerun.stderr
    complete = optuna.load_study(study_name="stop", storage=f"sqlite:///{db}").get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 8 and len({t.user_attrs["key"] for t in complete}) == 8


OPEN_AT_ONCE = """
import sys, time
from pathlib import Path
from pokestudy.study.store import storage
print("ready", flush=True)
while not Path(sys.argv[2]).exists():
    time.sleep(0.001)
storage(sys.argv[1])
"""


def test_processes_opening_one_new_sqlite_file_at_the_same_moment_all_succeed(tmp_path: Path):
    """Optuna creates the schema on first open; processes that race there (two `pokestudy run`s
    started together) must all get a working storage. They are held at one start line to race for sure."""
    url, go = f"sqlite:///{tmp_path / 'new.db'}", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT_ONCE, url, str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 4
        go.touch()
        outs = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [code for code, _ in outs] == [0] * 4, [err.strip().splitlines()[-1] for code, err in outs if code]


def test_two_runs_of_different_studies_started_together_on_a_new_sqlite_file_both_finish(tmp_path: Path):
    specs = [tiny_spec(tmp_path, name, factors={"arch": ["cnn", "resnet"]}, seeds=[0],
                       fixed={**SMOKE["fixed"], "epochs": 2}) for name in ("first", "second")]
    procs = [launch("--study", s, "--results", str(tmp_path)) for s in specs]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            kill_tree(p)
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    url = f"sqlite:///{tmp_path / 'pokestudy.db'}"
    for name in ("first", "second"):
        assert len(optuna.load_study(study_name=name, storage=url).get_trials(states=(TrialState.COMPLETE,))) == 2
