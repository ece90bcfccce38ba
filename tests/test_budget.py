"""Equal training: the budget check (labels at B and k·B) and the training-length check, on real SQLite
records of known properties, and the budget check's trials through real Ray."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pokestudy.study.spec import Study
from tests.conftest import cli
from tests.test_report import NOISE, _summary

DATA = {"source": "synthetic:classes=4,per_class=12,size=32", "res": 32}


def _store(tmp_path: Path, raw: dict, outcome) -> None:
    """Every trial of the spec (budget check included) stored by the real store, with
    `outcome(condition, seed, budget) -> (train_acc, test_acc, epochs)`."""
    from pokestudy.data import prepare
    from pokestudy.study.record import StudyRecord, identity, now, provenance
    from pokestudy.study.store import Store, artifact_store, grid_distributions

    spec = Study.model_validate(raw)
    data = prepare(spec.data.source, spec.data.res)
    record = StudyRecord(spec=spec.model_dump(mode="json"), identity=identity(spec, data.manifest),
                         data=data.manifest, provenance=provenance(data.manifest, 1, now()))
    store = Store(f"sqlite:///{tmp_path / 'pokestudy.db'}", spec.name, record, artifact_store(tmp_path))
    plan = spec.trials()
    for work in plan:
        store.start(work, grid_distributions(plan))
        train, test, epochs = outcome(work.condition, work.seed, work.budget)
        store.complete(work, _summary(train, test, True, predictions=len(data.sets["test"][1]), epochs=epochs))


@pytest.mark.fast
def test_the_budget_check_runs_longer_trials_for_the_stated_seeds():
    spec = Study.model_validate({"name": "b", "data": DATA, "factors": {"arch": ["cnn", "resnet"]},
                                 "fixed": {"epochs": 7}, "seeds": [4, 5, 6],
                                 "budget_check": {"factor": 2, "seeds": 2}})
    works = spec.trials()
    longer = [w for w in works if w.budget != 1]
    assert len(works) == 6 + 4 and {(w.condition["arch"], w.seed) for w in longer} == {
        (a, s) for a in ("cnn", "resnet") for s in (4, 5)}
    assert all(w.settings["epochs"] == 14 and w.key.endswith("/budget=2x") for w in longer)
    assert len({w.key for w in works}) == len(works), "every trial has its own key"
    assert spec.design() == Study.model_validate({**spec.model_dump(), "budget_check": None}).design(), \
        "the check adds trials and changes none: not part of the identity"
    assert [w.budget for w in works] == [1] * 6 + [2] * 4, "a fixed design checks its budget last"


@pytest.mark.fast
def test_an_adaptive_study_checks_its_budget_right_after_its_pilot():
    """A budget too short makes every label 'budget too short', which no further replicate can lift: the
    plan puts the check before the replicates the pilot planned (the runner feeds trials in this order)."""
    spec = Study.model_validate({"name": "b", "data": DATA, "factors": {"arch": ["cnn", "resnet"]},
                                 "fixed": {"epochs": 7}, "replicates": {"min": 3, "max": 6},
                                 "budget_check": {"factor": 2, "seeds": 1}})
    works = spec.trials(planned=5)
    assert [(w.seed, w.budget) for w in works] == [(s, 1) for s in (0, 0, 1, 1, 2, 2)] + [(0, 2)] * 2 + [
        (s, 1) for s in (3, 3, 4, 4)]
    assert [w.budget for w in spec.trials()] == [1] * 6 + [2] * 2, "the pilot alone: the check after it"
    wide = Study.model_validate({**spec.model_dump(), "budget_check": {"factor": 2, "seeds": 4}})
    assert [(w.seed, w.budget) for w in wide.trials(planned=5)][6:] == [(s, 2) for s in (0, 0, 1, 1, 2, 2)] + [
        (3, 1), (3, 1), (4, 1), (4, 1), (3, 2), (3, 2)], "a planned replicate's check comes after the replicate"


@pytest.mark.fast
def test_a_claim_whose_label_changes_at_twice_the_budget_is_budget_dependent(tmp_path: Path, capsys):
    raw = {"name": "budgets", "data": DATA, "seeds": [0, 1, 2, 3], "fixed": {"width": 4, "epochs": 5},
           "factors": {"treatment": {"ref": {}, "early": {"dropout": 0.1}, "robust": {"dropout": 0.2},
                                     "noisy": {"dropout": 0.3}}},
           "budget_check": {"factor": 2, "seeds": 3}}

    def outcome(condition: dict, seed: int, budget: float) -> tuple[float, float, int]:
        test = 0.60 + NOISE[seed]
        if condition["treatment"] == "robust" or (condition["treatment"] == "early" and budget == 1):
            test += 0.10  # narrows the gap by 10 points; "early" only while trained for the short budget
        if condition["treatment"] == "noisy":
            test += 0.08 if seed % 2 else -0.08  # no effect on average, too noisy for 3 replicates to decide
        return 1.0, test, round(5 * budget)

    _store(tmp_path, raw, outcome)
    out = cli(capsys, "report", "--study", "budgets", "--results", str(tmp_path))
    assert out.returncode == 0, out.stderr
    check = pd.read_csv(tmp_path / "budgets" / "budget_check.csv").set_index("claim")
    assert check.loc["treatment=early vs ref", "budget_check"] == "budget-dependent"
    assert check.loc["treatment=early vs ref", "verdict_at_2x"] != "closes the gap"
    assert check.loc["treatment=robust vs ref", "budget_check"] == "holds"
    assert check.loc["treatment=noisy vs ref", "budget_check"] == "undecided at both budgets", \
        "two inconclusive labels are no evidence that the budget was enough"
    assert (check["replicates"] == 3).all(), "both budgets are labelled on the same 3 replicates"
    verdicts = pd.read_csv(tmp_path / "budgets" / "verdicts.csv").set_index("claim")
    assert verdicts.loc["treatment=early vs ref", "verdict"] == "closes the gap", "the study's budget, 4 seeds"
    assert verdicts.loc["treatment=early vs ref", "budget_check"] == "budget-dependent"
    summary = (tmp_path / "budgets" / "summary.md").read_text()
    assert ("of 3 claims: 1 holds, 1 budget-dependent, 1 undecided at both budgets. "
            "Budget-dependent: treatment=early vs ref (closes the gap →") in summary
    trials = pd.read_csv(tmp_path / "budgets" / "trials.csv")
    assert sorted(trials["budget"].unique()) == [1, 2] and (trials[trials["budget"] == 2]["epochs"] == 10).all()


@pytest.mark.fast
def test_the_summary_shows_the_pilot_that_chose_the_budget(tmp_path: Path, capsys):
    pilot = {"name": "pilot", "data": DATA, "seeds": [0], "fixed": {"width": 4},
             "factors": {"arch": ["cnn", "resnet"], "epochs": [5, 10]}}
    _store(tmp_path, pilot, lambda c, s, b: (1.0, {"5": 0.4, "10": 0.6}[c["epochs"]], int(c["epochs"])))
    main = {"name": "main", "data": DATA, "seeds": [0, 1, 2], "fixed": {"width": 4, "epochs": 10},
            "factors": {"arch": ["cnn", "resnet"]}, "budget_check": {"seeds": 1, "pilot": "pilot"}}
    _store(tmp_path, main, lambda c, s, b: (1.0, 0.5 + NOISE[s], round(10 * b)))
    assert cli(capsys, "report", "--study", "main", "--results", str(tmp_path)).returncode == 0
    summary = (tmp_path / "main" / "summary.md").read_text()
    assert "**The budget's pilot** (study `pilot`)" in summary
    section = summary[summary.index("**The budget's pilot**"):].split("\n\n")[1]  # the pilot's table
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]] for line in section.splitlines()
            if line.startswith(("| cnn", "| resnet"))}
    assert rows == {"cnn": ["40", "60"], "resnet": ["40", "60"]}, "validation accuracy in % at 5 and 10 epochs"
    assert "Budget check: not checked" in summary, "one replicate at 2x: too few replicates to label, so not checked"


@pytest.mark.fast
def test_training_length_that_predicts_test_accuracy_within_a_condition_is_flagged(tmp_path: Path, capsys):
    raw = {"name": "lengths", "data": DATA, "seeds": list(range(8)), "fixed": {"width": 4},
           "factors": {"treatment": {"a": {}, "b": {"dropout": 0.1}}}}

    def outcome(condition: dict, seed: int, budget: float) -> tuple[float, float, int]:
        epochs = 4 + seed  # an adaptive rule let some trials of each condition train longer ...
        if condition["treatment"] == "a":
            return 1.0, 0.50 + 0.02 * seed, epochs  # ... and in `a` the longer ones did better
        return 1.0, 0.55 + [0.01, -0.01][seed % 2], epochs  # in `b` length and result are unrelated

    _store(tmp_path, raw, outcome)
    out = cli(capsys, "report", "--study", "lengths", "--results", str(tmp_path))
    assert out.returncode == 0, out.stderr
    summary = (tmp_path / "lengths" / "summary.md").read_text()
    assert "**Training length varies** within 2 condition(s); it predicts test accuracy" in summary
    assert "in treatment=a: those conditions' results depend on when training stopped" in summary


@pytest.mark.fast
def test_a_fixed_schedule_says_training_length_cannot_predict_a_result(tmp_path: Path, capsys):
    raw = {"name": "fixed", "data": DATA, "seeds": [0, 1, 2], "fixed": {"width": 4},
           "factors": {"treatment": {"a": {}, "b": {"dropout": 0.1}}}}
    _store(tmp_path, raw, lambda c, s, b: (1.0, 0.5 + NOISE[s], 5))
    assert cli(capsys, "report", "--study", "fixed", "--results", str(tmp_path)).returncode == 0
    summary = (tmp_path / "fixed" / "summary.md").read_text()
    assert "all trials trained the same number of epochs under the same fixed schedule" in summary
    assert "**Budget check: not run**" in summary
    assert "warm-up over 1 epoch(s), then cosine decay to 0" in summary


def test_a_study_with_a_budget_check_runs_its_longer_trials_on_ray(ray_local, tmp_path: Path):
    from pokestudy.study import runner

    spec = Study.model_validate({"name": "twice", "data": DATA, "factors": {"augment": ["none", "paper"]},
                                 "fixed": {"width": 4, "epochs": 2, "batch_size": 16, "lr": 0.01},
                                 "seeds": [0, 1, 2], "budget_check": {"factor": 2, "seeds": 1}})
    url = f"sqlite:///{tmp_path / 'pokestudy.db'}"
    study = runner.run_study(spec, storage=url, results=tmp_path, study_name="twice")
    from pokestudy.study.record import TrialRecord

    records = [TrialRecord.from_trial(t) for t in study.trials]
    assert sorted((r.budget, r.epochs) for r in records) == [(1.0, 2)] * 6 + [(2.0, 4)] * 2
    assert all(len(r.history["lr"]) == r.epochs for r in records)
