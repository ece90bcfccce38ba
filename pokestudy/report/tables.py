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
    """One row per COMPLETE trial: its factors (from the stored spec), seed and final metrics."""
    factors = list(study.user_attrs.get("spec", {}).get("factors", {}))
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        metrics = {k: v for k, v in a.items() if isinstance(v, (int, float)) and k != "seed"}
        rows.append({**{f: t.params.get(f) for f in factors}, "condition": a.get("condition"),
                     "seed": a.get("seed"), "trial": t.number, **metrics})
    if not rows:
        raise UserError(f"study {study.study_name!r} has no finished trials yet; run it with "
                        f"`pokestudy run --study {study.study_name}`")
    return pd.DataFrame(rows)


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
    rows = []
    for condition, group in df.groupby("condition", sort=False):
        row = {"condition": condition, "seeds": len(group)}
        for m in (*metrics, *extra, "best_epoch"):
            if m in group:
                row[f"{m}_mean"], row[f"{m}_sd"], row[f"{m}_lo"], row[f"{m}_hi"] = interval(group[m])
        rows.append(row)
    return pd.DataFrame(rows)


def readable(table: pd.DataFrame) -> pd.DataFrame:
    """The gap table as people read it: accuracy in %, mean ± CI half-width."""
    out = pd.DataFrame({"condition": table["condition"], "seeds": table["seeds"]})
    for col in table.columns:
        if col.endswith("_mean") and not col.startswith("best_epoch"):
            m = col[: -len("_mean")]
            half = (table[f"{m}_hi"] - table[f"{m}_lo"]) / 2
            out[m] = [f"{100 * v:.1f} ± {100 * h:.1f}" if h == h else f"{100 * v:.1f}" for v, h in zip(table[col], half)]
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
