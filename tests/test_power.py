"""Power and the adaptive design, without training: `needed` against a hand computation, Stein's plan and
interval, and many simulated adaptive studies run through the report's own planner, interval and labeller,
whose family-wise false-claim rates must stay within 5%. `pytest tests/test_power.py -s` prints the rates."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from pokestudy.report import power
from pokestudy.report.stats import CLOSES, EQUIVALENT, WIDENS, family_confidence, label

DELTA = 0.02  # the spec's default margin, 2 points
CLAIMS = 4  # a family of four claims; the simulated family is their four intervals (no Bonferroni slack from others)
SPREAD = np.array([0.5, 1.0, 1.5, 2.0])  # the claims' SDs relative to the scenario's: the largest drives N
RHO = 0.3  # claims of one replicate are correlated (they share its trials)
N0 = 3
STUDIES = 4000  # per scenario
ALPHA = 0.05
SLACK = 2 * math.sqrt(ALPHA * (1 - ALPHA) / STUDIES)  # two binomial standard errors at the bound


@pytest.mark.fast
def test_needed_matches_a_hand_computation():
    # SD 2 points, δ = 2 points, a family of 4 (each interval at 1 − 0.05/4, t at 1 − 0.05/8): the smallest n
    # with t_{n−1} · 0.02 / √n < 0.01, i.e. t_{n−1} < √n / 2. From tables: n = 28: t_27 = 2.676 > 2.646;
    # n = 29: t_28 = 2.669 < 2.693.
    t = [sps.t.ppf(1 - 0.05 / 8, dof) for dof in (27, 28)]
    assert t[0] > math.sqrt(28) / 2 and t[1] < math.sqrt(29) / 2 and t == pytest.approx([2.676, 2.669], abs=1e-3)
    assert power.needed(0.02, DELTA, 4) == 29
    assert power.needed(0.02, DELTA, 4, ceiling=28) is None and power.needed_text(None) == "> 50"
    assert power.needed(0.0, DELTA, 4) == 3, "no variance: the fewest replicates a label needs"
    # under Stein's design the quantile keeps the pilot's 2 degrees of freedom: n > (2 t_2 s / δ)²
    t2 = sps.t.ppf(1 - 0.05 / 8, 2)
    assert power.needed(0.005, DELTA, 4, pilot_n=3) == math.floor((2 * t2 * 0.005 / DELTA) ** 2) + 1 == 20


@pytest.mark.fast
def test_stein_plans_from_the_pilot_variances_only_and_its_interval_uses_the_pilot_sd():
    a, b = np.array([0.010, 0.015, 0.020]), np.array([0.0, 0.004, -0.004])
    t2 = sps.t.ppf(1 - 0.05 / 4, 2)  # a family of 2
    want = max(math.floor((2 * t2 * x.std(ddof=1) / DELTA) ** 2) + 1 for x in (a, b))
    assert power.plan([a, b], DELTA, 2, n_max=30) == want == 10
    assert power.plan([a + 5, b - 5], DELTA, 2, n_max=30) == want, "the means do not enter"
    assert power.plan([a * 10, b], DELTA, 2, n_max=30) == 30, "at most n_max"
    by_replicate = [pd.Series([0.01], index=[1]), pd.Series(b, index=[0, 1, 2])]  # as `analysis.differences` holds them
    assert power.plan(by_replicate, DELTA, 2, n_max=30) == 7, "a claim with one pilot value does not count"
    values = np.array([*a, 0.03, 0.0, 0.02, 0.01])
    e = power.interval(values, family_confidence(2), pilot_n=3)
    half = t2 * a.std(ddof=1) / math.sqrt(7)
    assert (e.value, e.sd, e.lo, e.hi, e.n) == pytest.approx((values.mean(), a.std(ddof=1), values.mean() - half,
                                                              values.mean() + half, 7))
    plain = power.interval(values, family_confidence(2))
    assert plain.sd == pytest.approx(values.std(ddof=1)), "without a pilot: the plain t-interval"


@dataclass(frozen=True)
class Outcome:
    false_rate: float  # any claim labelled falsely (closes/widens at effect 0, equivalent at ±δ)
    decided: float  # share of claims decided
    mean_n: float


def _simulate(effect: float, sd: float, n_max: int) -> Outcome:
    """STUDIES adaptive studies at once: a pilot of N0 replicates, N from `power.plan`, then each claim's interval
    (`power.stein`, which the report's `power.interval` is) and its label (`stats.label`), as the report makes them."""
    rng = np.random.default_rng([round(effect / DELTA), round(100 * sd / DELTA), n_max])  # a seed per scenario
    mu = effect * np.array([1, -1] * (CLAIMS // 2))  # at ±δ, half the claims above and half below
    noise = math.sqrt(RHO) * rng.standard_normal((STUDIES, n_max, 1))  # shared by a replicate's claims
    x = mu + sd * SPREAD * (noise + math.sqrt(1 - RHO) * rng.standard_normal((STUDIES, n_max, CLAIMS)))
    n = power.plan(np.moveaxis(x[:, :N0], -1, 0), DELTA, CLAIMS, n_max)  # per claim: one N per study, from its pilot
    ran = np.where(np.arange(n_max)[None, :, None] < n[:, None, None], x, np.nan)  # replicates past N never ran
    _, _, lo, hi, _ = power.stein(np.swapaxes(ran, 1, 2), N0, family_confidence(CLAIMS))  # studies × claims
    labels = np.array([[label(a, b, pairs=k, delta=DELTA) for a, b in zip(los, his)]
                       for los, his, k in zip(lo, hi, n)])
    wrong = [CLOSES, WIDENS] if effect == 0 else [EQUIVALENT.format(delta=round(100 * DELTA, 6))]
    decided = np.vectorize(power.decided)(labels)
    return Outcome(float(np.isin(labels, wrong).any(1).mean()), float(decided.mean()), float(n.mean()))


@pytest.mark.fast
@pytest.mark.parametrize("n_max", [10, 30])
@pytest.mark.parametrize("sd", [0.1 * DELTA, 0.25 * DELTA, DELTA, 3 * DELTA],
                         ids=["sd=delta/10", "sd=delta/4", "sd=delta", "sd=3delta"])
@pytest.mark.parametrize("effect", [0.0, DELTA], ids=["effect=0", "effect=+-delta"])
def test_simulated_adaptive_studies_keep_both_family_wise_error_rates(effect: float, sd: float, n_max: int):
    """Effect 0: any claim labelled closes / widens is false; effect ±δ: any claim labelled equivalent is. Each
    family-wise rate must be at most 5%, plus two binomial standard errors of Monte-Carlo slack."""
    out = _simulate(effect, sd, n_max)
    what = "closes/widens" if effect == 0 else "equivalent"
    print(f"\n{STUDIES} studies, {CLAIMS} claims at {'0' if effect == 0 else '±δ'} (δ = {100 * DELTA:g} points), "
          f"claim SDs {', '.join(f'{100 * sd * s:g}' for s in SPREAD)} points, n0 = {N0}, n_max = {n_max}: "
          f"false '{what}' {100 * out.false_rate:.2f}% family-wise (bound {100 * (ALPHA + SLACK):.2f}%), "
          f"claims decided {100 * out.decided:.1f}%, mean N {out.mean_n:.1f}")
    assert out.false_rate <= ALPHA + SLACK
