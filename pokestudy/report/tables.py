"""Tables from the Optuna storage alone: one row per finished trial, then mean ± CI per condition.

Seeds are the unit of replication: each condition's numbers are a t-interval over its seeds,
never a single run, and with fewer than `MIN_SEEDS` no interval is given at all.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState
from scipy import stats

from pokestudy import UserError
from pokestudy.study.record import StudyRecord, TrialRecord
from pokestudy.study.spec import condition_id

METRICS = ("train_acc", "val_acc", "test_acc", "gap")
MIN_SEEDS = 3  # below this a t-interval is too wide to mean anything (±300% with two seeds)
ALPHA = 0.05


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per COMPLETE trial of the study's identity: its factors, seed, convergence, final
    metrics, settings and per-epoch history."""
    info = StudyRecord.from_study(study)
    rows, ignored = [], 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        r = TrialRecord.from_trial(t)
        if r.identity != info.identity["digest"]:
            ignored += 1
            continue
        rows.append({**r.condition, "condition": condition_id(r.condition), "seed": r.seed, "trial": t.number,
                     "budget": r.budget, "converged": r.converged, "epochs": r.epochs, "best_epoch": r.best_epoch,
                     "seconds": r.seconds,
                     **r.final, "settings": r.settings, "history": r.history})
    if not rows:
        raise UserError(f"study {study.study_name!r} has no finished trials yet; run it with "
                        f"`pokestudy run --study {study.study_name}`")
    df = pd.DataFrame(rows)
    df.attrs.update(factors=list(info.spec["factors"]), study=info, ignored=ignored)
    return df


def extra_metrics(df: pd.DataFrame) -> list[str]:
    """Accuracy and gap on the data source's extra evaluation sets (e.g. artwork_acc, artwork_gap)."""
    return [c for c in df.columns if c.endswith(("_acc", "_gap")) and c not in METRICS and not c.endswith("_augmented")]


def interval(values: pd.Series, confidence: float = 1 - ALPHA) -> tuple[float, float, float, float]:
    """Mean, standard deviation and a t-interval; under MIN_SEEDS values the interval is NaN."""
    x = values.dropna().to_numpy(float)
    mean = float(x.mean()) if len(x) else math.nan
    sd = float(x.std(ddof=1)) if len(x) > 1 else math.nan
    if len(x) < MIN_SEEDS:
        return mean, sd, math.nan, math.nan
    half = float(stats.t.ppf((1 + confidence) / 2, len(x) - 1) * sd / np.sqrt(len(x)))
    return mean, sd, mean - half, mean + half


def gap_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per condition: seeds, convergence, then mean / sd / 95% CI of each metric; and whether the gap
    is real, with an interval corrected for the number of conditions (Bonferroni)."""
    factors = df.attrs["factors"]
    groups = list(df.groupby("condition", sort=False))
    family = 1 - ALPHA / len(groups)
    rows = []
    for _, group in groups:
        done = int(group["converged"].sum())
        row = {**{f: group[f].iloc[0] for f in factors}, "seeds": len(group),
               "converged": "yes" if done == len(group) else f"no ({done}/{len(group)})"}
        for m in (*METRICS, *extra_metrics(df), "epochs"):
            row[f"{m}_mean"], row[f"{m}_sd"], row[f"{m}_lo"], row[f"{m}_hi"] = interval(group[m])
        _, _, lo, hi = interval(group["gap"], family)
        row["gap_real"] = _real(lo, hi, len(group), done == len(group))
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs.update(factors=factors, family=len(groups))
    return out


def _real(lo: float, hi: float, seeds: int, converged: bool) -> str:
    if seeds < MIN_SEEDS:
        return f"n/a: {seeds} seed(s), need {MIN_SEEDS}"
    bounds = f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"
    if not converged:
        return f"inconclusive: not converged {bounds}"
    return f"{'yes' if lo > 0 else 'reversed' if hi < 0 else 'not distinguishable from 0'} {bounds}"


def readable(table: pd.DataFrame) -> pd.DataFrame:
    """Any of our tables as people read it: accuracies in % (named by their set: `train`, `test`, …),
    `mean ± CI half-width` for levels,
    `difference [CI]` for differences; the separate sd / bound columns are folded in. Without an
    interval (too few seeds) the cell says so."""
    out = pd.DataFrame(index=table.index)
    for col in table.columns:
        stem, _, kind = col.rpartition("_")
        if kind in ("sd", "lo", "hi") and any(f"{stem}_{k}" in table for k in ("mean", "diff")):
            continue
        if kind not in ("mean", "diff"):
            out[col] = table[col]
            continue
        scale = 1 if stem in ("epochs", "best_epoch") else 100
        lo, hi = table[f"{stem}_lo"], table[f"{stem}_hi"]
        if kind == "mean":
            out[stem.removesuffix("_acc")] = [f"{scale * v:.1f} ± {scale * (b - a) / 2:.1f}" if a == a else f"{scale * v:.1f} (no CI)"
                         for v, a, b in zip(table[col], lo, hi)]
        else:
            out[stem.removesuffix("_acc")] = [f"{scale * v:+.1f} [{scale * a:+.1f}, {scale * b:+.1f}]" if a == a else f"{scale * v:+.1f} (no CI)"
                         for v, a, b in zip(table[col], lo, hi)]
    return out


def export(table: pd.DataFrame, out_dir: Path, stem: str, formats: tuple[str, ...]) -> list[Path]:
    """Write `table` as CSV / JSON (numbers) and Markdown / LaTeX (readable), atomically per file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {
        "csv": lambda: table.to_csv(index=False, float_format="%.6g"),
        "json": lambda: table.to_json(orient="records", indent=1),
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


def paired(df: pd.DataFrame, factor: str, metric: str, level: str, reference: str) -> pd.Series:
    """Differences `level − reference` of `metric` between trials that share every other factor and
    the seed: a within-block comparison, so other factors' effects do not widen the interval."""
    others = [c for c in df.attrs["factors"] if c != factor]
    wide = df.pivot_table(index=[*others, "seed"], columns=factor, values=metric)
    return (wide[level] - wide[reference]).dropna()
