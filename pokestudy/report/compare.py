"""Two studies of one design that differ in their data rule (near-duplicate grouping on or off, another
split, another folder): per shared condition, how test accuracy and the gap moved from the first to
the second. Their splits differ, so trials cannot be paired: each difference of means gets a Welch
interval, corrected (Bonferroni) for every claim made (conditions × two metrics).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from pokestudy import UserError
from pokestudy.report.tables import ALPHA, MIN_SEEDS, export, trials_frame
from pokestudy.study.record import differences, provenance_line
from pokestudy.study.store import open_study

METRICS = {"test_acc": "test accuracy", "gap": "gap"}


def compare(url: str, first: str, second: str, results: Path) -> Path:
    """Write `results/FIRST-vs-SECOND/` (comparison.csv, summary.md) and print the sentences."""
    a, b = (trials_frame(open_study(url, name)) for name in (first, second))
    if a.attrs["factors"] != b.attrs["factors"]:
        raise UserError(f"studies {first} and {second} have different factors ({', '.join(a.attrs['factors'])} vs "
                        f"{', '.join(b.attrs['factors'])}); compare two runs of one design")
    shared = [c for c in dict.fromkeys(a["condition"]) if c in set(b["condition"])]
    if not shared:
        raise UserError(f"studies {first} and {second} have no condition with finished trials in both")
    confidence = 1 - ALPHA / (len(METRICS) * len(shared))
    rows = []
    for condition in shared:
        x, y = a[a["condition"] == condition], b[b["condition"] == condition]
        converged = bool(x["converged"].all() and y["converged"].all())
        for metric in METRICS:
            diff, lo, hi = welch(x[metric].to_numpy(float), y[metric].to_numpy(float), confidence)
            rows.append({"condition": condition, "metric": metric, f"{first}": x[metric].mean(),
                         f"{second}": y[metric].mean(), "seeds": f"{len(x)} / {len(y)}",
                         "verdict": _label(lo, hi, converged, min(len(x), len(y))),
                         "diff": diff, "lo": lo, "hi": hi})
    table = pd.DataFrame(rows)
    what = differences(a.attrs["study"].identity, b.attrs["study"].identity) or ["nothing in their identity"]
    out = results / f"{first}-vs-{second}"
    export(table, out, "comparison", ("csv",))
    lines = [f"# {first} vs {second}", "", f"What differs: {'; '.join(what)}.", "",
             f"{len(table)} claims ({len(shared)} conditions × test accuracy and gap): difference of means "
             f"{second} − {first} over seeds, unpaired (the splits differ), Welch intervals corrected for all "
             f"{len(table)} (Bonferroni, family-wise 95%).", "", *[f"- {sentence(r, first, second)}" for _, r in table.iterrows()],
             "", "## Provenance", "", f"- {first}: {provenance_line(a.attrs['study'].provenance)}",
             f"- {second}: {provenance_line(b.attrs['study'].provenance)}", ""]
    (out / "summary.md").write_text("\n".join(lines))
    print("\n".join(sentence(r, first, second) for _, r in table.iterrows()))
    print(f"\nwritten to {out}/: comparison.csv, summary.md", file=sys.stderr)
    return out


def welch(x: np.ndarray, y: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """mean(y) − mean(x) and its Welch t-interval (NaN under MIN_SEEDS values on either side)."""
    diff = float(y.mean() - x.mean())
    if min(len(x), len(y)) < MIN_SEEDS:
        return diff, math.nan, math.nan
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(vx + vy)
    if se == 0:
        return diff, diff, diff
    dof = se ** 4 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, dof) * se)
    return diff, diff - half, diff + half


def _label(lo: float, hi: float, converged: bool, seeds: int) -> str:
    if not converged:
        return "inconclusive: not converged"
    if seeds < MIN_SEEDS or lo != lo:
        return f"inconclusive: fewer than {MIN_SEEDS} seeds"
    return "higher" if lo > 0 else "lower" if hi < 0 else "not distinguishable"


def sentence(row: pd.Series, first: str, second: str) -> str:
    ci = f" [{100 * row['lo']:+.1f}, {100 * row['hi']:+.1f}]" if row["lo"] == row["lo"] else " (no interval)"
    return (f"**{row['condition']}**, {METRICS[row['metric']]}: {100 * row[first]:.1f} ({first}) → "
            f"{100 * row[second]:.1f} ({second}), {100 * row['diff']:+.1f} points{ci} — {row['verdict']}.")
