"""How much data closes the gap: a power law gap = a · n^-b in the training images per class n,
fitted per condition of the other factors, and the n at which the gap would fall to a target.

The fit is ordinary least squares of log gap on log n over every trial (seeds are replicates).
The n for the target gap is read off the fitted *mean* line, with the inverse-regression (Fieller)
interval: the n whose confidence band of the mean contains the target. Intervals are corrected
for the number of fits (Bonferroni). The extrapolation is refused, with the reason, when any
trial did not converge, a gap is not positive, fewer than three sizes were measured (sizes within
MIN_STEP of each other count as one), the fit explains too little (R² < MIN_R2), or the gap does
not shrink detectably with n (then the interval has no upper end).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from pokestudy.report.tables import ALPHA, MIN_SEEDS

FACTOR = "train_fraction"
TARGET = 0.10  # the gap to reach, as a fraction (10 points)
MIN_R2 = 0.8
MIN_STEP = 1.5  # sizes closer than this ratio count as one (the study doubles them): two clusters fit any curve


def per_class(df: pd.DataFrame) -> pd.Series:
    """Training images per class of each trial (what the model saw, after `train_fraction`)."""
    return df["train_images"] / df.attrs["study"].data["classes"]


def fits(df: pd.DataFrame) -> pd.DataFrame:
    """One row per condition of the other factors: the power law, its fit, and the extrapolated n
    at which the gap would fall to TARGET (or why there is none)."""
    others = [f for f in df.attrs["factors"] if f != FACTOR]
    groups = list(df.groupby(others, sort=False)) if others else [((), df)]
    confidence = 1 - ALPHA / len(groups)
    rows = []
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        x, y = np.log(per_class(group).to_numpy(float)), group["gap"].to_numpy(float)
        row = {**dict(zip(others, key)), "trials": len(group), "images_per_class": f"{math.exp(x.min()):.0f}–{math.exp(x.max()):.0f}"}
        rows.append({**row, **fit_power_law(x, y, bool(group["converged"].all()), confidence)})
    out = pd.DataFrame(rows).round({"intercept": 4, "exponent": 3, "exponent_lo": 3, "exponent_hi": 3, "r2": 3,
                                    "n_target": 0, "n_target_lo": 0, "n_target_hi": 0})
    out.attrs.update(confidence=confidence, fits=len(groups))
    return out


def fit_power_law(x: np.ndarray, gap: np.ndarray, converged: bool, confidence: float) -> dict:
    """log gap = intercept + slope · log n; the exponent is -slope. Returns the fit and the extrapolation."""
    out = {"intercept": math.nan, "exponent": math.nan, "exponent_lo": math.nan, "exponent_hi": math.nan, "r2": math.nan,
           "n_target": math.nan, "n_target_lo": math.nan, "n_target_hi": math.nan}
    distinct, start = 0, -math.inf  # sizes at least MIN_STEP above the previous cluster's smallest
    for size in np.sort(x):
        if size > start + math.log(MIN_STEP):
            distinct, start = distinct + 1, size
    if not converged:
        return {**out, "extrapolation": "refused: not every trial converged"}
    if (gap <= 0).any():
        return {**out, "extrapolation": "refused: a gap is not positive, so no power law"}
    if distinct < 3 or len(x) < 2 * MIN_SEEDS:
        return {**out, "extrapolation": f"refused: {distinct} distinct sizes (at least {MIN_STEP}× apart) and {len(x)} "
                                        f"trials; a power law needs 3 sizes and {2 * MIN_SEEDS} trials"}
    y = np.log(gap)
    n, xbar, ybar = len(x), x.mean(), y.mean()
    sxx = ((x - xbar) ** 2).sum()
    slope = ((x - xbar) * (y - ybar)).sum() / sxx
    resid = y - (ybar + slope * (x - xbar))
    s2 = (resid ** 2).sum() / (n - 2)
    r2 = 1 - (resid ** 2).sum() / ((y - ybar) ** 2).sum()
    t = stats.t.ppf((1 + confidence) / 2, n - 2)
    half = t * math.sqrt(s2 / sxx)
    out.update(intercept=ybar - slope * xbar, exponent=-slope, exponent_lo=-slope - half, exponent_hi=-slope + half, r2=r2)
    if r2 < MIN_R2:
        return {**out, "extrapolation": f"refused: the power law fits poorly (R² {r2:.2f} < {MIN_R2})"}
    if slope + half >= 0:
        return {**out, "extrapolation": "refused: the gap does not shrink detectably with more data"}
    # Fieller: the u = x - xbar where (ybar - y0 + slope u)^2 <= t^2 s2 (1/n + u^2/sxx); bounded since slope is significant
    d = ybar - math.log(TARGET)
    a, b, c = slope ** 2 - t ** 2 * s2 / sxx, 2 * slope * d, d ** 2 - t ** 2 * s2 / n
    root = math.sqrt(b ** 2 - 4 * a * c)
    lo, hi = sorted(((-b - root) / (2 * a), (-b + root) / (2 * a)))
    out.update(n_target=math.exp(xbar - d / slope), n_target_lo=math.exp(xbar + lo), n_target_hi=math.exp(xbar + hi))
    beyond = out["n_target"] / math.exp(x.max())
    return {**out, "extrapolation": f"an extrapolation {beyond:.0f}× beyond the largest size measured, assuming the "
            "power law holds that far" if beyond > 1.5 else "within the sizes measured"}


def sentence(row: pd.Series, others: list[str]) -> str:
    """One line per fit, for summary.md."""
    who = ", ".join(f"{f}={row[f]}" for f in others) or "all trials"
    law = (f"gap ∝ n^−b with b = {row['exponent']:.2f} [{row['exponent_lo']:.2f}, {row['exponent_hi']:.2f}], "
           f"R² {row['r2']:.2f}"
           if row["exponent"] == row["exponent"] else "no fit")
    if row["n_target"] != row["n_target"]:
        return f"**{who}** ({row['images_per_class']} images per class): {law}; {row['extrapolation']}."
    return (f"**{who}** ({row['images_per_class']} images per class): {law}; the gap would fall to "
            f"{100 * TARGET:.0f} points at ≈ {row['n_target']:,.0f} images per class "
            f"[{row['n_target_lo']:,.0f}, {row['n_target_hi']:,.0f}]: {row['extrapolation']}.")
