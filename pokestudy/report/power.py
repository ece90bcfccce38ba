"""Power, stated, and replicates added where they decide claims: how many replicates each claim would need,
and Stein's two-stage design that plans them from a pilot without costing the family-wise error.

**Replicates that decide a claim.** A family-wise interval of half-width h < δ/2 always decides its claim:
if it excludes 0 it names a direction, and if it contains 0 it lies within ±2h ⊂ ±δ (equivalence). So the
replicates a claim needs are the smallest n (at least MIN_SEEDS, below which no label is given) with
t_{n−1, 1−α/(2m)} · s / √n < δ/2, s its observed SD over replicates and m the family's size. This is a
projection from an estimated SD, not a promise; above a ceiling the claim is one the study cannot decide.

**Stein's two-stage procedure** (an adaptive study, `replicates: {min: n0, max: n_max}`). After the n0
pilot replicates the study runs N = max(n0, min(n_max, max over claims of N_c)) replicates in all, N_c the
smallest n with t_{n0−1, 1−α/(2m)} · s_c / √n < δ/2 (s_c the claim's pilot SD; that is ⌈(t · s_c / h)²⌉
for an h just under δ/2). N depends on the pilot's variances only, never on its means. Each claim's
final interval is x̄_N ± t_{n0−1, 1−α/(2m)} · s_pilot / √N: the mean over all N replicates, the *pilot's*
SD and its n0 − 1 degrees of freedom.

Why its coverage is exact: replicates are independent, and each one's vector of claim values (all claims
are linear in that replicate's trials) is taken as multivariate normal. The pilot's mean vector is then
independent of its sample covariance, and the second stage's replicates are independent of the pilot. N is
a function of the pilot covariance alone, so given it, a claim's pilot mean is still N(μ, σ²/n0), the
mean of its N − n0 later replicates N(μ, σ²/(N − n0)), and x̄_N, their weighted mean, N(μ, σ²/N),
independent of s²_pilot, with (n0 − 1) s²_pilot / σ² ~ χ²_{n0−1}. Hence (x̄_N − μ) / (s_pilot / √N) ~
t_{n0−1} exactly, whatever N is: each interval covers with probability 1 − α/m, and by Bonferroni all of
the family's together with probability ≥ 1 − α. A study stopped short of N by its budget (a wall-clock
rule that does not look at the results) keeps the guarantee at the N it reached; any rule that looks at
the means (stopping when the labels look settled) loses it. The plain t-interval over all N is not
exact (N depends on the pilot SD, which is part of the final SD): slightly liberal. The heterogeneity
F-tests stay plain, approximate when N was planned. `tests/test_power.py` simulates the design and
checks both family-wise error rates.

The price is the pilot's few degrees of freedom: for a family of 9 and a claim SD of δ/2, the plain t
needs 12 replicates, Stein's design 179 after a pilot of 3, 30 after 5, 16 after 8.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from pokestudy.report.stats import (INCONCLUSIVE, MIN_SEEDS, UNCONVERGED, Estimate, family_confidence, mean_interval,
                                    t_quantile)

CEILING = 50  # replicates beyond which a claim counts as one the study cannot decide
Values = Sequence[float] | np.ndarray | pd.Series

# Every function below also takes arrays with leading axes of independent studies: the simulation in
# tests/test_power.py runs thousands of studies through this same code at once.


def _t(confidence: float, dof: np.ndarray | float) -> np.ndarray:
    """`stats.t_quantile` elementwise (NaN under one degree of freedom)."""
    dof = np.asarray(dof, dtype=float)
    values, where = np.unique(dof, return_inverse=True)
    table = np.array([t_quantile(confidence, d) if d >= 1 else math.nan for d in values])
    return table[where].reshape(dof.shape)


def _count_sd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Along the last axis, NaN meaning absent: how many values, and their SD (NaN under two)."""
    n = (~np.isnan(x)).sum(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # under two values: NaN, as meant
        return n, np.nanstd(x, axis=-1, ddof=1)


def half_width(sd: np.ndarray | float, n: np.ndarray | int, confidence: float,
               pilot_n: np.ndarray | int | None = None) -> np.ndarray:
    """t · s / √n at n replicates: t on n − 1 degrees of freedom, or on the pilot's n0 − 1 under Stein's."""
    dof = np.asarray(n) - 1 if pilot_n is None else np.asarray(pilot_n) - 1
    return _t(confidence, dof) * sd / np.sqrt(n)


def _first_n(sd: np.ndarray | float, delta: float, confidence: float, pilot_n: np.ndarray | int | None,
             ceiling: int) -> np.ndarray:
    """Elementwise: the smallest n in MIN_SEEDS..ceiling whose half-width is under δ/2; ceiling + 1 where none is
    (an unknown SD too)."""
    ns = np.arange(MIN_SEEDS, ceiling + 1)
    pilot = None if pilot_n is None else np.asarray(pilot_n)[..., None]
    ok = half_width(np.asarray(sd, dtype=float)[..., None], ns, confidence, pilot) < delta / 2
    return np.where(ok.any(-1), ns[ok.argmax(-1)], ceiling + 1)


def needed(sd: float, delta: float, size: int, *, pilot_n: int | None = None, ceiling: int = CEILING) -> int | None:
    """The smallest n ≥ MIN_SEEDS replicates whose family-wise interval (`size` intervals) has a half-width
    under δ/2 (δ a fraction, like `sd`), which decides the claim whatever its mean; None above `ceiling`."""
    n = int(_first_n(sd, delta, family_confidence(size), pilot_n, ceiling))
    return n if n <= ceiling else None


def needed_text(n: int | None, ceiling: int = CEILING) -> str:
    return f"> {ceiling}" if n is None else str(n)


def _by_claim(pilot: Iterable[Values]) -> np.ndarray:
    """Per-claim pilot values as one array, claims on the second-last axis and replicates on the last, NaN
    where a claim lacks a replicate: Series are aligned on their index (the replicate), arrays stacked."""
    pilot = list(pilot)
    if not pilot:
        return np.empty((0, 0))
    if all(isinstance(p, pd.Series) for p in pilot):
        return pd.concat(pilot, axis=1).to_numpy(float).T
    return np.stack([np.asarray(p, dtype=float) for p in pilot], axis=-2)


def plan(pilot: Iterable[Values], delta: float, family_size: int, n_max: int) -> int | np.ndarray:
    """Stein's second stage: the total replicates N from each claim's per-replicate differences in the pilot,
    its first n0 replicates (`analysis.differences.values()` of the pilot's trials; δ a fraction, like the
    differences). N depends only on the pilot variances. A claim with under two pilot values has no variance
    to plan from and does not count."""
    n, sd = _count_sd(_by_claim(pilot))
    want = _first_n(sd, delta, family_confidence(family_size), n, n_max)
    want = np.where(np.isnan(sd), 0, np.minimum(want, n_max))
    out = np.maximum(n.max(-1, initial=0), want.max(-1, initial=0))
    return int(out) if out.ndim == 0 else out


def stein(values: np.ndarray, pilot_n: int, confidence: float) -> tuple[np.ndarray, ...]:
    """Stein's interval over the last axis (replicates in order, NaN past a study's N): the mean of all, the
    first `pilot_n` values' SD and its degrees of freedom. Mean, SD, bounds (NaN under MIN_SEEDS replicates or
    two pilot values) and replicates."""
    x = np.asarray(values, dtype=float)
    n, _ = _count_sd(x)
    pilot, sd = _count_sd(x[..., :pilot_n])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no values: NaN
        mean = np.nanmean(x, axis=-1)
        h = np.where((n >= MIN_SEEDS) & (pilot >= 2), half_width(sd, n, confidence, pilot), math.nan)
    return mean, sd, mean - h, mean + h, n


def interval(values: Values, confidence: float, pilot_n: int | None = None) -> Estimate:
    """A claim's interval over its replicates, in order: Stein's when the study ran adaptively (its first
    `pilot_n` values are its pilot), else the plain t-interval. `sd` is the SD the interval uses."""
    if pilot_n is None:
        return mean_interval(values, confidence)
    mean, sd, lo, hi, n = stein(np.asarray(values, dtype=float), pilot_n, confidence)
    return Estimate(float(mean), float(sd), float(lo), float(hi), int(n))


def decided(verdict: str) -> bool:
    """Closes / widens / equivalent (or an interaction's direction): every label but the inconclusive ones."""
    return not verdict.startswith(INCONCLUSIVE)


def sentences(verdicts: pd.DataFrame, delta: float, size: int, pilot_n: int | None, ceiling: int) -> list[str]:
    """The summary's power lines (δ a fraction): per undecided claim the replicates that would decide it, the
    claims the study cannot decide within `ceiling`, and whether ±δ is out of reach for every claim."""
    known = verdicts[verdicts["gap_sd"].astype(float).notna()]
    if known.empty:
        return []
    need = {r["claim"]: needed(float(r["gap_sd"]), delta, size, pilot_n=pilot_n, ceiling=ceiling)
            for _, r in known.iterrows()}
    confidence = family_confidence(size)
    undecided = verdicts[[not decided(v) for v in verdicts["verdict"]]]
    if undecided.empty:
        lines = ["**Power**: every claim is decided."]
    else:
        rule = (f"Stein's t on the pilot's {pilot_n - 1} degrees of freedom" if pilot_n
                else "t on n − 1 degrees of freedom")
        lines = [f"**Power**: the replicates each undecided claim would need — where its family-wise gap interval "
                 f"({100 * confidence:.2f}%, {rule}), projected from its SD, would be narrower than ±δ/2 = "
                 f"±{50 * delta:g} points; such an interval excludes 0 or lies within ±{100 * delta:g}.", ""]
    for _, r in undecided.iterrows():
        if r["claim"] not in need:
            lines.append(f"- {r['claim']}: not known yet ({r['replicates']} replicate(s), no SD)")
            continue
        n, longer = need[r["claim"]], "; and first a longer budget" if r["verdict"] == UNCONVERGED else ""
        over = (str(r["replicates"]) if not pilot_n else f"the {pilot_n}-replicate pilot" if r["replicates"] >= pilot_n
                else f"{r['replicates']} replicate(s) of the {pilot_n}-replicate pilot")
        lines.append(f"- {r['claim']}: {f'about {n}' if n else f'more than {ceiling}'} replicates (SD "
                     f"{100 * r['gap_sd']:.2f} points over {over}){longer}")
    beyond = [c for c in undecided["claim"] if c in need and need[c] is None]
    if beyond:
        lines += ["", f"**Not decidable within {ceiling} replicates**: {'; '.join(beyond)}."]
    if all(n is None for n in need.values()):
        reach = 2 * float(half_width(float(known["gap_sd"].min()), ceiling, confidence, pilot_n))
        lines += ["", f"**±{100 * delta:g} points is out of reach**: no claim's interval would be narrower than "
                  f"±{50 * delta:g} points within {ceiling} replicates; with {ceiling}, the smallest margin any claim "
                  f"would be decided at is ±{100 * reach:.1f} points."]
    return lines
