"""Tables from the Optuna storage alone: one row per finished trial, then mean ± CI per condition.

Seeds are the unit of replication: each condition's numbers are a t-interval over its seeds,
never a single run, and with fewer than `MIN_SEEDS` no interval is given at all.

In the trials frame a factor's column is `factor:NAME`, so no factor name (`epochs`, a bundle
named `seed` or `gap`) can overwrite a metric or bookkeeping column; it is categorical, its
categories the spec's levels in the spec's order (the first is the reference), so any subset of
the rows still knows the whole design. Written tables drop the prefix wherever the plain name is
not taken (`public`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from pokestudy import UserError
from pokestudy.report.stats import ALPHA, MIN_SEEDS, family_confidence, interval_text, mean_interval
from pokestudy.study.record import StudyRecord, TrialRecord
from pokestudy.study.spec import Study, condition_id

METRICS = ("train_acc", "val_acc", "test_acc", "gap")
FACTOR = "factor:"  # the prefix of a factor's column in the trials frame



@dataclass(frozen=True)
class Trials:
    """A study's finished trials of its identity (`frame`), what is stored about the study, and how
    many stored trials of another identity were left out."""

    record: StudyRecord
    frame: pd.DataFrame
    ignored: int

    @property
    def spec(self) -> Study:
        return self.record.study


def column(factor: str) -> str:
    """A factor's column in the trials frame."""
    return f"{FACTOR}{factor}"


def factors(df: pd.DataFrame) -> list[str]:
    """The factors of a trials frame (or of a table with factor columns), in the spec's order."""
    return [c[len(FACTOR):] for c in df.columns if c.startswith(FACTOR)]


def levels(df: pd.DataFrame) -> dict[str, list[str]]:
    """Each factor's levels in the spec's order, also those no row of `df` has yet."""
    return {f: [str(level) for level in df[column(f)].cat.categories] for f in factors(df)}


def cell(values: dict[str, object]) -> str:
    """A cell of the grid in words: `arch=cnn · augment=none`."""
    return " · ".join(f"{f}={v}" for f, v in values.items())


def read(study: optuna.Study) -> Trials:
    """One row per COMPLETE trial of the study's identity: its factors (namespaced), seed,
    convergence, final metrics, settings and per-epoch history."""
    info = StudyRecord.from_study(study)
    spec = info.study
    rows, ignored = [], 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        r = TrialRecord.from_trial(t)
        if r.identity != info.identity["digest"]:
            ignored += 1
            continue
        book = {**{column(f): v for f, v in r.condition.items()}, "condition": condition_id(r.condition),
                "seed": r.seed, "split_seed": info.data["split_seed"] if r.split_seed is None else r.split_seed,
                "trial": t.number, "budget": r.budget, "converged": r.converged, "epochs": r.epochs,
                "best_epoch": r.best_epoch, "seconds": r.seconds, "settings": r.settings, "history": r.history,
                **{k: getattr(r, k) for k in TrialRecord.PLACEMENT}}
        rows.append({**book, **{k: v for k, v in r.final.items() if k not in book}})  # bookkeeping is never overwritten
    if not rows:
        raise UserError(f"study {study.study_name!r} has no finished trials yet; run it with "
                        f"`pokestudy run --study {study.study_name}`")
    df = pd.DataFrame(rows)
    for f, ls in spec.levels().items():
        df[column(f)] = pd.Categorical(df[column(f)], categories=ls, ordered=True)
    return Trials(info, df, ignored)


def public(table: pd.DataFrame) -> pd.DataFrame:
    """`table` with each `factor:NAME` column renamed NAME, unless NAME is another column already."""
    taken = set(table.columns)
    return table.rename(columns={c: c[len(FACTOR):] for c in table.columns
                                 if c.startswith(FACTOR) and c[len(FACTOR):] not in taken})


def extra_metrics(df: pd.DataFrame) -> list[str]:
    """Accuracy and gap on the data source's extra evaluation sets (e.g. artwork_acc, artwork_gap)."""
    return [c for c in df.columns if c.endswith(("_acc", "_gap")) and c not in METRICS
            and not c.endswith("_augmented") and not c.startswith(FACTOR)]


