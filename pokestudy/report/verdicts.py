"""Verdicts: the study's family of claims, each with a family-wise interval and a plain label, and
where a main effect varies across the grid, its simple effects beside it.

The claims are every main effect (each level against its factor's first level), plus the
contrasts and interactions the spec's `report:` block declares. The replicate is the unit of a claim:
each replicate (one seed: its own data split, initialisation, batch order and augmentation draws) gives
it one value, the mean over the other factors' cells of its paired differences in the gap (and in test
accuracy) — same replicate, same levels of the other factors. The pairs of one replicate share its
split, so they are correlated and counting them as independent would make the intervals too narrow;
the replicates are independent, and so are their values. A replicate that lacks a pair in any cell of
the claim's grid (a trial not run yet, or failed) is left out of that claim, so every value the claim
averages is the same average over the grid. Simple effects are per replicate likewise.

A main effect is an average over the levels of the other factors. For every pair of factors an
F-test asks whether one's effect varies with the other's level (their interaction, in the full
factorial model with the replicate as a block: the block absorbs what a replicate's split shifts for
all its conditions alike, and the residual keeps what it shifts differently). Where it does, or where
a declared interaction is decided, the main effect is given per level of the factor it varies with
(simple effects) beside the pooled one, and its sentence says where it is smallest and largest.

The family is everything the verdicts rest on, counted before looking at the data: per claim its
gap and its test-accuracy interval, and one test per pair of factors. Every interval is at 1 − α/m
and every test at α/m (Bonferroni, m the family's size): all hold together with probability ≥ 95%.
The simple effects (per main effect and other factor, at each level, gap and test accuracy) are a
second family with its own correction, counted likewise before the data and whether shown or not:
they say where a main effect holds, and no label rests on them, so they do not widen the verdicts.

Intervals are plain t-intervals over replicates; a study whose replicates were planned from a pilot
(Stein's two-stage design, `power`) gets Stein's intervals instead, which keep the family's coverage.
An undecided claim's `needed` says how many replicates would decide it (`power.needed`).

Labels come from `stats.label`: for the gap, *closes* / *widens* (interval below / above 0),
*equivalent within ±δ*, *inconclusive*, or *inconclusive: budget too short* (a condition the claim
rests on was still learning at the end of its budget, `train.settled`); an interaction reads *the
effect differs: narrower / wider gap*. `how` says what moved: a narrower gap with test accuracy
that does not rise comes from fitting the training set less, not from generalising better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from pokestudy.report import power, stats
from pokestudy.report.stats import (ALPHA, CLOSES, EQUIVALENT, INCONCLUSIVE, INTERACTS, NOT_RUN, TOO_FEW,  # noqa: F401
                                    UNCONVERGED, WIDENS, FTest, family_confidence, interval_text, label)
from pokestudy.report.tables import column, factors, levels, matched
from pokestudy.study.spec import ReportSpec

COLUMNS = ["kind", "claim", "replicates", "verdict", "needed", "how", "gap_diff", "gap_sd", "gap_lo", "gap_hi",
           "test_acc_diff", "test_acc_lo", "test_acc_hi", "averaged", "varies_with", "heterogeneity", "everywhere",
           "family"]


@dataclass(frozen=True)
class Claim:
    kind: str  # "effect", "contrast", "interaction", or "simple" (a main effect at one level of another factor)
    name: str  # what is compared, in words
    gap: pd.Series  # per replicate (indexed by seed): the mean paired difference of the gap over the grid's cells
    test: pd.Series  # the same for test accuracy
    converged: bool  # every trial the claim rests on converged
    factor: str = ""  # the factor whose levels are compared (an interaction's first factor)
    level: str = ""
    reference: str = ""
    by: str = ""  # simple effects: the other factor, and its level; interactions: the second factor
    at: str = ""

    @property
    def effect(self) -> str:
        """The main effect this claim is (or is a simple effect of)."""
        return f"{self.factor}={self.level} vs {self.reference}"


@dataclass(frozen=True)
class Analysis:
    """Everything `verdicts` computed: the claims, every candidate simple effect (`shown` where its
    main effect varies with that factor or a declared interaction is decided), the heterogeneity
    tests, the size and confidence of the verdicts' family and of the simple effects' family, each
    claim's gap per replicate (what `power.plan` plans from), Stein's pilot size (None: plain t) and
    the ceiling of `needed`."""

    verdicts: pd.DataFrame
    simple: pd.DataFrame
    heterogeneity: pd.DataFrame
    size: int
    confidence: float
    simple_size: int
    simple_confidence: float
    differences: dict[str, pd.Series] = field(default_factory=dict)
    pilot_n: int | None = None
    ceiling: int = power.CEILING


def claims(df: pd.DataFrame, report: ReportSpec) -> list[Claim]:
    """The study's claims, from its factors (in the spec's level order) and its `report:` block. The
    family is fixed by the spec, so a study still running (or a subset of rows) makes the same claims."""
    ls = levels(df)
    out = [_contrast(df, "effect", factor, level, names[0]) for factor, names in ls.items() for level in names[1:]]
    out += [_contrast(df, "contrast", c.factor, c.level, c.reference) for c in report.contrasts]
    for first, second in report.interactions:
        a, b = ls[first], ls[second]
        out += [_interaction(df, first, second, (a[0], la), (b[0], lb)) for la in a[1:] for lb in b[1:]]
    return out


def simple_effects(df: pd.DataFrame, main: list[Claim]) -> list[Claim]:
    """Every main effect at every level of every other factor: the candidates, in the family whether shown or not."""
    ls = levels(df)
    out = []
    for c in main:
        for by in (f for f in ls if f != c.factor):
            for at in ls[by]:
                s = _contrast(df[df[column(by)] == at], "simple", c.factor, c.level, c.reference, fixed=by)
                out.append(Claim("simple", f"{c.name} at {by}={at}", s.gap, s.test, s.converged, c.factor, c.level,
                                 c.reference, by, at))
    return out


def _cells(df: pd.DataFrame, compared: tuple[str, ...], fixed: str = "") -> int:
    """How many cells of the other factors' grid a replicate must have for a claim (`fixed`: held at one level)."""
    return math.prod(len(ls) for f, ls in levels(df).items() if f not in (*compared, fixed))


