"""A study exported to a folder and imported into another storage is the same study: it reports the
same numbers (and the prediction figures, whose files travel with it), and a rerun continues it."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd

from conftest import cli


def trial_count(url: str, name: str) -> int:
    return len(optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False))


def test_an_exported_study_imports_reports_the_same_and_resumes(smoke_run, tmp_path: Path, capsys):
    from pokestudy import api
    from pokestudy.study import runner, spec

    url, results = smoke_run
    folder = tmp_path / "archive"
    done = cli(capsys, "export", "--study", "smoke", str(folder), "--storage", url, "--results", str(results))
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines() == [f"exported smoke to {folder}"]

    elsewhere = tmp_path / "elsewhere"
    new_url = f"sqlite:///{elsewhere / 'pokestudy.db'}"
    done = cli(capsys, "import", str(folder), "--results", str(elsewhere))
    assert done.returncode == 0, done.stderr
    assert trial_count(new_url, "smoke") == trial_count(url, "smoke")

    before, after = api.results("smoke", storage=url), api.results("smoke", storage=new_url)
    pd.testing.assert_frame_equal(before.conditions, after.conditions)
    pd.testing.assert_frame_equal(before.verdicts, after.verdicts)

    report = cli(capsys, "report", "--study", "smoke", "--results", str(elsewhere))
    assert report.returncode == 0, report.stderr
    assert "skipped" not in report.stderr  # the test predictions came along: the prediction figures are drawn
    assert (elsewhere / "smoke" / "confusions.csv").is_file()

    from pokestudy.study.record import TrialRecord, cpu_model

    records = [TrialRecord.from_trial(t) for t in optuna.load_study(study_name="smoke", storage=new_url).get_trials()]
    assert {r.cpu for r in records} == {cpu_model()}  # each trial names its machine: a continued study may mix them
    trials = trial_count(new_url, "smoke")
    runner.run_study(spec.load("smoke"), storage=new_url, results=elsewhere, study_name="smoke")
    assert trial_count(new_url, "smoke") == trials  # the identity held: every trial was already done

    again = cli(capsys, "import", str(folder), "--results", str(elsewhere))
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"pokestudy: error: {new_url} already holds study 'smoke'; import into another --storage, or keep the "
        "stored one with `pokestudy run --restart` first"]
    assert trial_count(new_url, "smoke") == trials


def test_export_replaces_a_folder_whole_and_refuses_what_is_not_there(smoke_run, tmp_path: Path, capsys):
    url, results = smoke_run
    folder = tmp_path / "archive"
    folder.mkdir()
    (folder / "stale.txt").write_text("from an earlier export")
    assert cli(capsys, "export", "--study", "smoke", str(folder), "--storage", url,
               "--results", str(results)).returncode == 0
    assert not (folder / "stale.txt").exists() and (folder / "study.journal.gz").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive"]  # no half-built folder left beside it

    missing = cli(capsys, "export", "--study", "nosuch", str(tmp_path / "x"), "--storage", url)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "no study 'nosuch'" in missing.stderr and not (tmp_path / "x").exists()

    bad = cli(capsys, "import", str(tmp_path), "--results", str(tmp_path / "r"))
    assert bad.returncode == 2
    assert bad.stderr.strip() == (f"pokestudy: error: {tmp_path} is not an exported study (no study.journal.gz); "
                                  "make one with `pokestudy export`")
