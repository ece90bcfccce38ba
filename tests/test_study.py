"""Studies: specs validate with clear errors; Ray Tune runs the trials; Optuna keeps every epoch; reruns resume."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from pokestudy import UserError
from pokestudy.study import runner, spec
from tests.conftest import pokestudy

SMOKE = yaml.safe_load((spec.STUDIES_DIR / "smoke.yaml").read_text())


def write_spec(tmp_path: Path, **changes) -> Path:
    raw = {**SMOKE, **changes}
    path = tmp_path / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_every_shipped_spec_loads_and_says_what_it_answers():
    names = {p.stem for p in spec.available()}
    assert {"overfit", "smoke", "paper"} <= names
    for path in spec.available():
        study = spec.load(str(path))
        assert study.question and study.trials()
    overfit = spec.load("overfit")
    assert set(overfit.factors) >= {"arch", "augment", "regularization"} and len(overfit.seeds) >= 3
    assert set(overfit.factors["augment"]) == {"none", "paper", "paper-offline"}


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
def test_bad_specs_are_refused_with_one_line(tmp_path: Path, changes: dict, message: str):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        spec.load(str(write_spec(tmp_path, **changes)))


def test_yaml_syntax_error_and_unknown_study(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfactors: [unclosed\n")
    with pytest.raises(UserError, match="YAML syntax error"):
        spec.load(str(bad))
    with pytest.raises(UserError, match="no study 'nope'"):
        spec.load("nope")


def test_smoke_study_stores_every_trial_and_epoch_then_a_rerun_runs_nothing(smoke_run):
    url, results = smoke_run
    study = spec.load("smoke")
    stored = optuna.load_study(study_name="smoke", storage=url)
    trials = stored.get_trials()
    assert len(trials) == len(study.trials()) == 16
    assert all(t.state == TrialState.COMPLETE for t in trials)
    epochs = study.fixed["epochs"]
    for t in trials:
        a = t.user_attrs
        assert set(t.intermediate_values) == set(range(1, epochs + 1))
        for key in ("train_acc", "val_acc", "test_acc", "gap", "best_val_acc", "best_test_acc", "epochs",
                    "seconds", "images_per_s", "seed", "condition", "history"):
            assert key in a, key
        assert a["gap"] == pytest.approx(a["train_acc"] - a["test_acc"])
        assert len(a["history"]["val_acc"]) == epochs and t.value == max(a["history"]["val_acc"])
        assert {"arch", "augment", "regularization", "lr"} <= set(t.params)
    assert {"spec", "spec_hash", "data_manifest", "versions"} <= set(stored.user_attrs)
    assert len({t.user_attrs["key"] for t in trials}) == 16

    runner.run(study, storage=url, results=results, study_name="smoke")  # finished: nothing runs again
    assert len(optuna.load_study(study_name="smoke", storage=url).get_trials()) == 16


def test_a_diverging_trial_is_recorded_failed_and_the_study_finishes(tmp_path: Path, ray_local):
    path = write_spec(tmp_path, name="diverge", seeds=[0],
                      factors={"arch": ["cnn"], "lr": [0.01, 1e30]},
                      fixed={"width": 4, "epochs": 2, "batch_size": 16, "optimizer": "sgd"})
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    runner.run(spec.load(str(path)), storage=url, results=tmp_path, study_name="diverge")
    trials = {t.params["lr"]: t for t in optuna.load_study(study_name="diverge", storage=url).get_trials()}
    assert trials[0.01].state == TrialState.COMPLETE
    assert trials[1e30].state == TrialState.FAIL and "loss became" in trials[1e30].user_attrs["error"]


def _complete(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_kill_9_of_the_driver_then_rerun_ends_with_exactly_the_expected_trials(tmp_path: Path):
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
    out = pokestudy("run", "--study", "smoke", "--results", str(tmp_path))
    assert out.returncode == 0, out.stderr
    trials = optuna.load_study(study_name="smoke", storage=f"sqlite:///{db}").get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 16 and len({t.user_attrs["key"] for t in complete}) == 16
    assert "already done" in out.stderr
    assert (tmp_path / "smoke" / "gap.md").exists()


def test_nuisance_tuning_then_seeds_rerun_each_conditions_best_setting(tmp_path: Path, ray_local):
    path = write_spec(tmp_path, name="tiny-tune", seeds=[0, 1], factors={"arch": ["cnn"], "augment": ["none", "paper"]},
                      nuisance={"params": {"lr": {"low": 0.001, "high": 0.1, "log": True}}, "trials": 3, "asha_grace": 1},
                      fixed={"width": 4, "epochs": 3, "batch_size": 16})
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    runner.run(spec.load(str(path)), storage=url, results=tmp_path, study_name="tiny-tune")
    for augment in ("none", "paper"):
        tuning = optuna.load_study(study_name=f"tiny-tune.tune.arch=cnn,augment={augment}", storage=url)
        assert len(tuning.trials) == 3
        assert {t.state for t in tuning.trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
        best_lr = tuning.best_trial.params["lr"]
        assert 0.001 <= best_lr <= 0.1
        final = [t for t in optuna.load_study(study_name="tiny-tune", storage=url).trials
                 if t.params["augment"] == augment]
        assert len(final) == 2 and all(t.params["lr"] == best_lr for t in final)