def _per_replicate(per_cell: pd.Series, cells: int) -> pd.Series:
    """One value per replicate (indexed by seed): the mean of its within-cell differences, for the replicates
    that have one in every one of the claim's `cells`; the others are left out (not run yet, or failed)."""
    if per_cell.empty:
        return pd.Series(dtype=float)
    by = per_cell.groupby(level="seed")
    return by.mean()[by.size() == cells]


def _contrast(df: pd.DataFrame, kind: str, factor: str, level: str, reference: str, fixed: str = "") -> Claim:
    """`level − reference` of `factor`; for a simple effect `df` holds one level of the factor `fixed`."""
    rows = df[df[column(factor)].isin([level, reference])]
    cells = _cells(df, (factor,), fixed)
    gap, test = (matched(df, factor, m, level, reference) for m in ("gap", "test_acc"))
    name = f"{factor}={level} vs {reference}"
    return Claim(kind, name, _per_replicate(gap["level"] - gap["reference"], cells),
                 _per_replicate(test["level"] - test["reference"], cells), bool(rows["converged"].all()), factor,
                 level, reference)


def _interaction(df: pd.DataFrame, first: str, second: str, a: tuple[str, str], b: tuple[str, str]) -> Claim:
    """How the effect of `first` (a[1] − a[0]) changes from second=b[0] to second=b[1]."""
    rest = [column(c) for c in factors(df) if c not in (first, second)]
    rows = df[df[column(first)].isin(a) & df[column(second)].isin(b)]
    cells = [(x, y) for x in a for y in b]

    def diff(metric: str) -> pd.Series:
        wide = rows.pivot_table(index=[*rest, "seed"], columns=[column(first), column(second)], values=metric,
                                observed=True)
        if not set(cells) <= set(wide.columns):
            return pd.Series(dtype=float)  # a cell has no finished trial yet
        per_cell = (wide[(a[1], b[1])] - wide[(a[0], b[1])]) - (wide[(a[1], b[0])] - wide[(a[0], b[0])])
        return _per_replicate(per_cell.dropna(), _cells(df, (first, second)))

    name = f"({first}={a[1]} − {a[0]}) at {second}={b[1]} vs {b[0]}"
    return Claim("interaction", name, diff("gap"), diff("test_acc"), bool(rows["converged"].all()), first, by=second)


