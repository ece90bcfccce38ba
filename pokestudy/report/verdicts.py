"""Verdicts: the study's family of claims, each with a family-wise interval and a plain label.

The family is every main effect (each level against its factor's first level), plus the
contrasts and interactions the spec's `report:` block declares. Each claim is a paired difference
in the gap (and, beside it, in test accuracy) over matched trials — same seed, same levels of the
other factors. Intervals are Bonferroni-corrected for the number of claims (family-wise 95%).

Labels, for the gap:
- *inconclusive: budget too short* — a condition the claim rests on was still learning at the end of
  its budget (`train.settled`);
- *closes the gap* — the interval lies below 0; *widens the gap* — above 0;
- *equivalent within ±δ* — the interval lies inside ±δ (a TOST at the same family-wise level,
  conservatively, since the interval is 1 − α/m rather than 1 − 2α/m);
- *inconclusive* — none of these.
An interaction (how one factor's effect changes with another's level) that excludes 0 reads *the
effect differs: narrower / wider gap*.
`how` says what moved: a narrower gap with test accuracy that does not rise comes from fitting the
training set less, not from generalising better.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from pokestudy.report.tables import ALPHA, MIN_SEEDS, interval, paired
from pokestudy.study.spec import ReportSpec

CLOSES, WIDENS, EQUIVALENT = "closes the gap", "widens the gap", "equivalent within ±{delta:g} points"
INCONCLUSIVE, UNCONVERGED = "inconclusive", "inconclusive: budget too short"
INTERACTS = "the effect differs: {direction} gap"  # an interaction: the first factor's effect changes with the second


@dataclass(frozen=True)
class Claim:
    kind: str  # "effect", "contrast" or "interaction"
    name: str  # what is compared, in words
    gap: pd.Series  # paired differences of the gap
    test: pd.Series  # paired differences of test accuracy
    converged: bool  # every trial the claim rests on converged


def claims(df: pd.DataFrame, report: ReportSpec) -> list[Claim]:
    """The study's family of claims, from its factors (in the spec's level order) and its `report:` block.
    The family is fixed by the spec, so a study still running makes the same claims, some not yet run."""
    levels = df.attrs["study"].study.levels()
    out = []
    for factor, ls in levels.items():
        out += [_contrast(df, "effect", factor, level, ls[0]) for level in ls[1:]]
    out += [_contrast(df, "contrast", c.factor, c.level, c.reference) for c in report.contrasts]
    for first, second in report.interactions:
        a, b = levels[first], levels[second]
        out += [_interaction(df, first, second, (a[0], la), (b[0], lb)) for la in a[1:] for lb in b[1:]]
    return out


def _contrast(df: pd.DataFrame, kind: str, factor: str, level: str, reference: str) -> Claim:
    rows = df[df[factor].isin([level, reference])]
    ran = {level, reference} <= set(rows[factor])
    gap, test = ((paired(df, factor, m, level, reference) for m in ("gap", "test_acc")) if ran else
                 (pd.Series(dtype=float), pd.Series(dtype=float)))
    return Claim(kind, f"{factor}={level} vs {reference}", gap, test, bool(rows["converged"].all()))


def _interaction(df: pd.DataFrame, first: str, second: str, a: tuple[str, str], b: tuple[str, str]) -> Claim:
    """How the effect of `first` (a[1] − a[0]) changes from second=b[0] to second=b[1]."""
    rest = [c for c in df.attrs["factors"] if c not in (first, second)]
    rows = df[df[first].isin(a) & df[second].isin(b)]
    cells = [(x, y) for x in a for y in b]

    def diff(metric: str) -> pd.Series:
        wide = rows.pivot_table(index=[*rest, "seed"], columns=[first, second], values=metric)
        if not set(cells) <= set(wide.columns):
            return pd.Series(dtype=float)  # a cell has no finished trial yet
        return ((wide[(a[1], b[1])] - wide[(a[0], b[1])]) - (wide[(a[1], b[0])] - wide[(a[0], b[0])])).dropna()

    name = f"({first}={a[1]} − {a[0]}) at {second}={b[1]} vs {b[0]}"
    return Claim("interaction", name, diff("gap"), diff("test_acc"), bool(rows["converged"].all()))


def verdicts(df: pd.DataFrame, report: ReportSpec) -> pd.DataFrame:
    """One row per claim: gap and test-accuracy differences with family-wise intervals, and a label."""
    family = claims(df, report)
    confidence = 1 - ALPHA / max(1, len(family))
    delta = report.delta / 100
    rows = []
    for c in family:
        gap, _, glo, ghi = interval(c.gap, confidence)
        test, _, tlo, thi = interval(c.test, confidence)
        rows.append({"kind": c.kind, "claim": c.name, "pairs": len(c.gap),
                     "verdict": _label(c.kind, glo, ghi, c.converged, len(c.gap), delta, report.delta),
                     "how": _how(gap, glo, ghi, tlo, thi), "gap_diff": gap, "gap_lo": glo, "gap_hi": ghi,
                     "test_acc_diff": test, "test_acc_lo": tlo, "test_acc_hi": thi})
    out = pd.DataFrame(rows, columns=["kind", "claim", "pairs", "verdict", "how", "gap_diff", "gap_lo", "gap_hi",
                                      "test_acc_diff", "test_acc_lo", "test_acc_hi"])
    out.attrs.update(claims=len(family), confidence=confidence)
    return out


def _label(kind: str, lo: float, hi: float, converged: bool, pairs: int, delta: float, delta_points: float) -> str:
    if pairs == 0:
        return f"{INCONCLUSIVE}: not run yet"
    if not converged:
        return UNCONVERGED
    if pairs < MIN_SEEDS or lo != lo:
        return f"{INCONCLUSIVE}: fewer than {MIN_SEEDS} pairs"
    if hi < 0:
        return CLOSES if kind != "interaction" else INTERACTS.format(direction="narrower")
    if lo > 0:
        return WIDENS if kind != "interaction" else INTERACTS.format(direction="wider")
    if -delta < lo and hi < delta:
        return EQUIVALENT.format(delta=delta_points)
    return INCONCLUSIVE


def _how(gap: float, glo: float, ghi: float, tlo: float, thi: float) -> str:
    """Where a change in the gap comes from: test accuracy, or how well the training set is fit."""
    if glo != glo:
        return ""
    test = "test accuracy rises" if tlo > 0 else "test accuracy falls" if thi < 0 else "test accuracy not detectably changed"
    if ghi < 0 and tlo <= 0:
        return f"{test}: the narrower gap comes from fitting the training set less"
    return test


def sentence(row: pd.Series) -> str:
    """One plain sentence per claim, with its adjusted intervals."""
    def ci(metric: str) -> str:
        v, lo, hi = (100 * row[f"{metric}_{k}"] for k in ("diff", "lo", "hi"))
        return f"{v:+.1f} points" + (f" [{lo:+.1f}, {hi:+.1f}]" if lo == lo else " (no interval)")

    how = f"; {row['how']}" if row["how"] else ""
    return f"**{row['claim']}** — {row['verdict']}: gap {ci('gap')}, test accuracy {ci('test_acc')}{how}."
