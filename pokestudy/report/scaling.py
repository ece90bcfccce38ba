"""How much data closes the gap: the gap against the training images per class n, fitted per
condition of the other factors in more than one form, each checked, and the n at which the gap
would fall to a target — printed only where the forms the data do not reject agree there.

Forms, both straight lines in log n fitted by least squares over every trial (seeds are
replicates): the *power law* (log gap = a − b · log n) and the *log-linear* law (gap = a − c · log n,
test accuracy linear in log n). Each form is checked twice: a lack-of-fit F-test against the mean
of each replicated size (pure error within sizes), and a held-out check (fitted without the largest
size, does its prediction interval for that size's mean contain the observed mean?). A form that
fails either is *rejected*. The n for the target gap is read off each form's fitted mean, with the
inverse-regression (Fieller) interval; per-seed fits give the spread. Intervals and tests are
corrected (Bonferroni) for the fits × forms.

The extrapolation is printed when the forms that are kept agree within FORM_FACTOR at the target;
otherwise the range across them is printed and called form-dependent. It is refused, with the
reason, when any trial did not converge, fewer than three sizes were measured (sizes within
MIN_STEP of each other count as one), or every form is rejected, fits poorly (R² < MIN_R2) or
does not shrink detectably with n (then the interval has no upper end).

Which factor is the size: the one whose levels set the trial setting SIZE_SETTING (the share of
each class's training groups a trial keeps) to different values — a list factor of that setting
or bundles that set it; the report knows no factor name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from pokestudy.report.stats import (MIN_SEEDS, Line, family_confidence, fit_line, interval_text, inverse,
                                    lack_of_fit, predict_mean)
from pokestudy.report.tables import column
from pokestudy.study.spec import Study
from pokestudy.train import TrialConfig

SIZE_SETTING = "train_fraction"  # the TrialConfig setting that decides how much training data a trial sees
TARGET = 0.10  # the gap to reach, as a fraction (10 points)
MIN_R2 = 0.8
MIN_STEP = 1.5  # sizes closer than this ratio count as one (the study doubles them): two clusters fit any curve
FORM_FACTOR = 2.0  # kept forms must agree within this factor at the target for the extrapolation to be printed


@dataclass(frozen=True)
class Form:
    """A law that is a straight line in x = log n once the gap is transformed by `to`."""

    key: str
    name: str
    to: Callable[[np.ndarray], np.ndarray]  # gap -> the fitted response
    back: Callable[[np.ndarray], np.ndarray]  # the response -> gap
    positive: bool  # needs every gap > 0


FORMS = (Form("power", "power law", np.log, np.exp, True),
         Form("loglinear", "log-linear law", lambda g: np.asarray(g, float), lambda y: np.asarray(y, float), False))


@dataclass(frozen=True)
class Sizes:
    """The scaling section: the size factor, one row of fits per condition of the other factors, and
    the number of fits × forms the intervals are corrected for."""

    factor: str
    others: list[str]
    fits: pd.DataFrame
    corrected_for: int


def analyse(df: pd.DataFrame, spec: Study, classes: int) -> Sizes | None:
    """The scaling section of a study whose spec has a size factor (and whose trials recorded their size)."""
    factor = size_factor(spec)
    if factor is None or "train_images" not in df:
        return None
    others = [f for f in spec.levels() if f != factor]
    table = fits(df, factor, classes)
    return Sizes(factor, others, table, max(1, len(table)) * len(FORMS))


def size_factor(spec: Study) -> str | None:
    """The factor whose levels set SIZE_SETTING to at least two values (each level to one), or None."""
    found = []
    for factor, names in spec.levels().items():
        values = {level: {getattr(TrialConfig.from_dict(spec.settings(c)), SIZE_SETTING) for c in spec.conditions()
                          if c[factor] == level} for level in names}
        if all(len(v) == 1 for v in values.values()) and len(set().union(*values.values())) > 1:
            found.append(factor)
    return found[0] if len(found) == 1 else None


def per_class(df: pd.DataFrame, classes: int) -> pd.Series:
    """Training images per class of each trial (what the model saw, after SIZE_SETTING)."""
    return df["train_images"] / classes


def clusters(x: np.ndarray) -> np.ndarray:
    """Each log size's cluster: a new one starts MIN_STEP above the previous cluster's smallest size."""
    order, out = np.argsort(x), np.empty(len(x), int)
    k, start = -1, -math.inf
    for i in order:
        if x[i] > start + math.log(MIN_STEP):
            k, start = k + 1, x[i]
        out[i] = k
    return out


def fits(df: pd.DataFrame, factor: str, classes: int) -> pd.DataFrame:
    """One row per condition of the other factors: every form's fit and checks, and the extrapolated
    n at which the gap would fall to TARGET (or the range across forms, or why there is none)."""
    others = [c for c in df.columns if c.startswith(column("")) and c != column(factor)]
    groups = list(df.groupby(others, sort=False, observed=True)) if others else [((), df)]
    confidence = family_confidence(len(groups) * len(FORMS))
    rows = []
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        x, gap = np.log(per_class(group, classes).to_numpy(float)), group["gap"].to_numpy(float)
        row = {**dict(zip(others, key)), "trials": len(group),
               "images_per_class": f"{math.exp(x.min()):.0f}–{math.exp(x.max()):.0f}"}
        converged = bool(group["converged"].all())
        rows.append({**row, **fit_forms(x, gap, group["seed"].to_numpy(), converged, confidence)})
    return pd.DataFrame(rows)


def fit_forms(x: np.ndarray, gap: np.ndarray, seeds: np.ndarray, converged: bool, confidence: float) -> dict:
    """Every form fitted to one condition's trials (x = log n), checked, and the extrapolation decided."""
    sizes = clusters(x)
    distinct = len(set(sizes))
    out: dict = {}
    shared = None
    if not converged:
        shared = "not every trial converged"
    elif distinct < 3 or len(x) < 2 * MIN_SEEDS:
        shared = (f"{distinct} distinct sizes (at least {MIN_STEP}× apart) and {len(x)} trials; a law needs 3 sizes "
                  f"and {2 * MIN_SEEDS} trials")
    for form in FORMS:
        out.update(_fit_form(form, x, gap, sizes, seeds, confidence, shared))
    return {**out, **_decide(out, x, shared)}