def family_size(main: list[Claim], pairs: list[tuple[str, str]]) -> int:
    """The verdicts' family: two intervals per claim (gap and test accuracy), one test per pair of factors."""
    return 2 * len(main) + len(pairs)


def analyse(df: pd.DataFrame, report: ReportSpec, pilot_n: int | None = None, ceiling: int = power.CEILING) -> Analysis:
    """The family's claims, tests and simple effects, each at the family-wise level, on any rows of a trials frame.
    `pilot_n`: the study planned its replicates from replicates 0 … pilot_n − 1 (Stein's design, `power.plan`;
    an adaptive study numbers its replicates from 0), whose intervals its claims then get; None: plain
    t-intervals. `ceiling`: the most replicates `needed` considers."""
    main = claims(df, report)
    pilot = list(range(pilot_n)) if pilot_n else None
    ls = levels(df)
    names = [f for f in factors(df) if len(ls[f]) > 1]
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    simple = simple_effects(df, [c for c in main if c.kind == "effect"])
    size, simple_size = family_size(main, pairs), max(1, 2 * len(simple))
    delta = report.delta / 100
    found = stats.interaction_tests(df, "gap", [column(f) for f in names], "seed",
                                    [(column(a), column(b)) for a, b in pairs])
    tests = {frozenset(pair): found[(column(pair[0]), column(pair[1]))] for pair in pairs}
    heterogeneity = pd.DataFrame([{"factors": f"{a} × {b}", "F": t.f, "df_num": t.df_num, "df_den": t.df_den, "p": t.p,
                                   "screened": t.p < ALPHA, "varies": t.p < ALPHA / size}  # NaN compares False
                                  for (a, b), t in zip(pairs, tests.values())],
                                 columns=["factors", "F", "df_num", "df_den", "p", "screened", "varies"])
    rows = {c.name: _row(c, delta, size, _averages(c, names), pilot, ceiling) for c in main}
    differs = {INTERACTS.format(direction=d) for d in ("narrower", "wider")}
    decided = {(c.factor, c.by) for c in main if c.kind == "interaction" and rows[c.name]["verdict"] in differs}

    def shown(s: Claim) -> bool:  # showing more costs nothing: every candidate is in its family already
        return bool(tests[frozenset((s.factor, s.by))].p < ALPHA or (s.factor, s.by) in decided)

    simple_table = pd.DataFrame([{"effect": s.effect, "by": s.by, "at": s.at, "shown": shown(s),
                                  **_row(s, delta, simple_size, False, pilot, ceiling)}
                                 for s in simple if s.by in names],
                                columns=["effect", "by", "at", "shown", *COLUMNS])
    for c in (c for c in main if c.kind == "effect"):
        mine = simple_table[simple_table["effect"] == c.name]
        others = {f: tests[frozenset((c.factor, f))] for f in names if f != c.factor}
        rows[c.name].update(varies_with=", ".join(f for f, t in others.items() if t.p < ALPHA / size),
                            heterogeneity="; ".join(_variation(f, t, size) for f, t in others.items() if t.p == t.p),
                            everywhere=bool(len(mine) and ((mine["gap_hi"] < 0).all() or (mine["gap_lo"] > 0).all())))
    table = pd.DataFrame(list(rows.values()), columns=COLUMNS)
    return Analysis(table, simple_table, heterogeneity, size, family_confidence(size), simple_size,
                    family_confidence(simple_size), {c.name: c.gap for c in main}, pilot_n, ceiling)


def _averages(c: Claim, names: list[str]) -> bool:
    """Whether a claim's number is an average over levels of factors it does not compare."""
    return bool(set(names) - {c.factor, c.by})


