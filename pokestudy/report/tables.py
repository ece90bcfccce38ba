"""Tables from the Optuna storage alone: one row per finished trial, then mean ± 95% CI per condition.

Seeds are the unit of replication: each condition's numbers are a t-interval over its seeds,
never a single run.
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

METRICS = ("train_acc", "val_acc", "test_acc", "gap")


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per COMPLETE trial: its factors (from the stored spec), seed, final metrics, and the
    per-epoch history and test predictions that the figures need."""
    factors = list(study.user_attrs.get("spec", {}).get("factors", {}))
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        metrics = {k: v for k, v in a.items() if isinstance(v, (int, float)) and k != "seed"}
        rows.append({**{f: t.params.get(f) for f in factors}, "condition": a.get("condition"),
                     "seed": a.get("seed"), "trial": t.number, **metrics,
                     "history": a.get("history", {}), "test_predictions": a.get("test_predictions", [])})
    if not rows:
        raise UserError(f"study {study.study_name!r} has no finished trials yet; run it with "
                        f"`pokestudy run --study {study.study_name}`")
    df = pd.DataFrame(rows)
    df.attrs["factors"] = factors
    return df


def interval(values: pd.Series, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, standard deviation and a t-interval; a single seed gives an unbounded (NaN) interval."""
    x = values.dropna().to_numpy(float)
    mean = float(x.mean()) if len(x) else math.nan
    if len(x) < 2:
        return mean, math.nan, math.nan, math.nan
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, len(x) - 1) * sd / np.sqrt(len(x)))
    return mean, sd, mean - half, mean + half


def gap_table(df: pd.DataFrame, metrics: tuple[str, ...] = METRICS) -> pd.DataFrame:
    """Per condition: seeds, then mean / sd / CI bounds of each metric (numbers, for CSV and JSON)."""
    extra = [c for c in df.columns if c.endswith(("_acc", "_gap")) and not c.startswith("best_")
             and c not in metrics and not c.endswith("_augmented")]
    factors = df.attrs["factors"]
    rows = []
    for _, group in df.groupby("condition", sort=False):
        row = {**{f: group[f].iloc[0] for f in factors}, "seeds": len(group)}
        for m in (*metrics, *extra, "best_epoch"):
            if m in group:
                row[f"{m}_mean"], row[f"{m}_sd"], row[f"{m}_lo"], row[f"{m}_hi"] = interval(group[m])
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs["factors"] = factors
    return out


def readable(table: pd.DataFrame) -> pd.DataFrame:
    """Any of our tables as people read it: accuracies in %, `mean ± CI half-width` for levels,
    `difference [CI]` for effects; the separate bound columns are folded in."""
    centres = {c: c[: -len(suffix)] for c in table.columns
               for suffix in ("_mean", "_diff") if c.endswith(suffix)}
    if "diff" in table:
        centres["diff"] = ""
    bounds = {f"{m}_{b}" if m else b for m in centres.values() for b in ("sd", "lo", "hi")}
    out = table[[c for c in table.columns if c not in centres and c not in bounds]].copy()
    for col, m in centres.items():
        lo, hi = table[f"{m}_lo" if m else "lo"], table[f"{m}_hi" if m else "hi"]
        scale = 1 if m == "best_epoch" else 100
        if col.endswith("_mean"):
            cells = [f"{scale * v:.1f} ± {scale * (b - a) / 2:.1f}" if a == a else f"{scale * v:.1f}"
                     for v, a, b in zip(table[col], lo, hi)]
        else:
            cells = [f"{scale * v:+.1f} [{scale * a:+.1f}, {scale * b:+.1f}]" for v, a, b in zip(table[col], lo, hi)]
        out[m or "difference"] = cells
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


def paired(df: pd.DataFrame, factor: str, metric: str, level: str, reference: str,
           by: str | None = None) -> pd.Series:
    """Differences `level − reference` of `metric` between trials that share every other factor and
    the seed: a within-block comparison, so other factors' effects do not widen the interval."""
    factors = [c for c in df.attrs["factors"] if c != factor]
    wide = df.pivot_table(index=[*factors, "seed"], columns=factor, values=metric)
    diff = wide[level] - wide[reference]
    if by is None:
        return diff.dropna()
    return diff.groupby(level=by)


def effects(df: pd.DataFrame, metrics: tuple[str, ...] = ("gap", "test_acc")) -> pd.DataFrame:
    """Main effect of each factor level against the factor's first level, with a paired t-interval."""
    rows = []
    for factor in df.attrs["factors"]:
        levels = list(dict.fromkeys(df[factor]))
        for level in levels[1:]:
            row = {"factor": factor, "level": level, "reference": levels[0]}
            for m in metrics:
                d = paired(df, factor, m, level, levels[0])
                row["pairs"] = len(d)
                row[f"{m}_diff"], _, row[f"{m}_lo"], row[f"{m}_hi"] = interval(d)
            rows.append(row)
    return pd.DataFrame(rows)


def interaction(df: pd.DataFrame, first: str = "arch", second: str = "augment", metric: str = "gap") -> pd.DataFrame:
    """How the effect of `first` changes with `second`: (effect at level) − (effect at the reference level)."""
    a = list(dict.fromkeys(df[first]))
    b = list(dict.fromkeys(df[second]))
    rest = [c for c in df.attrs["factors"] if c not in (first, second)]
    wide = df.pivot_table(index=[*rest, "seed"], columns=[first, second], values=metric)
    rows = []
    for level in b[1:]:
        d = (wide[(a[1], level)] - wide[(a[0], level)]) - (wide[(a[1], b[0])] - wide[(a[0], b[0])])
        mean, _, lo, hi = interval(d.dropna())
        rows.append({"contrast": f"({a[1]} − {a[0]}) at {second}={level} vs {b[0]}", "metric": metric,
                     "diff": mean, "lo": lo, "hi": hi, "pairs": int(d.notna().sum())})
    return pd.DataFrame(rows)
