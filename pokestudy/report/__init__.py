"""Report: tables (and figures) rebuilt from the Optuna storage alone, exported to results/<study>/."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore

from pokestudy.report import tables


def artifact_store(results: Path) -> FileSystemArtifactStore:
    """Where figures are uploaded for optuna-dashboard: one folder beside the default database."""
    path = results / ".artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))


def build(study: optuna.Study, results: Path, formats: tuple[str, ...]) -> None:
    """Every output of a study, from what its storage holds (finished trials only)."""
    out = results / study.study_name
    df = tables.trials_frame(study)
    table = tables.gap_table(df)
    tables.export(df, out, "trials", ("csv",))
    paths = tables.export(table, out, "gap", formats)
    print(tables.readable(table).to_string(index=False))
    print(f"\nwritten: {', '.join(str(p) for p in paths)}", file=sys.stderr)
