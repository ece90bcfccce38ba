"""Report: every output of a study rebuilt from its Optuna storage alone, written to results/<study>/.

Tables (CSV, Markdown, LaTeX, JSON), figures (PNG), a generated summary.md, and, for
optuna-dashboard, the summary as the study's note and the figures as artifacts.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import optuna
import pandas as pd
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound

from pokestudy import UserError
from pokestudy.report import figures, summary, tables

ARTIFACT_PREFIX = "artifacts:"  # where Optuna keeps a study's artifact metadata (system attributes)


def artifact_store(results: Path) -> FileSystemArtifactStore:
    """Where figures are uploaded for optuna-dashboard: one folder beside the default database."""
    path = results / ".artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))


def build(study: optuna.Study, results: Path, formats: tuple[str, ...]) -> Path:
    """Write every table and figure of `study` (finished trials only) and publish them to the dashboard."""
    out = results / study.study_name
    out.mkdir(parents=True, exist_ok=True)
    df = tables.trials_frame(study)
    table = tables.gap_table(df)
    effects = tables.effects(df)
    interaction = (tables.interaction(df) if {"arch", "augment"} <= set(df.attrs["factors"])
                   and df["arch"].nunique() > 1 and df["augment"].nunique() > 1 else pd.DataFrame())
    written = [*tables.export(df.drop(columns=["history", "test_predictions"], errors="ignore"), out, "trials", ("csv",)),
               *tables.export(table, out, "gap", formats),
               *tables.export(effects, out, "effects", formats)]
    if not interaction.empty:
        written += tables.export(interaction, out, "interaction", formats)
    pngs = [figures.curves(df, out), figures.gaps(table, out), *_data_figures(study, df, out)]
    text = summary.write(study, df, table, effects, interaction)
    (out / "summary.md").write_text(text)
    _publish(study, results, text, pngs)
    print(tables.readable(table).to_string(index=False))
    print(f"\nwritten to {out}/: {', '.join(p.name for p in [*written, *pngs])}, summary.md", file=sys.stderr)
    return out


def _data_figures(study: optuna.Study, df: pd.DataFrame, out: Path) -> list[Path]:
    """Figures that need the test images: the prediction grid and the confusions (cache-backed)."""
    from pokestudy.data import prepare

    m = study.user_attrs.get("data_manifest", {})
    try:
        data = prepare(m["data"], m["res"], m["split_seed"], tuple(m["fractions"]))
    except (KeyError, UserError) as e:
        print(f"pokestudy: prediction figures skipped: the study's data is not available ({e})", file=sys.stderr)
        return []
    images, labels = data.sets["test"]
    valid = df[df["test_predictions"].map(len) == len(labels)]
    if valid.empty:
        return []
    best = valid.loc[valid.groupby("arch")["val_acc"].idxmax()] if "arch" in valid else valid.nlargest(1, "val_acc")
    runs = {f"best {r.get('arch', '')} (val)\n{r['condition']}": r["test_predictions"]
            for _, r in best.iterrows()}
    truth = labels.tolist()
    pairs: dict[tuple[str, str], int] = {}
    for pred in valid["test_predictions"]:
        for t, p in zip(truth, pred):
            if t != p:
                key = (data.classes[t], data.classes[p])
                pairs[key] = pairs.get(key, 0) + 1
    confused = pd.DataFrame([(t, p, n) for (t, p), n in pairs.items()], columns=["true", "predicted", "count"])
    confused = confused.sort_values(["count", "true", "predicted"], ascending=[False, True, True])  # ties by name
    tables.export(confused, out, "confusions", ("csv",))
    return [figures.predictions(images, labels, data.classes, runs, out), figures.confusions(confused, out)]


def figure_artifacts(storage: optuna.storages.BaseStorage, study_id: int) -> dict[str, str]:
    """{artifact id: file name} of a study's live artifacts. Read from the system attributes directly:
    optuna-dashboard marks a deleted artifact with a null there, which `get_all_artifact_meta` cannot read."""
    out = {}
    for key, value in storage.get_study_system_attrs(study_id).items():
        meta = json.loads(value) if key.startswith(ARTIFACT_PREFIX) and isinstance(value, str) else None
        if meta:
            out[meta["artifact_id"]] = meta["filename"]
    return out


def _publish(study: optuna.Study, results: Path, note: str, pngs: list[Path]) -> None:
    """The summary as the study's note and the figures as artifacts, replacing earlier copies."""
    from optuna_dashboard import save_note

    save_note(study, note)
    store = artifact_store(results)
    names = {p.name for p in pngs}
    storage = study._storage  # noqa: SLF001 — Optuna has no public handle for the study's own storage
    study_id = storage.get_study_id_from_name(study.study_name)
    for artifact_id, filename in figure_artifacts(storage, study_id).items():
        if filename in names:
            # The same two steps optuna-dashboard takes when a user deletes an artifact.
            with contextlib.suppress(ArtifactNotFound):  # uploaded to another results folder's store
                store.remove(artifact_id)
            storage.set_study_system_attr(study_id, f"{ARTIFACT_PREFIX}{artifact_id}", json.dumps(None))
    for path in pngs:
        upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study, mimetype="image/png")
