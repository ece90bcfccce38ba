"""Replicates: each one resamples the split (and seeds everything else), conditions of one replicate share
it; a wall-clock budget stops between trials and a rerun continues; tuning never grades its own trials."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from pokestudy.cli import main
from pokestudy.data import pool
from pokestudy.study import record, runner, spec
from pokestudy.study.record import StudyRecord, TrialRecord
from tests.conftest import cli, pokestudy
from tests.test_study import write_spec


def _test_images(data) -> set[bytes]:
    return {x.numpy().tobytes() for x in data.sets["test"][0]}


@pytest.mark.fast
def test_each_replicate_has_its_own_split_and_every_split_keeps_groups_whole():
    data = pool("synthetic:classes=4,per_class=24,size=32", 32)
    first, second, again = data.split(0), data.split(1), data.split(0)
    assert _test_images(first) != _test_images(second), "another replicate holds out other images"
    assert _test_images(first) == _test_images(again), "a replicate's split is deterministic"
    groups = torch.from_numpy(data.groups)
    labels = torch.from_numpy(data.labels)
    for seed in range(6):
        split = data.split(seed)
        assert sum(len(y) for _, y in (split.sets[s] for s in ("train", "val", "test"))) == len(labels)
    # groups: a pool whose images come in pairs of one group never puts a pair on two sides
    paired = type(data)(**{**vars(data), "groups": (torch.arange(len(labels)) // 2).numpy()})
    for seed in range(6):
        split = paired.split(seed)
        sides = {}
        for s in ("train", "val", "test"):
            for x in split.sets[s][0]:
                i = next(i for i in range(len(labels)) if torch.equal(torch.from_numpy(paired.images[i]), x))
                sides.setdefault(i // 2, set()).add(s)
        assert all(len(v) == 1 for v in sides.values()), f"split {seed} cut a group in two"
    assert len(groups) == len(labels)


@pytest.mark.fast
def test_the_split_mode_and_replicates_are_in_the_identity_and_the_spec(tmp_path: Path):
    resample = spec.load(str(write_spec(tmp_path, name="r")))
    fixed = spec.load(str(write_spec(tmp_path, name="f", data={**resample.data.model_dump(), "split": "fixed"})))
    manifest = pool(resample.data.source, resample.data.res).manifest
    a, b = record.identity(resample, manifest), record.identity(fixed, manifest)
    assert a["digest"] != b["digest"]
    assert "data.split: resample → (none)" in record.differences(a, b)
    assert [w.split_seed for w in resample.trials() if w.condition == resample.conditions()[0]] == [0, 1]
    assert {w.split_seed for w in fixed.trials()} == {0}
    three = spec.load(str(write_spec(tmp_path, name="n", seeds=[], replicates=3)))
    assert three.replicate_seeds() == [0, 1, 2]
    adaptive = spec.load(str(write_spec(tmp_path, name="a", seeds=[], replicates={"min": 3, "max": 6})))
    assert adaptive.replicate_seeds() == [0, 1, 2] and adaptive.replicate_seeds(9) == list(range(6))


def test_conditions_of_one_replicate_share_its_split_and_the_record_says_which(smoke_run):
    url, _ = smoke_run
    records = [TrialRecord.from_trial(t) for t in optuna.load_study(study_name="smoke", storage=url).trials]
    by_seed: dict[int, set[int]] = {}
    for r in records:
        by_seed.setdefault(r.seed, set()).add(r.split_seed)
    assert by_seed == {0: {0}, 1: {1}}, "one split per replicate, another for the next"
    info = StudyRecord.from_study(optuna.load_study(study_name="smoke", storage=url))
    assert info.identity["data"]["split"] == "resample"


def _trials(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as con:
        return con.execute("select state, value_json from trials join trial_user_attributes using (trial_id) "
                           "where key = 'key'").fetchall()


def test_a_budget_stops_between_trials_exits_0_and_the_rerun_continues(tmp_path: Path, ray_local, capsys):
    """The budgeted run is a process of its own (its clock counts Ray's start too); the rerun and the listing run
    in-process, on the session's Ray."""
    db = tmp_path / "pokestudy.db"
    # smoke at 4x its epochs: 16 trials one at a time outlast 30 s on a quiet machine (at 8 epochs they fit in 20 s)
    smoke = str(write_spec(tmp_path, fixed={**spec.load("smoke").fixed, "epochs": 32}))
    short = pokestudy("run", "--study", smoke, "--results", str(tmp_path), "--budget", "30s", "--max-concurrent", "1")
    assert short.returncode == 0, short.stderr
    assert "budget spent after" in short.stderr and "rerun with a larger --budget to continue" in short.stderr
    states = [state for state, _ in _trials(db)]
    assert 0 < states.count("COMPLETE") < 16 and "RUNNING" not in states, "whole trials, and not all of them"
    stored = optuna.load_study(study_name="smoke", storage=f"sqlite:///{db}")
    assert StudyRecord.from_study(stored).provenance.budget.spent
    assert "stopped on its budget" in (tmp_path / "smoke" / "summary.md").read_text()
    rest = cli(capsys, "run", "--study", smoke, "--results", str(tmp_path))
    assert rest.returncode == 0, rest.stderr
    assert f"16 trials, {states.count('COMPLETE')} already done" in rest.stderr
    last = [line for line in rest.stderr.splitlines() if line.startswith("trials ")][-1]
    assert last.startswith("trials 16/16 done · 0 running · 0 failed"), "the last trial stored is not running"
    assert [state for state, _ in _trials(db)].count("COMPLETE") == 16
    studies = cli(capsys, "studies", "--results", str(tmp_path))
    assert "replicates 2 done / 2" in studies.stdout, studies.stdout
    with pytest.raises(SystemExit) as bad:  # argparse's exit, as the console script exits
        main(["run", "--study", "smoke", "--results", str(tmp_path), "--budget", "soon"])
    assert bad.value.code == 2 and "is not a duration" in capsys.readouterr().err


def test_tuning_trials_use_seeds_no_replicate_uses_and_each_condition_its_own_sampler(tmp_path: Path, ray_local):
    path = write_spec(tmp_path, name="tiny-tune2", seeds=[0, 1],
                      factors={"arch": ["cnn"], "augment": ["none", "paper"]},
                      nuisance={"params": {"lr": {"low": 0.001, "high": 0.1, "log": True}}, "trials": 2,
                                "sampler": "random"},
                      fixed={"width": 4, "epochs": 2, "batch_size": 16})
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    runner.run_study(spec.load(str(path)), storage=url, results=tmp_path, study_name="tiny-tune2")
    first = {}
    for augment in ("none", "paper"):
        tuning = optuna.load_study(study_name=f"tiny-tune2.tune.arch=cnn,augment={augment}", storage=url)
        seeds = {TrialRecord.from_trial(t).seed for t in tuning.get_trials(states=(TrialState.COMPLETE,))}
        assert seeds and not seeds & {0, 1}, "no replicate is a tuning trial graded again"
        first[augment] = tuning.trials[0].params["lr"]
    assert first["none"] != first["paper"], "each condition's sampler starts from its own random point"


def test_an_adaptive_study_runs_its_pilot_then_the_replicates_its_variance_asks_for(tmp_path: Path, ray_local):
    from pokestudy.report import power, tables, verdicts

    path = write_spec(tmp_path, name="adaptive", seeds=[], replicates={"min": 3, "max": 4},
                      factors={"arch": ["cnn"], "augment": ["none", "paper"]},
                      fixed={"width": 4, "epochs": 1, "batch_size": 16})
    study = spec.load(str(path))
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    stored = runner.run_study(study, storage=url, results=tmp_path, study_name="adaptive")
    df = tables.read(stored).frame
    pilot = df[df["seed"] < 3]
    wanted = power.plan(verdicts.analyse(pilot, study.report).differences.values(), study.report.delta / 100,
                        verdicts.analyse(pilot, study.report).size, 4)
    assert wanted == 4, "one epoch of a tiny model is far too noisy for 3 replicates to decide ±2 points"
    assert sorted(df["seed"].unique()) == list(range(wanted)) and stored.user_attrs["replicates_planned"] == wanted
    assert len(df) == 2 * wanted, "whole replicates: every condition of each"
    again = runner.run_study(study, storage=url, results=tmp_path, study_name="adaptive")  # planned again alike
    assert len(again.get_trials(states=(TrialState.COMPLETE,))) == 2 * wanted


@pytest.mark.fast
def test_a_study_stored_before_resampled_splits_reads_as_one_fixed_split():
    old = spec.load("smoke").model_dump(mode="json")
    del old["data"]["split"]  # what the previous release stored
    assert StudyRecord(spec=old, identity={}, data={}, provenance={}).study.data.split == "fixed"
    new = spec.load("smoke").model_dump(mode="json")
    assert StudyRecord(spec=new, identity={}, data={}, provenance={}).study.data.split == "resample"


def test_an_adaptive_study_whose_pilot_trial_fails_stops_and_says_so(tmp_path: Path, ray_local, capsys):
    path = write_spec(tmp_path, name="adaptive-fail", seeds=[], replicates={"min": 3, "max": 4},
                      factors={"lr": [0.01, 1e30]}, fixed={"arch": "cnn", "width": 4, "epochs": 1, "batch_size": 16})
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    stored = runner.run_study(spec.load(str(path)), storage=url, results=tmp_path, study_name="adaptive-fail")
    assert "a pilot trial failed, so the rest cannot be planned" in capsys.readouterr().err
    assert len(stored.get_trials(states=(TrialState.FAIL,))) == 3, "each diverging trial ran once, not forever"
    assert "replicates_planned" not in stored.user_attrs