def _fit_form(form: Form, x: np.ndarray, gap: np.ndarray, sizes: np.ndarray, seeds: np.ndarray, confidence: float,
              refused: str | None) -> dict:
    k = form.key
    out = {f"{k}_{c}": math.nan for c in ("intercept", "slope", "slope_lo", "slope_hi", "r2", "sse", "lof_F", "lof_p",
                                          "heldout_pred", "heldout_lo", "heldout_hi", "heldout_obs", "n_target",
                                          "n_target_lo", "n_target_hi")}
    out[f"{k}_seeds"] = ""
    if refused is None and form.positive and (gap <= 0).any():
        refused = "a gap is not positive"
    if refused is not None:
        return {**out, f"{k}_status": f"refused: {refused}"}
    y = form.to(gap)
    line = fit_line(x, y, confidence)
    lof = lack_of_fit(sizes, y, line(x), 2)
    out.update({f"{k}_intercept": line.intercept, f"{k}_slope": line.slope, f"{k}_slope_lo": line.slope_lo,
                f"{k}_slope_hi": line.slope_hi, f"{k}_r2": line.r2,
                f"{k}_sse": float(((100 * (gap - form.back(line(x)))) ** 2).sum()), f"{k}_lof_F": lof.f,
                f"{k}_lof_p": lof.p})
    held = sizes == sizes.max()
    passes = True
    if len(set(sizes[~held])) >= 2 and (~held).sum() >= 3:
        pred, lo, hi = predict_mean(fit_line(x[~held], y[~held], confidence), float(x[held].mean()), int(held.sum()))
        observed = float(y[held].mean())
        passes = lo <= observed <= hi
        out.update({f"{k}_heldout_pred": float(form.back(pred)), f"{k}_heldout_lo": float(form.back(lo)),
                    f"{k}_heldout_hi": float(form.back(hi)), f"{k}_heldout_obs": float(form.back(observed))})
    n, lo, hi = inverse(line, float(form.to(TARGET)))
    if line.slope_hi < 0:
        out.update({f"{k}_n_target": _exp(n), f"{k}_n_target_lo": _exp(lo), f"{k}_n_target_hi": _exp(hi)})
    out[f"{k}_seeds"] = _per_seed(form, x, y, sizes, seeds, confidence)
    if line.r2 < MIN_R2:
        status = f"fits poorly (R² {line.r2:.2f} < {MIN_R2})"
    elif line.slope_hi >= 0:
        status = "the gap does not shrink detectably with more data"
    elif lof.p < 1 - confidence:
        status = f"rejected by lack of fit ({lof.text()})"
    elif not passes:
        status = (f"rejected by the held-out largest size (predicted {_ci(pd.Series(out), f'{k}_heldout')} points, "
                  f"observed {100 * out[f'{k}_heldout_obs']:.1f})")
    else:
        status = "kept"
    return {**out, f"{k}_status": status}


def _exp(log_n: float) -> float:
    """n from log n; a size beyond any float is infinite (a nearly flat line reaches the target nowhere near)."""
    return math.exp(log_n) if log_n < 700 else math.inf


def _per_seed(form: Form, x: np.ndarray, y: np.ndarray, sizes: np.ndarray, seeds: np.ndarray,
              confidence: float) -> str:
    """The n for the target from each seed's own fit: the spread the pooled interval summarises."""
    ns = []
    for s in sorted(set(seeds)):
        mine = seeds == s
        if len(set(sizes[mine])) < 3:
            continue
        line: Line = fit_line(x[mine], y[mine], confidence)
        ns.append(_exp(inverse(line, float(form.to(TARGET)))[0]) if line.slope < 0 else math.inf)
    if not ns:
        return ""
    lo, hi = min(ns), max(ns)
    return "–".join("never" if v == math.inf else f"{v:,.0f}" for v in (lo, hi))


