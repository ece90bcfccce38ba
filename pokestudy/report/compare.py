"""Two studies of one design that differ in their data rule (near-duplicate grouping on or off, another
split, another folder): per shared condition, how test accuracy and the gap moved from the first to
the second. Their splits differ, so trials cannot be paired: each difference of means gets a Welch
interval, corrected (Bonferroni) for every claim made (conditions × two metrics), and the verdicts'
one labeller: lower / higher, equivalent within ±δ, or inconclusive.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from pokestudy import UserError
from pokestudy.report.budget import split_budgets
from pokestudy.report.stats import HIGHER, LOWER, family_confidence, interval_text, label, welch
from pokestudy.report.tables import export, read
from pokestudy.study.record import differences, provenance_line
from pokestudy.study.store import open_study

METRICS = {"test_acc": "test accuracy", "gap": "gap"}


def compare(url: str, first: str, second: str, results: Path) -> Path:
    """Write `results/FIRST-vs-SECOND/` (comparison.csv, summary.md) and print the sentences."""
    a, b = (read(open_study(url, name)) for name in (first, second))
    fa, fb = list(a.spec.levels()), list(b.spec.levels())
    if fa != fb:
        raise UserError(f"studies {first} and {second} have different factors ({', '.join(fa)} vs "
                        f"{', '.join(fb)}); compare two runs of one design")
    x_all, y_all = (split_budgets(t.frame, None)[0] for t in (a, b))  # each at its own budget, not its check's
    shared = [c for c in dict.fromkeys(x_all["condition"]) if c in set(y_all["condition"])]
    if not shared:
        raise UserError(f"studies {first} and {second} have no condition with finished trials in both")
    confidence = family_confidence(len(METRICS) * len(shared))
    delta = a.spec.report.delta / 100
    rows = []
    for condition in shared:
        x, y = x_all[x_all["condition"] == condition], y_all[y_all["condition"] == condition]
        converged = bool(x["converged"].all() and y["converged"].all())
        for metric in METRICS:
            e = welch(x[metric].to_numpy(float), y[metric].to_numpy(float), confidence)
            rows.append({"condition": condition, "metric": metric, f"{first}": x[metric].mean(),
                         f"{second}": y[metric].mean(), "seeds": f"{len(x)} / {len(y)}",
                         "verdict": label(e.lo, e.hi, pairs=e.n, converged=converged, delta=delta, below=LOWER,
                                          above=HIGHER, unit="seeds"),
                         "diff": e.value, "lo": e.lo, "hi": e.hi})
    table = pd.DataFrame(rows)
    what = differences(a.record.identity, b.record.identity) or ["nothing in their identity"]
    out = results / f"{first}-vs-{second}"
    export(table, out, "comparison", ("csv",))
    lines = [f"# {first} vs {second}", "", f"What differs: {'; '.join(what)}.", "",
             f"{len(table)} claims ({len(shared)} conditions × test accuracy and gap): difference of means "
             f"{second} − {first} over seeds, unpaired (the splits differ), Welch intervals corrected for all "
             f"{len(table)} (Bonferroni, family-wise 95%); the labels are the verdicts' own (equivalence margin "
             f"±{100 * delta:g} points).", "",
             *[f"- {sentence(r, first, second)}" for _, r in table.iterrows()],
             "", "## Provenance", "", f"- {first}: {provenance_line(a.record.provenance)}",
             f"- {second}: {provenance_line(b.record.provenance)}", ""]
    (out / "summary.md").write_text("\n".join(lines))
    print("\n".join(sentence(r, first, second) for _, r in table.iterrows()))
    print(f"\nwritten to {out}/: comparison.csv, summary.md", file=sys.stderr)
    return out


def sentence(row: pd.Series, first: str, second: str) -> str:
    ci = interval_text(row["diff"], row["lo"], row["hi"], unit=" points")
    return (f"**{row['condition']}**, {METRICS[row['metric']]}: {100 * row[first]:.1f} ({first}) → "
            f"{100 * row[second]:.1f} ({second}), {ci} — {row['verdict']}.")
