"""The report's statistics, in one place, on scipy and statsmodels: t-intervals (a mean, a paired
difference, Welch), the family-wise correction, line fits with their inverse prediction and
checks, the interaction F-tests, the one labeller and the one interval formatter. Verdicts,
compare, scaling and figures all call these, so a formula exists once.

Every interval is over replicates, the unit of replication (a replicate is one seed: its own data split,
initialisation, batch order and augmentation draws); under MIN_SEEDS values none is given.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import pandas as pd
import statsmodels.api as sm
import statsmodels.formula.api as smf
from scipy import stats

ALPHA = 0.05
MIN_SEEDS = 3  # below this a t-interval is too wide to mean anything (±300% with two seeds)

# The labels, for the gap: a difference whose family-wise interval lies below 0 / above 0 / inside ±δ.
CLOSES, WIDENS, EQUIVALENT = "closes the gap", "widens the gap", "equivalent within ±{delta:g} points"
INCONCLUSIVE, UNCONVERGED = "inconclusive", "inconclusive: budget too short"  # the second: still learning at the end
NOT_RUN, TOO_FEW = "inconclusive: not run yet", "inconclusive: fewer than {n} {unit}"
INTERACTS = "the effect differs: {direction} gap"  # an interaction: the first factor's effect changes with the second
LOWER, HIGHER = "lower", "higher"  # a plain difference (compare): below 0 / above 0


@dataclass(frozen=True)
class Estimate:
    """A mean (or a difference) with its t-interval; `lo`/`hi` are NaN under MIN_SEEDS values."""

    value: float
    sd: float
    lo: float
    hi: float
    n: int


def family_confidence(size: int, alpha: float = ALPHA) -> float:
    """Bonferroni: each of `size` intervals (or tests) at 1 − α/size, so that all of them hold
    together with probability at least 1 − α, whatever their dependence."""
    return 1 - alpha / max(1, size)


@lru_cache(maxsize=4096)
def t_quantile(confidence: float, dof: float) -> float:
    """The two-sided t quantile: the one place the package asks for one (cached: the power projections ask
    for the same quantiles for every claim)."""
    return float(stats.t.ppf((1 + confidence) / 2, dof))


def _clean(values: Sequence[float] | np.ndarray | pd.Series) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    return x[~np.isnan(x)]


def mean_interval(values: Sequence[float] | np.ndarray | pd.Series, confidence: float = 1 - ALPHA) -> Estimate:
    """The mean of `values` (NaN dropped) with its one-sample t-interval (scipy's)."""
    x = _clean(values)
    mean = float(x.mean()) if len(x) else math.nan
    sd = float(x.std(ddof=1)) if len(x) > 1 else math.nan
    if len(x) < MIN_SEEDS:
        return Estimate(mean, sd, math.nan, math.nan, len(x))
    with warnings.catch_warnings():  # identical values: scipy warns, and the interval is the point itself
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = stats.ttest_1samp(x, 0.0).confidence_interval(confidence)
    return Estimate(mean, sd, float(ci.low), float(ci.high), len(x))


def paired(level: Sequence[float] | np.ndarray | pd.Series, reference: Sequence[float] | np.ndarray | pd.Series,
           confidence: float = 1 - ALPHA) -> Estimate:
    """`level − reference` over matched pairs: the t-interval of the differences."""
    return mean_interval(np.asarray(level, float) - np.asarray(reference, float), confidence)


def welch(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, confidence: float = 1 - ALPHA) -> Estimate:
    """mean(y) − mean(x) of two unpaired samples with Welch's t-interval (scipy's); NaN bounds
    under MIN_SEEDS values on either side. `sd` is the difference's standard error."""
    x, y = _clean(x), _clean(y)
    diff = float(y.mean() - x.mean()) if len(x) and len(y) else math.nan
    if min(len(x), len(y)) < MIN_SEEDS:
        return Estimate(diff, math.nan, math.nan, math.nan, min(len(x), len(y)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = stats.ttest_ind(y, x, equal_var=False).confidence_interval(confidence)
    se = math.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))
    return Estimate(diff, se, float(ci.low), float(ci.high), min(len(x), len(y)))


def label(lo: float, hi: float, *, pairs: int, converged: bool = True, delta: float | None = None,
          below: str = CLOSES, above: str = WIDENS, unit: str = "replicates") -> str:
    """The one labeller: what a family-wise interval [lo, hi] of a difference over `pairs` independent units
    (replicates; compare: seeds per side) allows one to say.
    Below 0 / above 0 name the direction; inside ±`delta` (a fraction) is equivalence — a TOST at
    the same level, conservatively, since the interval is 1 − α/m rather than 1 − 2α/m."""
    if pairs == 0:
        return NOT_RUN
    if not converged:
        return UNCONVERGED
    if pairs < MIN_SEEDS or lo != lo:
        return TOO_FEW.format(n=MIN_SEEDS, unit=unit)
    if hi < 0:
        return below
    if lo > 0:
        return above
    if delta is not None and -delta < lo and hi < delta:
        return EQUIVALENT.format(delta=round(100 * delta, 6))
    return INCONCLUSIVE


def interval_text(value: float | None, lo: float, hi: float, *, scale: float = 100.0, spec: str = "+.1f",
                  unit: str = "", style: str = "bounds") -> str:
    """The one interval formatter. `bounds`: "+7.5 points [+4.9, +10.1]"; `pm`: "67.1 ± 2.3" (a level
    and its half-width); `value=None`: the bounds alone. Without an interval: "+7.5 (no CI)"."""
    v = "" if value is None else f"{scale * value:{spec}}{unit}"
    if lo != lo or hi != hi:
        return f"{v} (no CI)".strip()
    if style == "pm":
        return f"{v} ± {scale * (hi - lo) / 2:{spec.lstrip('+')}}"
    bounds = f"[{scale * lo:{spec}}, {scale * hi:{spec}}]"
    return f"{v} {bounds}" if v else bounds


def p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


# ---- line fits: y = intercept + slope · x by ordinary least squares (statsmodels) ----

@dataclass(frozen=True)
class Line:
    """A straight-line fit and what its intervals need."""

    intercept: float
    slope: float
    slope_lo: float
    slope_hi: float
    r2: float
    sse: float
    scale: float  # residual variance
    df_resid: float
    n: int
    xbar: float
    sxx: float
    confidence: float

    def __call__(self, x: np.ndarray | float) -> np.ndarray | float:
        return self.intercept + self.slope * np.asarray(x, float)


def fit_line(x: np.ndarray, y: np.ndarray, confidence: float) -> Line:
    """OLS of y on x with the slope's t-interval at `confidence`."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    res = sm.OLS(y, sm.add_constant(x, has_constant="add")).fit()
    lo, hi = res.conf_int(alpha=1 - confidence)[1]
    return Line(float(res.params[0]), float(res.params[1]), float(lo), float(hi), float(res.rsquared),
                float(res.ssr), float(res.scale), float(res.df_resid), len(x), float(x.mean()),
                float(((x - x.mean()) ** 2).sum()), confidence)


def predict_mean(line: Line, x0: float, replicates: int) -> tuple[float, float, float]:
    """The line's prediction at x0 and the interval for the mean of `replicates` new observations there."""
    se = math.sqrt(line.scale * (1 / replicates + 1 / line.n + (x0 - line.xbar) ** 2 / line.sxx))
    half = t_quantile(line.confidence, line.df_resid) * se
    y0 = float(line(x0))
    return y0, y0 - half, y0 + half


def inverse(line: Line, y0: float) -> tuple[float, float, float]:
    """The x at which the fitted mean reaches y0, with its inverse-regression (Fieller) interval: the x
    whose confidence band of the mean contains y0. Bounds are NaN unless the slope is significant
    (otherwise the set is unbounded)."""
    if line.slope == 0:
        return math.nan, math.nan, math.nan
    d = line.intercept + line.slope * line.xbar - y0  # the mean's distance from y0 at xbar
    x0 = line.xbar - d / line.slope
    t2s2 = t_quantile(line.confidence, line.df_resid) ** 2 * line.scale
    a = line.slope ** 2 - t2s2 / line.sxx
    if a <= 0:  # the slope's interval contains 0
        return x0, math.nan, math.nan
    b, c = 2 * line.slope * d, d ** 2 - t2s2 / line.n
    root = math.sqrt(max(b ** 2 - 4 * a * c, 0.0))
    lo, hi = sorted(((-b - root) / (2 * a), (-b + root) / (2 * a)))
    return x0, line.xbar + lo, line.xbar + hi


@dataclass(frozen=True)
class FTest:
    f: float
    df_num: float
    df_den: float
    p: float

    def text(self) -> str:
        return f"F({self.df_num:g}, {self.df_den:g}) = {self.f:.2f}, {p_text(self.p)}"


UNTESTABLE = FTest(math.nan, math.nan, math.nan, math.nan)


def lack_of_fit(groups: np.ndarray, y: np.ndarray, fitted: np.ndarray, params: int) -> FTest:
    """Does a model with `params` parameters miss the means of the replicated design points `groups`?
    The residual sum of squares split into pure error (within groups) and lack of fit (the rest)."""
    y, fitted = np.asarray(y, float), np.asarray(fitted, float)
    frame = pd.DataFrame({"g": groups, "y": y})
    pure = float(((frame["y"] - frame.groupby("g")["y"].transform("mean")) ** 2).sum())
    k = frame["g"].nunique()
    df_lof, df_pe = k - params, len(y) - k
    if df_lof < 1 or df_pe < 1:
        return UNTESTABLE
    lof = max(float(((y - fitted) ** 2).sum()) - pure, 0.0)
    if pure == 0:
        return FTest(math.inf if lof > 0 else 0.0, df_lof, df_pe, 0.0 if lof > 0 else 1.0)
    f = (lof / df_lof) / (pure / df_pe)
    return FTest(f, df_lof, df_pe, float(stats.f.sf(f, df_lof, df_pe)))


def interaction_tests(frame: pd.DataFrame, response: str, factors: list[str], block: str,
                      pairs: list[tuple[str, str]]) -> dict[tuple[str, str], FTest]:
    """The two-factor interaction F-test of each pair, in the full-factorial model of `response` on
    every factor with `block` (the seed) as an additive block (statsmodels, type II sums of squares).
    Untestable (NaN) until every cell of the grid has a trial and the residual has degrees of freedom."""
    if not pairs:  # fewer than two factors with two levels: nothing to test (and nothing to group by)
        return {}
    names = {f: f"f{i}" for i, f in enumerate(factors)}
    data = pd.DataFrame({names[f]: frame[f].astype(str).to_numpy() for f in factors})
    data["block"], data["y"] = frame[block].astype(str).to_numpy(), frame[response].to_numpy(float)
    data = data.dropna()
    cells = data.groupby([names[f] for f in factors]).size()
    grid = int(np.prod([data[names[f]].nunique() for f in factors]))
    blocks = data["block"].nunique()
    if len(cells) < grid or len(data) - grid - (blocks - 1) < 1 or not pairs:
        return {p: UNTESTABLE for p in pairs}
    terms = " * ".join(f"C({names[f]})" for f in factors)
    model = smf.ols(f"y ~ {terms}" + (" + C(block)" if blocks > 1 else ""), data).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            table = sm.stats.anova_lm(model, typ=2)
        except ValueError:  # a term without degrees of freedom in a partly run grid (patsy: empty constraint)
            return {p: UNTESTABLE for p in pairs}
    out = {}
    for a, b in pairs:
        row = table.loc[f"C({names[a]}):C({names[b]})"]
        out[(a, b)] = FTest(float(row["F"]), float(row["df"]), float(model.df_resid), float(row["PR(>F)"]))
    return out