def _decide(out: dict, x: np.ndarray, shared: str | None) -> dict:
    """The extrapolation: the kept forms' n where they agree within FORM_FACTOR, else their range."""
    decision = {"form": "", "n_target": math.nan, "n_target_lo": math.nan, "n_target_hi": math.nan}
    if shared is not None:
        return {**decision, "extrapolation": f"refused: {shared}"}
    kept = [f for f in FORMS if out[f"{f.key}_status"] == "kept"]
    if not kept:
        reasons = "; ".join(f"{f.name}: {out[f'{f.key}_status']}" for f in FORMS)
        return {**decision, "extrapolation": f"refused: {reasons}"}
    targets = {f.name: out[f"{f.key}_n_target"] for f in kept}
    dropped = "".join(f"; {f.name} {out[f'{f.key}_status']}" for f in FORMS if f not in kept)
    low, high = min(targets.values()), max(targets.values())
    if high / low > FORM_FACTOR:
        names = sorted(targets, key=targets.get)
        return {**decision, "extrapolation": f"form-dependent: ≈ {low:,.0f} ({names[0]}) to {high:,.0f} "
                f"({names[-1]}) images per class, {high / low:.1f}× apart (more than {FORM_FACTOR:g}×){dropped}"}
    best = min(kept, key=lambda f: out[f"{f.key}_sse"])  # the kept form closest to the data
    n = out[f"{best.key}_n_target"]
    beyond = n / math.exp(x.max())
    where = (f"an extrapolation {beyond:.0f}× beyond the largest size measured, assuming the {best.name} holds that "
             "far" if beyond > 1.5 else "within the sizes measured")
    also = "".join(f"; the {f.name} gives ≈ {targets[f.name]:,.0f}" for f in kept if f is not best)
    return {"form": best.name, "n_target": n, "n_target_lo": out[f"{best.key}_n_target_lo"],
            "n_target_hi": out[f"{best.key}_n_target_hi"], "extrapolation": f"{where}{also}{dropped}"}


def _ci(row: pd.Series, stem: str, scale: float = 100.0, spec: str = ".1f", factor: float = 1.0) -> str:
    """`stem` with its `_lo`/`_hi` bounds (`_pred` for a held-out prediction) through the one formatter."""
    value = row[stem] if stem in row else row[f"{stem}_pred"]
    lo, hi = sorted((factor * row[f"{stem}_lo"], factor * row[f"{stem}_hi"]))
    return interval_text(factor * value, lo, hi, scale=scale, spec=spec)


def _law(row: pd.Series, form: Form) -> str:
    """One form's fit and checks in words."""
    k = form.key
    if row[f"{k}_slope"] != row[f"{k}_slope"]:
        return f"{form.name} {row[f'{k}_status']}"
    shape = (f"b = {_ci(row, f'{k}_slope', 1, '.2f', -1)}" if k == "power"
             else f"{_ci(row, f'{k}_slope', spec='+.1f', factor=math.log(2))} points per doubling")
    words = [f"{form.name}: {shape}", f"R² {row[f'{k}_r2']:.2f}", f"SSE {row[f'{k}_sse']:.0f} pt²"]
    if row[f"{k}_lof_p"] == row[f"{k}_lof_p"]:
        words.append(f"lack of fit p = {row[f'{k}_lof_p']:.3f}")
    if row[f"{k}_heldout_pred"] == row[f"{k}_heldout_pred"]:
        words.append(f"the largest size held out: predicted {_ci(row, f'{k}_heldout')}, "
                     f"observed {100 * row[f'{k}_heldout_obs']:.1f}")
    if row[f"{k}_n_target"] == row[f"{k}_n_target"]:
        words.append(f"n ≈ {_ci(row, f'{k}_n_target', 1, ',.0f')}")
    if row[f"{k}_seeds"]:
        words.append(f"per seed {row[f'{k}_seeds']}")
    return f"{', '.join(words)} ({row[f'{k}_status']})"


def sentence(row: pd.Series, others: list[str]) -> str:
    """One line per fit, for summary.md: every form, then what may be said at the target."""
    who = ", ".join(f"{f}={row[column(f)]}" for f in others) or "all trials"
    laws = "; ".join(_law(row, f) for f in FORMS)
    who = f"**{who}** ({row['images_per_class']} images per class)"
    fitted = any(row[f"{f.key}_slope"] == row[f"{f.key}_slope"] for f in FORMS)
    if row["extrapolation"].startswith("refused") and not fitted:
        return f"{who}: {row['extrapolation']}."
    if row["n_target"] != row["n_target"]:
        return f"{who}: {laws}. At {100 * TARGET:.0f} points: {row['extrapolation']}."
    n = interval_text(row["n_target"], row["n_target_lo"], row["n_target_hi"], scale=1, spec=",.0f")
    n = n.replace(" [", " images per class [", 1)
    return (f"{who}: {laws}. The gap would fall to {100 * TARGET:.0f} points at ≈ {n} ({row['form']}): "
            f"{row['extrapolation']}.")
