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
from scipy import stats

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
    trials = [t for t in optuna.load_study(study_name="smoke", storage=url).get_trials()
              if t.params["arch"] == "resnet" and t.params["augment"] == "paper" and t.params["regularization"] == "none"]
    gaps = np.array([t.user_attrs["train_acc"] - t.user_attrs["test_acc"] for t in trials])
    half = stats.t.ppf(0.975, len(gaps) - 1) * gaps.std(ddof=1) / np.sqrt(len(gaps))
    table = pd.read_csv(report / "gap.csv")
    row = table[(table.arch == "resnet") & (table.augment == "paper") & (table.regularization == "none")].iloc[0]
    assert row["seeds"] == len(trials) == 2
    assert row["gap_mean"] == pytest.approx(gaps.mean(), abs=1e-5)
    assert row["gap_hi"] - row["gap_mean"] == pytest.approx(half, abs=1e-5)


def test_every_format_figure_and_the_summary_are_written(report: Path):
    for stem in ("gap", "effects", "interaction"):
        for fmt in ("csv", "md", "tex", "json"):
            assert (report / f"{stem}.{fmt}").stat().st_size > 0
    json.loads((report / "gap.json").read_text())
    assert "\\begin{tabular}" in (report / "gap.tex").read_text()
    for png in ("curves", "gap", "predictions", "confusions"):
        with Image.open(report / f"{png}.png") as im:
            assert im.width > 300 and im.height > 200
    summary = (report / "summary.md").read_text()
    for heading in ("Against the report", "Is each gap real?", "What moves the gap", "Offline copies"
                    if "paper-offline" in summary else "arch × augmentation", "fixed settings"):
        assert heading in summary


def test_the_summary_names_every_main_effect_whose_ci_excludes_zero(report: Path):
    effects = pd.read_csv(report / "effects.csv")
    summary = (report / "summary.md").read_text()
    clear = effects[(effects.gap_lo > 0) | (effects.gap_hi < 0)]
    for _, r in effects.iterrows():
        assert (f"**{r.factor}={r.level}**" in summary) == (r.name in clear.index)
    assert ("no factor clearly moves it" in summary) == clear.empty


def test_dashboard_note_and_figure_artifacts_are_stored_once(report: Path):
    from optuna_dashboard._note import get_note_from_system_attrs

    from pokestudy.report import figure_artifacts

    results = report.parent
    storage = optuna.storages.RDBStorage(f"sqlite:///{results / 'pokestudy.db'}")
    study_id = storage.get_study_id_from_name("smoke")
    assert "Is each gap real?" in get_note_from_system_attrs(storage.get_study_system_attrs(study_id), None)["body"]
    names = sorted(figure_artifacts(storage, study_id).values())
    assert names == ["confusions.png", "curves.png", "gap.png", "predictions.png"]
    assert pokestudy("report", "--study", "smoke", "--results", str(results)).returncode == 0
    assert sorted(figure_artifacts(storage, study_id).values()) == names, "re-reporting replaces, never duplicates"


@pytest.mark.parametrize("study", ["nope", "empty"])
def test_report_on_an_unknown_or_empty_study_is_one_line_exit_2(tmp_path: Path, study: str):
    url = f"sqlite:///{tmp_path / 'pokestudy.db'}"
    optuna.create_study(study_name="empty", storage=url)
    out = pokestudy("report", "--study", study, "--results", str(tmp_path))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
