"""The report's one statistics module, checked against scipy and statsmodels on fixed inputs."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

from pokestudy.report import stats

X = np.array([0.12, 0.31, 0.18, 0.25, 0.09, 0.22])
Y = np.array([0.35, 0.41, 0.29, 0.52, 0.33])
PACKAGE = Path(__file__).resolve().parents[1] / "pokestudy"


@pytest.mark.fast
@pytest.mark.parametrize("confidence", [0.95, 1 - 0.05 / 14])
def test_mean_paired_and_welch_intervals_match_statsmodels(confidence: float):
    e = stats.mean_interval(X, confidence)
    assert (e.lo, e.hi) == pytest.approx(DescrStatsW(X).tconfint_mean(alpha=1 - confidence), rel=1e-12)
    assert e.value == pytest.approx(X.mean()) and e.sd == pytest.approx(X.std(ddof=1)) and e.n == len(X)
    p = stats.paired(X, X[::-1] * 0.9, confidence)
    ref = sps.ttest_rel(X, X[::-1] * 0.9).confidence_interval(confidence)
    assert (p.lo, p.hi) == pytest.approx((ref.low, ref.high), rel=1e-12)
    assert (p.lo, p.hi) == pytest.approx(DescrStatsW(X - X[::-1] * 0.9).tconfint_mean(alpha=1 - confidence))
    w = stats.welch(X, Y, confidence)  # mean(Y) − mean(X), unequal variances
    lo, hi = CompareMeans(DescrStatsW(Y), DescrStatsW(X)).tconfint_diff(alpha=1 - confidence, usevar="unequal")
    assert (w.value, w.lo, w.hi) == pytest.approx((Y.mean() - X.mean(), lo, hi), rel=1e-12)


@pytest.mark.fast
def test_under_three_values_there_is_no_interval_and_identical_values_give_the_point():
    two = stats.mean_interval([0.1, 0.2])
    assert math.isnan(two.lo) and two.value == pytest.approx(0.15)
    assert math.isnan(stats.welch(X, Y[:2]).lo)
    same = stats.mean_interval([0.3, 0.3, 0.3])
    assert (same.lo, same.hi) == pytest.approx((0.3, 0.3))


@pytest.mark.fast
def test_the_family_wise_level_is_bonferroni_as_statsmodels_counts_it():
    rng = np.random.default_rng(3)
    samples = [rng.normal(mu, 0.05, 6) for mu in (0.0, 0.02, 0.06, 0.1, -0.08)]
    confidence = stats.family_confidence(len(samples))
    excluded = [not (e.lo <= 0 <= e.hi) for e in (stats.mean_interval(s, confidence) for s in samples)]
    reject, *_ = multipletests([sps.ttest_1samp(s, 0).pvalue for s in samples], alpha=0.05, method="bonferroni")
    assert excluded == list(reject) and any(excluded) and not all(excluded)
    assert stats.t_quantile(0.95, 7) == pytest.approx(sps.t.interval(0.95, 7)[1])


@pytest.mark.fast
def test_line_fit_prediction_inverse_and_lack_of_fit_match_statsmodels():
    x = np.log(np.repeat([2.0, 4.0, 8.0, 16.0], 3))
    y = 0.9 - 0.2 * x + 0.04 * x ** 2 + np.tile([0.01, -0.012, 0.004], 4)  # curved: a line lacks fit
    line = stats.fit_line(x, y, 0.95)
    ols = sm.OLS(y, sm.add_constant(x)).fit()
    assert (line.intercept, line.slope, line.r2, line.sse) == pytest.approx((*ols.params, ols.rsquared, ols.ssr))
    assert (line.slope_lo, line.slope_hi) == pytest.approx(tuple(ols.conf_int(0.05)[1]))
    # the inverse-regression bounds are where the mean's confidence band reaches the target (a falling line:
    # its band's lower edge at the lower bound, its upper edge at the upper one)
    x0, lo, hi = stats.inverse(line, 0.5)
    assert line.slope_hi < 0 and line(x0) == pytest.approx(0.5) and lo < x0 < hi
    for bound, side in ((lo, "mean_ci_lower"), (hi, "mean_ci_upper")):
        band = ols.get_prediction(np.array([[1.0, bound]])).summary_frame(alpha=0.05)[side].iloc[0]
        assert band == pytest.approx(0.5, abs=1e-9)
    # the mean of 3 new observations: variance s²/3 + the mean's own
    pred = ols.get_prediction(np.array([[1.0, 1.0]]))
    half = sps.t.ppf(0.975, ols.df_resid) * math.sqrt(ols.scale / 3 + pred.se_mean[0] ** 2)
    assert stats.predict_mean(line, 1.0, 3) == pytest.approx((pred.predicted_mean[0], pred.predicted_mean[0] - half,
                                                              pred.predicted_mean[0] + half))
    groups = np.repeat([0, 1, 2, 3], 3)
    lof = stats.lack_of_fit(groups, y, line(x), 2)
    full = smf.ols("y ~ C(g)", pd.DataFrame({"y": y, "g": groups})).fit()
    f, p, df_diff = full.compare_f_test(ols)
    assert (lof.f, lof.p, lof.df_num, lof.df_den) == pytest.approx((f, p, df_diff, full.df_resid))
    assert lof.p < 0.01


@pytest.mark.fast
def test_interaction_tests_match_a_nested_model_comparison():
    rng = np.random.default_rng(0)
    rows = [{"a": a, "b": b, "seed": s, "y": (0.1 if a == "on" and b == "y" else 0.0) + rng.normal(0, 0.02)}
            for a in ("off", "on") for b in ("x", "y") for s in range(3)]
    frame = pd.DataFrame(rows)
    test = stats.interaction_tests(frame, "y", ["a", "b"], "seed", [("a", "b")])[("a", "b")]
    full = smf.ols("y ~ C(a) * C(b) + C(seed)", frame).fit()
    f, p, _ = full.compare_f_test(smf.ols("y ~ C(a) + C(b) + C(seed)", frame).fit())
    assert (test.f, test.p, test.df_num, test.df_den) == pytest.approx((f, p, 1, full.df_resid))
    missing = frame[~((frame["a"] == "on") & (frame["b"] == "y"))]  # a cell not run yet: nothing to test
    assert math.isnan(stats.interaction_tests(missing, "y", ["a", "b"], "seed", [("a", "b")])[("a", "b")].p)


@pytest.mark.fast
def test_the_one_labeller_and_the_one_formatter():
    kw = {"pairs": 3, "delta": 0.02}
    assert stats.label(-0.1, -0.05, **kw) == stats.CLOSES and stats.label(0.01, 0.05, **kw) == stats.WIDENS
    assert stats.label(-0.01, 0.015, **kw) == "equivalent within ±2 points"
    assert stats.label(-0.05, 0.05, **kw) == stats.INCONCLUSIVE
    assert stats.label(-0.1, -0.05, pairs=3, converged=False) == stats.UNCONVERGED
    assert stats.label(math.nan, math.nan, pairs=2) == "inconclusive: fewer than 3 replicates"
    assert stats.label(math.nan, math.nan, pairs=0) == stats.NOT_RUN
    assert stats.label(0.01, 0.05, pairs=3, below=stats.LOWER, above=stats.HIGHER) == "higher"
    assert stats.interval_text(0.075, 0.049, 0.101, unit=" points") == "+7.5 points [+4.9, +10.1]"
    assert stats.interval_text(0.671, 0.648, 0.694, spec=".1f", style="pm") == "67.1 ± 2.3"
    assert stats.interval_text(0.2, math.nan, math.nan) == "+20.0 (no CI)"
    assert stats.interval_text(640.4, 490.2, 871.0, scale=1, spec=",.0f") == "640 [490, 871]"


@pytest.mark.fast
def test_one_t_quantile_call_site_and_one_labeller_in_the_package():
    sources = {p: p.read_text() for p in PACKAGE.rglob("*.py")}
    quantiles = {p.name for p, text in sources.items() if re.search(r"\bt\.(ppf|isf|interval)\(", text)}
    assert quantiles == {"stats.py"}
    labellers = {p.name for p, text in sources.items() if re.search(r"^def (_?label)\(", text, re.M)}
    assert labellers == {"stats.py"}
    assert not [p for p, text in sources.items() if re.search(r"\.attrs\[|df\.attrs|\.attrs\.update", text)]
    assert not [p for p, text in sources.items() if "0.975" in text]
