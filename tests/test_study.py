"""Studies: specs validate with clear errors; Ray Tune runs the trials; Optuna keeps every epoch; reruns resume."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from pokestudy import UserError
from pokestudy.cli import main
from pokestudy.study import runner, spec
from pokestudy.study.record import StudyRecord, TrialRecord
from pokestudy.train import TrialConfig, default_precision
from tests.conftest import cli
from tests.test_reliability import assert_one_line_error

SMOKE = yaml.safe_load(spec.available()["smoke"])


def write_spec(tmp_path: Path, **changes) -> Path:
    """The smoke spec with `changes`; with other factors, without its report block (which names smoke's)."""
    raw = {**{k: v for k, v in SMOKE.items() if k != "report" or "factors" not in changes}, **changes}
    path = tmp_path / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.fast
def test_every_shipped_spec_loads_and_says_what_it_answers():
    shipped = spec.available()
    assert {"overfit", "smoke", "paper", "tune", "leakage"} <= set(shipped)
    for name in shipped:
        study = spec.load(name)
        assert study.name == name and study.question and study.trials()
    overfit = spec.load("overfit")
    assert set(overfit.factors) >= {"arch", "augment", "regularization"} and len(overfit.replicate_seeds()) >= 3
    assert set(overfit.factors["augment"]) == {"none", "paper", "paper-offline"}


@pytest.mark.fast
@pytest.mark.parametrize("changes, message", [
    ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    ({"seeds": ["a", "b"]}, "seeds.0"),
    ({"seeds": []}, "seeds"),
    ({"factors": {"arch": []}}, "no levels"),
    ({"factors": {}}, "at least one factor"),
    ({"fixed": {"epochs": "many"}}, "epochs"),
    ({"fixed": {"learning_rate": 0.1}}, "unknown fixed setting"),
    ({"data": {"res": 4000}}, "data.res"),
    ({"factors": {"arch": ["cnn", "vgg"]}}, "unknown arch"),
])
def test_bad_specs_are_refused_with_one_line(tmp_path: Path, changes: dict, message: str, capsys):
    assert main(["run", "--study", str(write_spec(tmp_path, **changes)), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert message in err and "Traceback" not in err


@pytest.mark.fast
def test_yaml_syntax_error_duplicate_key_and_unknown_study(tmp_path: Path):
    for text, message in [("name: x\nfactors: [unclosed\n", "YAML syntax error"),
                          ("name: x\nfactors: {arch: [cnn]}\nseeds: [0]\nfixed:\n  epochs: 6\n  epochs: 30\n",
                           "bad.yaml at line 6: duplicate key 'epochs'")]:  # PyYAML alone keeps the last
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(UserError, match=message):
            spec.load(str(tmp_path / "bad.yaml"))
    with pytest.raises(UserError, match="no study 'nope'"):
        spec.load("nope")


@pytest.mark.fast
def test_studies_available_lists_every_shipped_spec_with_its_question(capsys):
    assert main(["studies", "--available"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shipped = spec.available()
    assert [line.split()[0] for line in lines] == list(shipped)
    for line, name in zip(lines, shipped):
        assert line.split(None, 1)[1] == spec.load(name).question


def test_smoke_study_stores_every_trial_and_epoch_then_a_rerun_runs_nothing(smoke_run):
    url, results = smoke_run
    study = spec.load("smoke")
    stored = optuna.load_study(study_name="smoke", storage=url)
    trials = stored.get_trials()
    assert len(trials) == len(study.trials()) == 16
    assert all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        r = TrialRecord.from_trial(t)
        assert set(t.intermediate_values) == set(range(1, r.epochs + 1)) and r.epochs == study.fixed["epochs"]
        assert r.final["gap"] == pytest.approx(r.final["train_acc"] - r.final["test_acc"])
        assert len(r.history["val_acc"]) == r.epochs and t.value == r.final["val_acc"]
        assert r.history["val_acc"][-1] == pytest.approx(r.final["val_acc"], abs=1e-3)
        assert set(t.params) == {"arch", "augment", "regularization"}, "params are the factors only"
        assert r.settings["lr"] == study.fixed["lr"] and r.condition == {k: t.params[k] for k in t.params}
    info = StudyRecord.from_study(stored)
    resolved = study.with_precision(default_precision("cpu")).fixed  # `precision: auto`, as this CPU resolves it
    assert info.spec["fixed"] == resolved and info.identity["data"]["fingerprint"] == info.data["fingerprint"]
    trained = {TrialConfig.from_dict(TrialRecord.from_trial(t).settings).precision for t in trials}  # fp32 implicit
    assert trained == {resolved.get("precision", "fp32")}, "each trial trains in the precision the study was made with"
    assert info.provenance.finished and stored.metric_names == ["val_acc (last epoch)"]
    assert len({t.user_attrs["key"] for t in trials}) == 16

    runner.run_study(study, storage=url, results=results, study_name="smoke")  # finished: nothing runs again
    assert len(optuna.load_study(study_name="smoke", storage=url).get_trials()) == 16


def test_a_diverging_trial_is_recorded_failed_and_the_study_finishes(tmp_path: Path, ray_local):
    path = write_spec(tmp_path, name="diverge", seeds=[0],
                      factors={"arch": ["cnn"], "lr": [0.01, 1e30]},
                      fixed={"width": 4, "epochs": 2, "batch_size": 16, "optimizer": "sgd"})
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    runner.run_study(spec.load(str(path)), storage=url, results=tmp_path, study_name="diverge")
    trials = {t.params["lr"]: t for t in optuna.load_study(study_name="diverge", storage=url).get_trials()}
    assert trials["0.01"].state == TrialState.COMPLETE
    assert trials["1e+30"].state == TrialState.FAIL and "loss became" in trials["1e+30"].user_attrs["error"]


def test_run_under_another_study_name_one_trial_at_a_time_verbose_with_an_outside_set(tmp_path: Path, ray_local,
                                                                                      capsys):
    """The flags of `pokestudy run` that change what it does, in one small run: `--study-name` stores the study
    (and its report) under that name, `--max-concurrent 1` runs one trial at a time where Ray has room for two,
    `--verbose` shows Ray Tune's own status, and `--eval`'s set is evaluated every epoch."""
    from tests.conftest import jpeg

    outside = tmp_path / "outside"
    for c in range(3):
        (outside / f"class{c:03d}").mkdir(parents=True)  # the synthetic classes' names
        for i in range(2):
            (outside / f"class{c:03d}" / f"{i}.jpg").write_bytes(jpeg((70 * c, 120, 200 - 70 * c), seed=10 * c + i))
    path = write_spec(tmp_path, name="flags", seeds=[0], factors={"augment": ["none", "paper"]},
                      data={"source": "synthetic:classes=3,per_class=12,size=32", "res": 32},
                      fixed={"arch": "cnn", "width": 4, "epochs": 2, "batch_size": 16})
    results = tmp_path / "results"
    code = main(["run", "--study", str(path), "--results", str(results), "--study-name", "renamed",
                 "--max-concurrent", "1", "--verbose", "--eval", f"outside={outside}"])
    out = capsys.readouterr()
    assert code == 0, out.err
    url = f"sqlite:///{results / 'pokestudy.db'}"
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["renamed"]
    assert (results / "renamed" / "summary.md").exists() and not (results / "flags").exists()
    trials = optuna.load_study(study_name="renamed", storage=url).trials
    (a_start, a_end), (b_start, b_end) = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert a_end <= b_start, "the second trial started after the first had finished"
    for t in trials:
        r = TrialRecord.from_trial(t)
        assert "outside_acc" in r.final and len(r.history["outside_acc"]) == r.epochs == 2
    assert "== Status ==" in out.out + out.err, "Ray Tune's own status table"


def _complete(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_kill_9_of_the_driver_then_rerun_ends_with_exactly_the_expected_trials(tmp_path: Path, ray_local, capsys):
    """The killed run is a process of its own; the rerun runs in-process, on the session's Ray."""
    import subprocess
    import sys

    db = tmp_path / "pokestudy.db"
    args = [sys.executable, "-m", "pokestudy", "run", "--study", "smoke", "--results", str(tmp_path)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while _complete(db) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _complete(db)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # tidy up the Ray processes the dead driver left
    except ProcessLookupError:
        pass
    assert 3 <= killed_at < 16
    out = cli(capsys, "run", "--study", "smoke", "--results", str(tmp_path))
    assert out.returncode == 0, out.stderr
    trials = optuna.load_study(study_name="smoke", storage=f"sqlite:///{db}").get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 16 and len({t.user_attrs["key"] for t in complete}) == 16
    assert "already done" in out.stderr
    assert (tmp_path / "smoke" / "gap.md").exists()


def test_nuisance_tuning_then_seeds_rerun_each_conditions_best_setting(tmp_path: Path, ray_local):
    path = write_spec(tmp_path, name="tiny-tune", seeds=[0, 1], factors={"arch": ["cnn"], "augment": ["none", "paper"]},
                      nuisance={"params": {"lr": {"low": 0.001, "high": 0.1, "log": True}}, "trials": 3,
                                "asha_grace": 1},
                      fixed={"width": 4, "epochs": 3, "batch_size": 16})
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    runner.run_study(spec.load(str(path)), storage=url, results=tmp_path, study_name="tiny-tune")
    for augment in ("none", "paper"):
        tuning = optuna.load_study(study_name=f"tiny-tune.tune.arch=cnn,augment={augment}", storage=url)
        assert len(tuning.trials) == 3
        assert {t.state for t in tuning.trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
        assert any(t.state == TrialState.COMPLETE for t in tuning.trials), "ASHA compares within a condition"
        best_lr = tuning.best_trial.params["lr"]
        assert 0.001 <= best_lr <= 0.1
        final = [t for t in optuna.load_study(study_name="tiny-tune", storage=url).trials
                 if t.params["augment"] == augment]
        assert len(final) == 2 and all(t.params["lr"] == best_lr for t in final)


def _stored(db: Path) -> list:
    """Everything a study keeps, to show that a refused run wrote nothing."""
    with sqlite3.connect(db) as con:
        return [con.execute(f"select * from {t}").fetchall() for t in
                ("studies", "study_user_attributes", "trials", "trial_user_attributes", "trial_values")]


@pytest.mark.parametrize("change, message", [
    ({"data": "synthetic:classes=4,per_class=12"}, "data: synthetic:classes=6,per_class=16,size=32 → "
                                                   "synthetic:classes=4,per_class=12"),
    ({"fixed": {**SMOKE["fixed"], "epochs": 13}}, f"fixed.epochs: {SMOKE['fixed']['epochs']} → 13"),
    ({"factors": {**SMOKE["factors"], "regularization": {"none": {}, "strong": {"weight_decay": 0.1}}}},
     "factors.regularization.strong.weight_decay: 0.05 → 0.1"),
])
def test_a_different_experiment_under_a_stored_name_is_refused_before_anything_is_written(
        smoke_run, tmp_path: Path, capsys, change: dict, message: str):
    _, results = smoke_run
    shutil.copy(results / "pokestudy.db", tmp_path / "pokestudy.db")
    before = _stored(tmp_path / "pokestudy.db")
    args = ["run", "--results", str(tmp_path)]
    if "data" in change:
        args += ["--study", "smoke", "--data", change["data"]]
    else:
        args += ["--study", str(write_spec(tmp_path, **change))]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "--study-name" in err and "--restart" in err
    assert _stored(tmp_path / "pokestudy.db") == before


def test_the_identical_rerun_runs_nothing_and_seeds_may_grow(smoke_run, tmp_path: Path, capsys):
    _, results = smoke_run
    db = tmp_path / "pokestudy.db"
    shutil.copy(results / "pokestudy.db", db)
    before = _stored(db)[2]
    assert main(["run", "--study", "smoke", "--results", str(tmp_path)]) == 0
    assert "already finished" in capsys.readouterr().err
    assert _stored(db)[2] == before
    fewer = write_spec(tmp_path, seeds=[0])  # the same experiment with fewer seeds: nothing to run, not refused
    assert main(["run", "--study", str(fewer), "--results", str(tmp_path)]) == 0
    assert "already finished" in capsys.readouterr().err and _stored(db)[2] == before
    more = write_spec(tmp_path, seeds=[0, 1, 2])  # and with more: only the new replicate's trials run
    assert main(["run", "--study", str(more), "--results", str(tmp_path)]) == 0
    assert "study smoke: 24 trials, 16 already done" in capsys.readouterr().err
    after = _stored(db)[2]
    assert after[:16] == before, "the first two replicates' trials are kept as they were"
    trials = optuna.load_study(study_name="smoke", storage=f"sqlite:///{db}").trials
    assert len(trials) == 24 and all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(TrialRecord.from_trial(t).seed for t in trials[16:]) == [2] * 8


def test_changed_files_in_a_data_folder_are_refused_then_restart_keeps_the_old_study(
        messy_folder: Path, tmp_path: Path, ray_local, capsys):
    path = write_spec(tmp_path, name="folder", seeds=[0], factors={"arch": ["cnn"]},
                      data={"source": str(messy_folder), "res": 32}, fixed={"width": 4, "epochs": 2, "batch_size": 8})
    run = ["run", "--study", str(path), "--results", str(tmp_path / "r")]
    assert main(run) == 0
    (messy_folder / "class1" / "0.jpg").write_bytes((messy_folder / "class2" / "1.jpg").read_bytes())
    capsys.readouterr()
    assert main(run) == 2
    assert "data files changed (fingerprint" in capsys.readouterr().err
    assert main([*run, "--restart"]) == 0
    err = capsys.readouterr().err
    url = f"sqlite:///{tmp_path / 'r' / 'pokestudy.db'}"
    names = {s.study_name for s in optuna.get_all_study_summaries(url)}
    archived = [n for n in names if n.startswith("folder.archived-")]
    assert "folder" in names and len(archived) == 1 and archived[0] in err
    old, new = (StudyRecord.from_study(optuna.load_study(study_name=n, storage=url)) for n in (archived[0], "folder"))
    assert old.identity["digest"] != new.identity["digest"]
    assert len(optuna.load_study(study_name=archived[0], storage=url).trials) == 1

