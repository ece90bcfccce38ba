"""Report: every output of a study rebuilt from its Optuna storage alone, written to results/<study>/.

Verdicts, tables (CSV, Markdown, LaTeX, JSON), figures (PNG), a generated summary.md, and, for
optuna-dashboard, the summary as the study's note (its figures inline, as artifacts) and the verdicts as a
chart on the study page.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import optuna
import pandas as pd
from optuna.trial import TrialState
from optuna.artifacts import get_all_artifact_meta, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound

from pokestudy import UserError
from pokestudy.report import budget, figures, scaling, summary, tables, verdicts
from pokestudy.study.record import StudyRecord, TrialRecord
from pokestudy.study.spec import Range, Study, condition_id, tuning_study
from pokestudy.study.store import artifact_store, find_study, open_study, read_artifact, storage


@dataclass(frozen=True)
class Analysed:
    """What the storage says of a study: `build` writes it, `pokestudy.results` returns it as DataFrames."""

    study: optuna.Study
    everything: tables.Trials  # every finished trial of the study's identity, the budget check's too
    trials: tables.Trials  # those at the study's budget
    longer: pd.DataFrame  # the budget check's, at k times the budget
    table: pd.DataFrame  # per condition (gap.csv)
    analysis: verdicts.Analysis
    checked: pd.DataFrame  # each claim at both budgets (budget_check.csv); empty without a budget check
    claims: pd.DataFrame  # the verdicts (verdicts.csv)


def analyse(url: str, name: str) -> Analysed:
    """Read study `name` (finished trials of its identity only) and decide its claims."""
    study = open_study(url, name)
    everything = tables.read(study)
    df, longer = budget.split_budgets(everything.frame, everything.spec.budget_check)  # B; the check's k·B
    spec = everything.spec
    analysis = verdicts.analyse(df, spec.report, pilot_n=spec.adaptive.min if spec.adaptive else None)
    claims = analysis.verdicts
    checked = budget.budget_check(df, longer, spec.report)
    if not checked.empty:
        claims["budget_check"] = checked["budget_check"].to_numpy()
    return Analysed(study, everything, replace(everything, frame=df), longer, tables.gap_table(df), analysis,
                    checked, claims)


def build(url: str, name: str, results: Path, formats: tuple[str, ...], generator: str) -> Analysed:
    """Write every table and figure of study `name` (finished trials of its identity only) and
    publish them to the dashboard. `generator` is the command that asked, named in the summary."""
    done = analyse(url, name)
    study, everything, trials, longer = done.study, done.everything, done.trials, done.longer
    df, table, analysis, checked, claims = trials.frame, done.table, done.analysis, done.checked, done.claims
    spec, classes = trials.spec, trials.record.data["classes"]
    out = results / name
    out.mkdir(parents=True, exist_ok=True)
    checks = budget.sentences(spec.budget_check, checked, budget.length_check(df), _pilot(url, spec))
    tuning = tuning_table(url, name, df, spec)
    written = [*tables.export(everything.frame.drop(columns=["history", "settings"]), out, "trials", ("csv",)),
               *tables.export(table, out, "gap", formats), *tables.export(claims, out, "verdicts", formats)]
    if not analysis.simple.empty:
        written += tables.export(analysis.simple, out, "simple_effects", formats)
    if not checked.empty:
        factor = f"{checked['budget_factor'].iloc[0]:g}x"
        written += [*tables.export(checked, out, "budget_check", formats),
                    *tables.export(tables.gap_table(longer), out, f"gap_at_{factor}", formats)]
    if not tuning.empty:
        written += tables.export(tuning, out, "tuning", formats)
    sizes = scaling.analyse(df, spec, classes)
    if sizes is not None:
        written += tables.export(sizes.fits, out, "scaling", formats)
    copies = summary.near_copies(df)
    if not copies.empty:
        written += tables.export(copies, out, "near_copies", formats)
    pngs = [figures.curves(df, out), figures.gaps(table, spec.report.reference, out), figures.tradeoff(table, out),
            figures.effects_over_epochs(df, analysis.confidence, out),
            figures.scaling(df, sizes, classes, out) if sizes is not None else None,
            *_data_figures(url, study, trials.record.data, df, results)]
    pngs = [p for p in pngs if p is not None]

    def note(links: dict[str, str], padded: bool = False) -> str:
        return summary.write(name, generator, trials, table, analysis, checks, tuning, sizes, copies, links,
                             padded=padded)

    (out / "summary.md").write_text(note({p.name: p.name for p in pngs}))
    _publish(url, study, results, pngs, lambda links: note(links, padded=True),
             figures.verdicts_chart(claims, analysis.confidence))
    print(tables.readable(analysis.verdicts)[["claim", "verdict", "gap", "test"]].to_string(index=False)
          if len(analysis.verdicts) else "no claims: every factor of this study has a single level")
    print(f"\nwritten to {out}/: {', '.join(p.name for p in [*written, *pngs])}, summary.md", file=sys.stderr)
    return done


def tuning_table(url: str, name: str, df: pd.DataFrame, spec: Study) -> pd.DataFrame:
    """Per tuned condition: the chosen nuisance values, whether one sits at its range's edge, and the
    tuning optimism (best tuning validation accuracy − mean validation accuracy of the seeded reruns)."""
    if spec.nuisance is None:
        return pd.DataFrame()
    ranges = spec.nuisance.params
    rows = []
    for cid, group in df.groupby("condition", sort=False):
        tuning = find_study(url, tuning_study(name, cid))
        if tuning is None or not tuning.best_trials:
            continue
        best = tuning.best_trial
        edges = [k for k, r in ranges.items() if _near_edge(best.params[k], r)]
        rows.append({**{tables.column(f): group[tables.column(f)].iloc[0] for f in tables.factors(df)}, **best.params,
                     "tuning_trials": len(tuning.trials), "best_tuning_val_acc": best.value,
                     "optimism_points": round(100 * (best.value - group["val_acc"].mean()), 1),
                     "range_check": f"extend the range: {', '.join(edges)} at its edge" if edges else "inside"})
    return pd.DataFrame(rows)


def _pilot(url: str, spec: Study) -> tuple[str, pd.DataFrame] | None:
    """The budget's pilot study, when the spec names one: its validation accuracy per budget tried,
    or an empty table when it is not in this storage."""
    name = spec.budget_check.pilot if spec.budget_check else None
    if name is None:
        return None
    study = find_study(url, name)
    if study is None or not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return name, pd.DataFrame()
    return name, budget.pilot_table(tables.read(study).frame)


def _near_edge(value: float, r: Range, within: float = 0.1) -> bool:
    transform = math.log if r.log else float
    lo, hi, v = transform(r.low), transform(r.high), transform(value)
    return min(v - lo, hi - v) <= within * (hi - lo)


def _data_figures(url: str, study: optuna.Study, manifest: dict, df: pd.DataFrame, results: Path) -> list[Path]:
    """Figures that need the test images and each trial's test predictions: the prediction grid and
    the confusions. They need the data (cache-backed) and the artifact store of the results folder,
    and the same data the study ran on: a changed folder would mislabel every prediction."""
    from pokestudy.data import pool

    try:
        data = pool(manifest["data"], manifest["res"], manifest["split_seed"], tuple(manifest["fractions"]),
                    near_duplicates=manifest["near_duplicates"]["threshold"])
    except UserError as e:
        print(f"pokestudy: prediction figures skipped: the study's data is not here ({e})", file=sys.stderr)
        return []
    if data.manifest["fingerprint"] != manifest["fingerprint"]:
        print(f"pokestudy: prediction figures skipped: the data changed since the study ran (fingerprint "
              f"{manifest['fingerprint']} → {data.manifest['fingerprint']})", file=sys.stderr)
        return []
    try:
        store, trials = artifact_store(results), study.get_trials(deepcopy=False)
        predictions = pd.Series({n: json.loads(read_artifact(store, url, trials[n], "test_predictions.json"))
                                 for n in df["trial"]})
    except (KeyError, ArtifactNotFound) as e:
        print(f"pokestudy: prediction figures skipped: the trials' predictions are not here "
              f"({type(e).__name__}: {e})", file=sys.stderr)
        return []
    tests = {seed: data.split(seed).sets["test"] for seed in df["split_seed"].unique()}  # each replicate's own
    names = tables.factors(df)
    first = tables.column(names[0])  # one model per level of the first factor, the best on validation,
    shown = df[df["split_seed"] == df["split_seed"].min()]  # among the trials of one split: one test set to show
    best = shown.loc[shown.groupby(first, observed=True)["val_acc"].idxmax()]
    runs = {f"best {names[0]}={r[first]} (val)\n{tables.cell({f: r[tables.column(f)] for f in names})}":
            predictions[r["trial"]] for _, r in best.iterrows()}
    images, labels = tests[df["split_seed"].min()]
    pairs: dict[tuple[str, str], int] = {}
    for trial, split_seed in zip(df["trial"], df["split_seed"]):
        for t, p in zip(tests[split_seed][1].tolist(), predictions[trial]):
            if t != p:
                key = (data.classes[t], data.classes[p])
                pairs[key] = pairs.get(key, 0) + 1
    confused = pd.DataFrame([(t, p, n) for (t, p), n in pairs.items()], columns=["true", "predicted", "count"])
    confused = confused.sort_values(["count", "true", "predicted"], ascending=[False, True, True])  # ties by name
    tables.export(confused, out := results / study.study_name, "confusions", ("csv",))
    return [figures.predictions(images, labels, data.classes, runs, out), figures.confusions(confused, out)]


@dataclass(frozen=True)
class PlotlyJSON:
    """A Plotly figure as its JSON: `save_plotly_graph_object` reads a figure only through `to_json`, so one
    chart does not make the plotly package a dependency. NaN is refused: plotly.js could not parse it."""

    figure: dict

    def to_json(self) -> str:
        return json.dumps(self.figure, allow_nan=False)


def _publish(url: str, study: optuna.Study, results: Path, pngs: list[Path], note: Callable[[dict], str],
             chart: dict | None) -> None:
    """The verdicts' chart on the study page (one id, so a second report replaces it), the figures as
    artifacts, then the summary as the study's note, its figures inline and opening the artifacts full-size.
    A figure already published keeps its artifact id and gets new bytes, so re-reporting leaves no
    deleted-artifact markers behind (Optuna's own API could not read them)."""
    from optuna_dashboard import save_note, save_plotly_graph_object

    if chart is not None:
        save_plotly_graph_object(study, PlotlyJSON(chart), graph_object_id="verdicts")
    store = artifact_store(results)
    try:
        published = {meta.filename: meta.artifact_id for meta in get_all_artifact_meta(study)}
    except TypeError:  # a figure deleted in optuna-dashboard leaves a marker Optuna's own API cannot read
        print("pokestudy: figures not republished: an artifact of this study was deleted in optuna-dashboard, "
              "which Optuna cannot read back; the files in the results folder are current", file=sys.stderr)
        save_note(study, note({p.name: p.name for p in pngs}))
        return
    for path in pngs:
        if path.name in published:
            with path.open("rb") as f:
                store.write(published[path.name], f)
        else:
            published[path.name] = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study,
                                                   mimetype="image/png")
    # Optuna 5.0.0 has no public study id (Study._study_id is private); the dashboard's artifact URLs hold it
    study_id = storage(url).get_study_id_from_name(study.study_name)
    save_note(study, note({p.name: f"/artifacts/{study_id}/{published[p.name]}" for p in pngs}))
    fixed = StudyRecord.from_study(study).spec["fixed"]
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):  # each trial's page, current format
        # save_note needs an optuna.Trial; no public call of Optuna 5.0.0 gives one for a finished trial
        trial_id = storage(url).get_trial_id_from_study_id_trial_number(study_id, t.number)
        save_note(optuna.Trial(study, trial_id), TrialRecord.from_trial(t).note(fixed))


def trial_figure(record: TrialRecord, path: Path) -> Path:
    """The small curves figure the store attaches to each trial as it completes."""
    return figures.trial_curves(record.history, f"{condition_id(record.condition)}, seed {record.seed}", path)
