"""Report: tables, figures and the dashboard note, rebuilt from the storage alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from PIL import Image

from pokestudy import UserError
from pokestudy.study.record import TrialRecord
from tests.conftest import cli, pokestudy
from tests.test_reliability import assert_one_line_error


@pytest.fixture(scope="module")
def report(smoke_run, tmp_path_factory) -> Path:
    """`pokestudy report` on a *copy* of the smoke study's results folder (database and artifact store),
    as a user would run it."""
    url, results = smoke_run
    copy = tmp_path_factory.mktemp("copy")
    shutil.copy(results / "pokestudy.db", copy / "pokestudy.db")
    shutil.copytree(results / ".artifacts", copy / ".artifacts")
    out = pokestudy("report", "--study", "smoke", "--results", str(copy))
    assert out.returncode == 0, out.stderr
    return copy / "smoke"


@pytest.mark.fast
def test_a_table_cell_matches_a_recomputation_from_the_raw_trials(tmp_path: Path):
    from scipy import stats as sps

    from pokestudy.report import analyse, tables

    raw = {"name": "cells", "data": {"source": "synthetic:classes=4,per_class=12,size=32", "res": 32},
           "factors": {"arch": ["cnn", "resnet"], "augment": ["none", "paper"]}, "seeds": [0, 1, 2, 3],
           "fixed": {"width": 4}}
    url, _ = _stored_study(tmp_path, raw, lambda c, s: (0.9 + 0.02 * s, 0.6 + 0.05 * (c["augment"] == "paper")
                                                        + [0.01, -0.02, 0.015, 0.0][s], True))
    cell = {"arch": "resnet", "augment": "paper"}
    records = [TrialRecord.from_trial(t) for t in optuna.load_study(study_name="cells", storage=url).get_trials()]
    gaps = np.array([r.final["train_acc"] - r.final["test_acc"] for r in records if r.condition == cell])
    lo, hi = sps.t.interval(0.95, len(gaps) - 1, loc=gaps.mean(), scale=sps.sem(gaps))
    real = sps.t.interval(1 - 0.05 / 4, len(gaps) - 1, loc=gaps.mean(), scale=sps.sem(gaps))  # 4 conditions
    done = analyse(url, "cells")
    tables.export(done.table, tmp_path, "gap", ("csv", "md"))
    table = pd.read_csv(tmp_path / "gap.csv")
    row = table[(table.arch == "resnet") & (table.augment == "paper")].iloc[0]
    assert row["seeds"] == len(gaps) == 4
    assert (row["gap_mean"], row["gap_lo"], row["gap_hi"]) == pytest.approx((gaps.mean(), lo, hi), abs=1e-5)
    assert row["gap_real"] == f"yes [{100 * real[0]:+.1f}, {100 * real[1]:+.1f}]", "corrected for 4 conditions"
    assert f"{100 * gaps.mean():.1f} ± {100 * (hi - lo) / 2:.1f}" in (tmp_path / "gap.md").read_text()
    two = tables.gap_table(done.trials.frame[done.trials.frame["seed"] < 2])
    assert two["gap_lo"].isna().all() and (two["gap_real"] == "n/a: 2 seed(s), need 3").all(), "no interval from 2"


def test_every_format_figure_and_the_summary_are_written(report: Path):
    for stem in ("gap", "verdicts"):
        for fmt in ("csv", "md", "tex", "json"):
            assert (report / f"{stem}.{fmt}").stat().st_size > 0
    json.loads((report / "gap.json").read_text())
    assert "\\begin{tabular}" in (report / "gap.tex").read_text()
    for png in ("curves", "gap", "tradeoff", "effects_over_epochs", "predictions", "confusions"):
        with Image.open(report / f"{png}.png") as im:
            assert im.width > 300 and im.height > 200
    summary = (report / "summary.md").read_text()
    assert summary.index("## Verdicts") < summary.index("## Per condition") < summary.index("## Provenance")
    verdicts = pd.read_csv(report / "verdicts.csv")
    assert list(verdicts["claim"]) == ["arch=resnet vs cnn", "augment=paper vs none", "regularization=strong vs none",
                                       "(arch=resnet − cnn) at augment=paper vs none"]
    for claim in verdicts["claim"]:
        assert f"**{claim}**" in summary
    assert "pokestudy 0.1.0" in summary and "torch 2." in summary and "cores" in summary


def test_dashboard_note_and_figure_artifacts_survive_a_second_report(report: Path, capsys):
    from optuna.artifacts import get_all_artifact_meta
    from optuna_dashboard import get_note

    results = report.parent
    url = f"sqlite:///{results / 'pokestudy.db'}"
    study = optuna.load_study(study_name="smoke", storage=url)
    note = get_note(study)
    assert "## Verdicts" in note and "pokestudy report --study smoke" in note
    first = {m.filename: m.artifact_id for m in get_all_artifact_meta(study)}
    assert sorted(first) == ["confusions.png", "curves.png", "effects_over_epochs.png", "gap.png",
                              "predictions.png", "tradeoff.png"]
    (report / "gap.png").unlink()
    assert cli(capsys, "report", "--study", "smoke", "--results", str(results)).returncode == 0
    again = {m.filename: m.artifact_id for m in get_all_artifact_meta(study)}  # Optuna's own API still reads them
    assert again == first, "re-reporting replaces a figure's bytes under the same id, never duplicates"
    stored = results / ".artifacts" / first["gap.png"]
    assert stored.read_bytes() == (report / "gap.png").read_bytes()


@pytest.mark.fast
@pytest.mark.parametrize("study, message", [("nope", "no study 'nope' in sqlite:///"),
                                            ("empty", "study 'empty' has no finished trials yet")])
def test_report_on_an_unknown_or_empty_study_is_one_line_exit_2(tmp_path: Path, study: str, message: str, capsys):
    from pokestudy.cli import main

    raw = {"name": "empty", "data": {"source": "synthetic:classes=4,per_class=12,size=32", "res": 32},
           "factors": {"arch": ["cnn", "resnet"]}, "seeds": [0, 1, 2], "fixed": {"width": 4}}
    _stored_study(tmp_path, raw, None)  # a pokestudy study whose every trial failed: nothing finished to report
    assert main(["report", "--study", study, "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert message in err and "Traceback" not in err


def _summary(train: float, test: float, converged: bool, predictions: int, epochs: int = 5,
             train_images: int = 100) -> dict:
    """What `run_trial` returns, for a trial that ramps up to `train` / `test` accuracy."""
    history = []
    for e in range(1, epochs + 1):
        f = e / epochs
        r = {"epoch": e, "lr": 0.01, "train_acc_augmented": train * f, "train_acc": train * f, "val_acc": test * f,
             "test_acc": test * f, "train_loss": 1 - f, "val_loss": 1.0, "test_loss": 1.0, "seconds": float(e),
             "images_per_s": 100.0, "train_images": train_images, "steps": 10 * e, "train_eval_n": train_images}
        r["gap"] = r["train_acc"] - r["test_acc"]
        history.append(r)
    rises = {"train_acc_rise": 0.0 if converged else 0.1, "val_acc_rise": 0.0 if converged else 0.1}
    return {"final": {**history[-1], **rises}, "best": history[-1], "history": history, "converged": converged,
            "test_predictions": [0] * predictions}


def _stored_study(tmp_path: Path, raw: dict, outcome) -> tuple[str, Path]:
    """A study in a real SQLite storage, written by the real store from trial summaries with known
    properties: `outcome(condition, seed) -> (train_acc, test_acc, converged)`; None: every trial failed."""
    from pokestudy.data import prepare
    from pokestudy.study.record import StudyRecord, identity, now, provenance
    from pokestudy.study.spec import Study
    from pokestudy.study.store import Store, artifact_store, grid_distributions

    spec = Study.model_validate(raw)
    data = prepare(spec.data.source, spec.data.res, near_duplicates=spec.data.near_duplicates)
    url = f"sqlite:///{tmp_path / 'pokestudy.db'}"
    record = StudyRecord(spec=spec.model_dump(mode="json"), identity=identity(spec, data.manifest),
                         data=data.manifest, provenance=provenance(data.manifest, 1, now()))
    store = Store(url, spec.name, record, artifact_store(tmp_path))
    plan = spec.trials()
    for work in plan:
        store.start(work, grid_distributions(plan))
        if outcome is None:
            store.fail(work.key, "loss became nan")
            continue
        images = round(len(data.sets["train"][1]) * float(work.settings.get("train_fraction", 1)))
        store.complete(work, _summary(*outcome(work.condition, work.seed), predictions=len(data.sets["test"][1]),
                                      train_images=images))
    return url, tmp_path


NOISE = [0.01, -0.01, 0.005, -0.005]


@pytest.mark.fast
def test_verdict_labels_follow_the_evidence(tmp_path: Path, capsys):
    raw = {"name": "labels", "data": {"source": "synthetic:classes=4,per_class=12,size=32", "res": 32},
           "factors": {"treatment": {"ref": {}, "clear": {"dropout": 0.1}, "null": {"dropout": 0.2},
                                     "noisy": {"dropout": 0.3}, "stuck": {"dropout": 0.4}}},
           "seeds": [0, 1, 2, 3], "fixed": {"width": 4}}

    def outcome(condition: dict, seed: int) -> tuple[float, float, bool]:
        e = NOISE[seed]
        return {"ref": (1.0, 0.60 + e, True),
                "clear": (0.95, 0.65 + e, True),  # gap −10 points, test +5
                "null": (1.0, 0.60 + e + [0.002, -0.002, 0.001, -0.001][seed], True),  # no effect, small noise
                "noisy": (1.0, 0.60 + e + [0.10, -0.10, 0.08, -0.06][seed], True),  # no effect, large noise
                "stuck": (0.95, 0.65 + e, False)}[condition["treatment"]]  # as clear, but still learning at the end

    _stored_study(tmp_path, raw, outcome)
    out = cli(capsys, "report", "--study", "labels", "--results", str(tmp_path))
    assert out.returncode == 0, out.stderr
    verdicts = pd.read_csv(tmp_path / "labels" / "verdicts.csv").set_index("claim")["verdict"].to_dict()
    assert verdicts == {"treatment=clear vs ref": "closes the gap",
                        "treatment=null vs ref": "equivalent within ±2 points",
                        "treatment=noisy vs ref": "inconclusive",
                        "treatment=stuck vs ref": "inconclusive: budget too short"}
    gap = pd.read_csv(tmp_path / "labels" / "gap.csv").set_index("treatment")
    assert gap.loc["stuck", "converged"] == "no (0/4)" and gap.loc["ref", "converged"] == "yes"
    assert gap.loc["ref", "gap_real"].startswith("yes")
    summary = (tmp_path / "labels" / "summary.md").read_text()
    assert summary.index("**treatment=clear vs ref** — closes the gap") < summary.index("## Per condition")
    assert "test accuracy rises" in summary


@pytest.mark.fast
def test_a_report_on_a_study_of_other_factors_names_its_own_factors(tmp_path: Path, capsys):
    raw = {"name": "custom", "data": {"source": "synthetic:classes=4,per_class=12,size=32", "res": 32},
           "factors": {"width": [4, 8], "dropout": [0.0, 0.3]}, "seeds": [0, 1, 2],
           "report": {"interactions": [["width", "dropout"]]}}

    def outcome(condition: dict, seed: int) -> tuple[float, float, bool]:
        return 1.0, 0.5 + 0.1 * (condition["width"] == "8") + NOISE[seed], True

    _stored_study(tmp_path, raw, outcome)
    out = cli(capsys, "report", "--study", "custom", "--results", str(tmp_path))
    assert out.returncode == 0, out.stderr
    claims = pd.read_csv(tmp_path / "custom" / "verdicts.csv")["claim"].tolist()
    assert claims == ["width=8 vs 4", "dropout=0.3 vs 0.0", "(width=8 − 4) at dropout=0.3 vs 0.0"]
    gap = pd.read_csv(tmp_path / "custom" / "gap.csv")
    assert list(gap.columns[:2]) == ["width", "dropout"] and len(gap) == 4
    summary = (tmp_path / "custom" / "summary.md").read_text().split("## Provenance")[0]  # hashes vary
    assert "arch" not in summary and "augment" not in summary and "For comparison" not in summary
    for png in ("curves", "gap", "tradeoff", "effects_over_epochs", "predictions"):
        assert (tmp_path / "custom" / f"{png}.png").stat().st_size > 5000


@pytest.mark.fast
def test_the_gap_against_data_size_gets_a_power_law_and_an_extrapolation_or_a_refusal(tmp_path: Path, capsys):
    raw = {"name": "sizes", "data": {"source": "synthetic:classes=4,per_class=24,size=32", "res": 32},
           "factors": {"arch": ["cnn", "resnet"], "train_fraction": [0.125, 0.25, 0.5, 1.0]},
           "seeds": [0, 1, 2], "fixed": {"width": 4}}
    per_class_at_full = 64 / 4  # synthetic 4 x 24, 70% to train: 64 training images, 16 per class

    def outcome(condition: dict, seed: int) -> tuple[float, float, bool]:
        n = per_class_at_full * float(condition["train_fraction"])
        gap = 0.8 * n ** -0.5 * (1 + NOISE[seed]) if condition["arch"] == "cnn" else 0.3 + NOISE[seed]
        return 1.0, 1.0 - gap, True  # cnn: gap = 0.8 n^-0.5, 10 points at n = 64; resnet: no trend

    _stored_study(tmp_path, raw, outcome)
    out = cli(capsys, "report", "--study", "sizes", "--results", str(tmp_path))
    assert out.returncode == 0, out.stderr
    fits = pd.read_csv(tmp_path / "sizes" / "scaling.csv").set_index("arch")
    cnn, resnet = fits.loc["cnn"], fits.loc["resnet"]
    assert abs(-cnn["power_slope"] - 0.5) < 0.05 and cnn["n_target_lo"] < 64 < cnn["n_target_hi"]
    assert cnn["form"] == "power law" and cnn["loglinear_status"].startswith("rejected")
    assert resnet["n_target"] != resnet["n_target"] and resnet["extrapolation"].startswith("refused")
    summary = (tmp_path / "sizes" / "summary.md").read_text()
    assert "set by the factor `train_fraction`" in summary
    assert "The gap would fall to 10 points at ≈ 64 images per class [" in summary
    assert "an extrapolation 4× beyond the largest size measured" in summary
    assert "**arch=resnet** (2–16 images per class)" in summary
    assert (tmp_path / "sizes" / "scaling.png").stat().st_size > 5000
    from pokestudy.report.scaling import fit_forms

    clustered = np.log(np.repeat([4.0, 4.5, 5.0, 10.0], 3))  # e.g. one animation or two per class: two sizes
    refused = fit_forms(clustered, 0.8 * np.exp(clustered) ** -0.5, np.tile([0, 1, 2], 4), True, 0.95)["extrapolation"]
    assert refused.startswith("refused: 2 distinct sizes")


@pytest.mark.fast
def test_compare_two_runs_of_one_design_on_different_data_rules(tmp_path: Path, capsys):
    raw = {"name": "exact", "data": {"source": "synthetic:classes=4,per_class=12,size=32", "res": 32},
           "factors": {"arch": ["cnn", "resnet"]}, "seeds": [0, 1, 2], "fixed": {"width": 4}}
    _stored_study(tmp_path, raw, lambda c, seed: (1.0, 0.70 + NOISE[seed], True))
    near = {**raw, "name": "near", "data": {**raw["data"], "near_duplicates": 12}}
    _stored_study(tmp_path, near, lambda c, seed: (1.0, 0.70 + NOISE[seed] - 0.1 * (c["arch"] == "cnn"), True))
    out = cli(capsys, "compare", "exact", "near", "--results", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "**arch=cnn**, test accuracy: 70.2 (exact) → 60.2 (near), -10.0 points [" in out.stdout
    table = pd.read_csv(tmp_path / "exact-vs-near" / "comparison.csv").set_index(["condition", "metric"])["verdict"]
    assert table.to_dict() == {("arch=cnn", "test_acc"): "lower", ("arch=cnn", "gap"): "higher",
                               ("arch=resnet", "test_acc"): "inconclusive",
                               ("arch=resnet", "gap"): "inconclusive"}  # the verdicts' labeller: no third wording
    summary = (tmp_path / "exact-vs-near" / "summary.md").read_text()
    assert "What differs: data.near_duplicates: (none) → 12." in summary and "4 claims" in summary
    other = {**raw, "name": "other", "factors": {"width": [4, 8]}, "fixed": {}}
    _stored_study(tmp_path, other, lambda c, seed: (1.0, 0.7, True))
    out = cli(capsys, "compare", "exact", "other", "--results", str(tmp_path))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "different factors" in out.stderr


@pytest.mark.fast
def test_a_full_record_round_trips_through_sqlite_into_the_reports_frame(tmp_path: Path):
    from pokestudy.report.tables import factors, read
    from pokestudy.study.record import StudyRecord

    raw = {"name": "roundtrip", "data": {"source": "synthetic:classes=4,per_class=12,size=32", "res": 32},
           "factors": {"arch": ["cnn", "resnet"]}, "seeds": [0, 1, 2], "fixed": {"width": 4}}
    url, _ = _stored_study(tmp_path, raw, lambda c, s: (0.9, 0.5 + NOISE[s], s != 2))
    study = optuna.load_study(study_name="roundtrip", storage=url)
    trials = read(study)
    df = trials.frame
    assert trials.record == StudyRecord.from_study(study) and factors(df) == ["arch"] and trials.ignored == 0
    for t in study.trials:
        r = TrialRecord.from_trial(t)
        row = df[df["trial"] == t.number].iloc[0]
        assert (row["factor:arch"], row["seed"], row["converged"], row["epochs"]) == (r.condition["arch"], r.seed,
                                                                                        r.converged, r.epochs)
        assert {k: row[k] for k in r.final} == r.final and row["history"] == r.history
        assert t.user_attrs == r.display() | {"key": r.key, "identity": r.identity}
    with pytest.raises(UserError, match="has no pokestudy record"):
        TrialRecord.from_trial(optuna.trial.create_trial(value=1.0))