def interval(values: pd.Series, confidence: float = 1 - ALPHA) -> tuple[float, float, float, float]:
    """Mean, standard deviation and a t-interval; under MIN_SEEDS values the interval is NaN."""
    e = mean_interval(values, confidence)
    return e.value, e.sd, e.lo, e.hi


def gap_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per condition: seeds, convergence, then mean / sd / 95% CI of each metric; and whether the gap
    is real, with an interval corrected for the number of conditions (Bonferroni)."""
    names = [column(f) for f in factors(df)]
    groups = list(df.groupby("condition", sort=False))
    family = family_confidence(len(groups))
    rows = []
    for _, group in groups:
        done = int(group["converged"].sum())
        row = {**{f: group[f].iloc[0] for f in names}, "seeds": len(group),
               "converged": "yes" if done == len(group) else f"no ({done}/{len(group)})"}
        for m in (*METRICS, *extra_metrics(df), "epochs"):
            row[f"{m}_mean"], row[f"{m}_sd"], row[f"{m}_lo"], row[f"{m}_hi"] = interval(group[m])
        _, _, lo, hi = interval(group["gap"], family)
        row["gap_real"] = _real(lo, hi, len(group), done == len(group))
        rows.append(row)
    out = pd.DataFrame(rows)
    for f in names:
        out[f] = pd.Categorical(out[f], categories=df[f].cat.categories, ordered=True)
    return out


def _real(lo: float, hi: float, seeds: int, converged: bool) -> str:
    if seeds < MIN_SEEDS:
        return f"n/a: {seeds} seed(s), need {MIN_SEEDS}"
    bounds = interval_text(None, lo, hi)
    if not converged:
        return f"inconclusive: not converged {bounds}"
    return f"{'yes' if lo > 0 else 'reversed' if hi < 0 else 'not distinguishable from 0'} {bounds}"


def readable(table: pd.DataFrame) -> pd.DataFrame:
    """Any of our tables as people read it: accuracies in % (named by their set: `train`, `test`, …),
    `mean ± CI half-width` for levels, `difference [CI]` for differences; the separate sd / bound
    columns are folded in. Without an interval (too few seeds) the cell says so."""
    table = public(table)
    out = pd.DataFrame(index=table.index)
    for col in table.columns:
        stem, _, kind = col.rpartition("_")
        if kind in ("sd", "lo", "hi") and any(f"{stem}_{k}" in table for k in ("mean", "diff")):
            continue
        if kind not in ("mean", "diff"):
            out[col] = table[col]
            continue
        scale = 1 if stem in ("epochs", "best_epoch") else 100
        style, spec = ("pm", ".1f") if kind == "mean" else ("bounds", "+.1f")
        out[stem.removesuffix("_acc")] = [interval_text(v, a, b, scale=scale, spec=spec, style=style)
                                          for v, a, b in zip(table[col], table[f"{stem}_lo"], table[f"{stem}_hi"])]
    return out


def export(table: pd.DataFrame, out_dir: Path, stem: str, formats: tuple[str, ...]) -> list[Path]:
    """Write `table` as CSV / JSON (numbers) and Markdown / LaTeX (readable), atomically per file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = public(table)
    writers = {
        "csv": lambda: plain.to_csv(index=False, float_format="%.6g"),
        "json": lambda: plain.to_json(orient="records", indent=1),
        "md": lambda: readable(table).to_markdown(index=False) + "\n",
        "tex": lambda: readable(table).to_latex(index=False),
    }
    paths = []
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        tmp = path.with_suffix(f".{fmt}.tmp")
        tmp.write_text(writers[fmt]())
        tmp.replace(path)
        paths.append(path)
    return paths


def matched(df: pd.DataFrame, factor: str, metric: str, level: str, reference: str) -> pd.DataFrame:
    """`metric` of trials at `level` and at `reference` of `factor`, one row per block (the seed and
    every other factor's level), only blocks that have both: a within-block comparison, so other
    factors' effects do not widen the interval. Columns `level`, `reference`."""
    others = [column(f) for f in factors(df) if f != factor]
    rows = df[df[column(factor)].isin([level, reference])]
    wide = rows.pivot_table(index=[*others, "seed"], columns=column(factor), values=metric, observed=True)
    if not {level, reference} <= set(wide.columns):
        return pd.DataFrame(columns=["level", "reference"], dtype=float)
    return pd.DataFrame({"level": wide[level], "reference": wide[reference]}).dropna()
