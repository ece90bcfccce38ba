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

from pokestudy.study.record import TrialRecord
from tests.conftest import pokestudy


@pytest.fixture(scope="module")
def report(smoke_run, tmp_path_factory) -> Path:
    """`pokestudy report` on a *copy* of the smoke study's database, as a user would run it."""
    url, results = smoke_run
    copy = tmp_path_factory.mktemp("copy")
    shutil.copy(results / "pokestudy.db", copy / "pokestudy.db")
    out = pokestudy("report", "--study", "smoke", "--results", str(copy))
    assert out.returncode == 0, out.stderr
    return copy / "smoke"


def test_a_table_cell_matches_a_recomputation_from_the_raw_trials(report: Path, smoke_run):
    url, _ = smoke_run
    records = [TrialRecord.from_trial(t) for t in optuna.load_study(study_name="smoke", storage=url).get_trials()]
    gaps = np.array([r.final["train_acc"] - r.final["test_acc"] for r in records
                     if r.condition == {"arch": "resnet", "augment": "paper", "regularization": "none"}])
    table = pd.read_csv(report / "gap.csv")
    row = table[(table.arch == "resnet") & (table.augment == "paper") & (table.regularization == "none")].iloc[0]
    assert row["seeds"] == len(gaps) == 2
    assert row["gap_mean"] == pytest.approx(gaps.mean(), abs=1e-5)
    assert np.isnan(row["gap_lo"]) and "(no CI)" in (report / "gap.md").read_text(), "no interval from 2 seeds"


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


def test_dashboard_note_and_figure_artifacts_survive_a_second_report(report: Path):
    from optuna.artifacts import get_all_artifact_meta
    from optuna_dashboard._note import get_note_from_system_attrs

    results = report.parent
    url = f"sqlite:///{results / 'pokestudy.db'}"
    study = optuna.load_study(study_name="smoke", storage=url)
    storage = optuna.storages.RDBStorage(url)
    note = get_note_from_system_attrs(storage.get_study_system_attrs(storage.get_study_id_from_name("smoke")), None)
    assert "## Verdicts" in note["body"] and "pokestudy report --study smoke" in note["body"]
    first = {m.filename: m.artifact_id for m in get_all_artifact_meta(study)}
    assert sorted(first) == ["confusions.png", "curves.png", "effects_over_epochs.png", "gap.png",
                              "predictions.png", "tradeoff.png"]
    (report / "gap.png").unlink()
    assert pokestudy("report", "--study", "smoke", "--results", str(results)).returncode == 0
    again = {m.filename: m.artifact_id for m in get_all_artifact_meta(study)}  # Optuna's own API still reads them
    assert again == first, "re-reporting replaces a figure's bytes under the same id, never duplicates"
    stored = results / ".artifacts" / first["gap.png"]
    assert stored.read_bytes() == (report / "gap.png").read_bytes()


@pytest.mark.parametrize("study", ["nope", "empty"])
def test_report_on_an_unknown_or_empty_study_is_one_line_exit_2(tmp_path: Path, study: str):
    url = f"sqlite:///{tmp_path / 'pokestudy.db'}"
    optuna.create_study(study_name="empty", storage=url)
    out = pokestudy("report", "--study", study, "--results", str(tmp_path))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