def _variation(factor: str, test: FTest, size: int) -> str:
    """Whether a main effect varies with `factor`, in words: established at the family's level, only
    suggested (p < α: its simple effects are shown), or not detected."""
    if test.p < ALPHA / size:
        return f"varies with {factor}: {test.text()}"
    if test.p < ALPHA:
        return f"perhaps with {factor} ({test.text()}: not below α/m = {ALPHA / size:.2g})"
    return f"not detectably with {factor}: {test.text()}"


def verdicts(df: pd.DataFrame, report: ReportSpec) -> pd.DataFrame:
    """One row per claim: gap and test-accuracy differences with family-wise intervals, and a label.
    Works on any subset of a trials frame's rows (the family is the spec's, whatever has run)."""
    return analyse(df, report).verdicts


def _estimate(values: pd.Series, confidence: float, pilot: list | None) -> stats.Estimate:
    """The interval over a claim's replicates in seed order; under Stein's design its pilot is its values
    in the study's pilot replicates (the first, fewer where it lacks one: as `power.plan` saw them)."""
    values = values.sort_index()
    pilot_n = None if pilot is None else int(values.index.isin(pilot).sum())
    return power.interval(values.to_numpy(float), confidence, pilot_n)


def _row(c: Claim, delta: float, size: int, averaged: bool, pilot: list | None, ceiling: int) -> dict:
    confidence = family_confidence(size)
    gap, test = _estimate(c.gap, confidence, pilot), _estimate(c.test, confidence, pilot)
    words = ({"below": INTERACTS.format(direction="narrower"), "above": INTERACTS.format(direction="wider")}
             if c.kind == "interaction" else {})
    verdict = label(gap.lo, gap.hi, pairs=len(c.gap), converged=c.converged, delta=delta, **words)
    need = "" if power.decided(verdict) or gap.sd != gap.sd else power.needed_text(
        power.needed(gap.sd, delta, size, pilot_n=len(pilot) if pilot else None, ceiling=ceiling), ceiling)
    return {"kind": c.kind, "claim": c.name, "replicates": len(c.gap), "verdict": verdict, "needed": need,
            "how": _how(gap.lo, gap.hi, test.lo, test.hi), "gap_diff": gap.value, "gap_sd": gap.sd, "gap_lo": gap.lo,
            "gap_hi": gap.hi, "test_acc_diff": test.value, "test_acc_lo": test.lo, "test_acc_hi": test.hi,
            "averaged": averaged, "varies_with": "", "heterogeneity": "", "everywhere": None, "family": size}


def _how(glo: float, ghi: float, tlo: float, thi: float) -> str:
    """Where a change in the gap comes from: test accuracy, or how well the training set is fit."""
    if glo != glo:
        return ""
    test = ("test accuracy rises" if tlo > 0 else "test accuracy falls" if thi < 0
            else "test accuracy not detectably changed")
    if ghi < 0 and tlo <= 0:
        return f"{test}: the narrower gap comes from fitting the training set less"
    return test


def _ci(row: pd.Series, metric: str) -> str:
    return interval_text(row[f"{metric}_diff"], row[f"{metric}_lo"], row[f"{metric}_hi"], unit=" points")


def sentence(row: pd.Series, simple: pd.DataFrame | None = None) -> str:
    """One plain sentence per claim, with its family-wise intervals. A pooled number is said to be an
    average over the grid, and where its simple effects are shown, from where to where it goes."""
    spread = " averaged over the grid" if row["averaged"] else ""
    mine = pd.DataFrame(columns=["by"])
    if simple is not None and row["kind"] == "effect":
        mine = simple[(simple["effect"] == row["claim"]) & simple["shown"]]
    for by in dict.fromkeys(mine["by"]):
        at = mine[mine["by"] == by].sort_values("gap_diff")
        low, high = at.iloc[0], at.iloc[-1]
        spread += f"; from {_ci(low, 'gap')} at {by}={low['at']} to {_ci(high, 'gap')} at {by}={high['at']}"
    if row["heterogeneity"]:
        same = "; the same direction at every level of each other factor" if row["everywhere"] else ""
        spread += f" ({row['heterogeneity']}{same})"
    how = f"; {row['how']}" if row["how"] else ""
    return (f"**{row['claim']}** — {row['verdict']}: gap {_ci(row, 'gap')}{spread}, "
            f"test accuracy {_ci(row, 'test_acc')}{how}.")
