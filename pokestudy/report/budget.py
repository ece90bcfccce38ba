"""Was the budget enough, and could training length have decided anything? Two checks on the trials.

- The **budget check**: the spec's `budget_check` reruns replicates at k times the budget. Each claim
  is labelled again on those trials and compared with its label at the study's budget *on the same
  replicates*, so a change of label is the budget's doing, not fewer replicates'. A claim whose label
  changes is *budget-dependent*; one decided alike at both *holds*; one that neither budget decides
  (every kind of *inconclusive*) is *undecided at both budgets*: the check says nothing about it.
- The **length check**: where the epochs trained can differ between trials of one condition (an
  adaptive rule, a study whose records mix budgets), whether they predict final test accuracy within
  the condition — the confound that a stall-driven learning-rate rule once created. With the shipped
  fixed schedule every trial of a condition trains the same steps at the same learning rates, and the
  check says so.
"""

from __future__ import annotations

import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

from pokestudy.report.stats import MIN_SEEDS
from pokestudy.report.tables import ALPHA, column, factors, public
from pokestudy.report.verdicts import verdicts
from pokestudy.study.spec import BudgetCheck, ReportSpec

HOLDS, DEPENDENT, UNCHECKED, UNDECIDED = "holds", "budget-dependent", "not checked", "undecided at both budgets"


def split_budgets(df: pd.DataFrame, check: BudgetCheck | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The study's own trials (budget 1) and those of its budget check at the spec's factor (trials of
    an earlier factor stay stored, and out of both)."""
    return df[df["budget"] == 1], df[df["budget"] == (check.factor if check else -1)]


def budget_check(main: pd.DataFrame, longer: pd.DataFrame, report: ReportSpec) -> pd.DataFrame:
    """One row per claim: its label at the study's budget on the trials (condition and seed) that also
    ran longer, its label at the longer budget, both gap differences, and the outcome (holds /
    budget-dependent / undecided at both budgets; *not checked* where either budget has too few replicates
    for a label)."""
    if longer.empty:
        return pd.DataFrame()
    factor = float(longer["budget"].iloc[0])
    cells = set(zip(longer["condition"], longer["seed"]))  # both budgets are labelled on exactly these trials
    short = verdicts(main[[cell in cells for cell in zip(main["condition"], main["seed"])]], report)
    long = verdicts(longer, report)
    out = pd.DataFrame({"claim": short["claim"], "replicates": longer["seed"].nunique(), "budget_factor": factor,
                        "verdict_at_budget": short["verdict"], f"verdict_at_{factor:g}x": long["verdict"],
                        "gap_diff_at_budget": short["gap_diff"], f"gap_diff_at_{factor:g}x": long["gap_diff"]})
    unlabelled = ("inconclusive: not run yet", "inconclusive: fewer than")  # too few replicates to say either way
    few = longer["seed"].nunique() < MIN_SEEDS  # no label of either budget could be decided, whatever it reads
    out["budget_check"] = [UNCHECKED if few else _outcome(a, b, unlabelled)
                           for a, b in zip(out["verdict_at_budget"], out[f"verdict_at_{factor:g}x"])]
    return out


def _outcome(short: str, long: str, unlabelled: tuple[str, ...]) -> str:
    if any(x.startswith(unlabelled) for x in (short, long)):
        return UNCHECKED
    if all(x.startswith("inconclusive") for x in (short, long)):
        return UNDECIDED
    return HOLDS if short == long else DEPENDENT


def pilot_table(pilot: pd.DataFrame) -> pd.DataFrame:
    """The pilot study that chose the budget, one row per condition of its factors other than the
    budget: mean validation accuracy, in %, at each budget (epochs trained) it tried."""
    others = [column(f) for f in factors(pilot) if f != "epochs"]
    wide = pilot.pivot_table(index=others, columns="epochs", values="val_acc", aggfunc="mean", observed=True) * 100
    return public(wide.round(1).rename(columns=lambda e: f"{e} epochs").reset_index())


def length_check(df: pd.DataFrame) -> pd.DataFrame:
    """Per condition: how many epochs its trials trained, and, where that differs between them,
    Spearman's correlation of epochs with final test accuracy and its Holm-corrected p-value (over the
    conditions tested). `flag` is set where training length predicts the result."""
    rows = []
    for cid, group in df.groupby("condition", sort=False):
        epochs = sorted(group["epochs"].unique())
        varies = len(epochs) > 1 and len(group) >= 3
        rho, p = stats.spearmanr(group["epochs"], group["test_acc"]) if varies else (float("nan"), float("nan"))
        rows.append({"condition": cid, "trials": len(group), "epochs": " / ".join(map(str, epochs)),
                     "spearman_epochs_test": rho, "p": p})
    out = pd.DataFrame(rows)
    tested = out["p"].notna()
    out["p_holm"] = float("nan")
    if tested.any():
        out.loc[tested, "p_holm"] = multipletests(out.loc[tested, "p"], alpha=ALPHA, method="holm")[1]
    out["flag"] = out["p_holm"] < ALPHA
    return out


def sentences(check: BudgetCheck | None, budget: pd.DataFrame, lengths: pd.DataFrame,
              pilot: tuple[str, pd.DataFrame] | None) -> list[str]:
    """The summary's lines on the pilot that chose the budget and on both checks (`check`: the spec's)."""
    lines = []
    if pilot is not None:
        name, table = pilot
        lines.append(f"**The budget's pilot** (study `{name}`): validation accuracy in % at each budget tried "
                     "(epochs):\n\n" + table.to_markdown(index=False) if not table.empty else
                     f"**The budget's pilot** (study `{name}`) is not in this storage; its numbers are in the spec.")
    if budget.empty:
        why = ("the spec has no `budget_check`" if check is None else
               f"the spec asks for one at {check.factor:g}× the budget, but none of its trials has finished yet: "
               "rerun the same `pokestudy run` to continue")
        lines.append(f"**Budget check: not run** ({why}): whether more training would change a label is not known.")
    else:
        factor = budget["budget_factor"].iloc[0]
        outcomes = budget["budget_check"].value_counts()
        dependent = budget[budget["budget_check"] == DEPENDENT]
        counts = ", ".join(f"{outcomes[o]} {o}" for o in (HOLDS, DEPENDENT, UNDECIDED, UNCHECKED) if o in outcomes)
        lines.append(f"**Budget check** ({budget['replicates'].iloc[0]} replicate(s) rerun at {factor:g}× the budget; "
                     f"each claim labelled on the same replicates at both budgets), of {len(budget)} claims: {counts}."
                     + ("" if dependent.empty else " Budget-dependent: "
                        + "; ".join(f"{r['claim']} ({r['verdict_at_budget']} → {r[f'verdict_at_{factor:g}x']})"
                                    for _, r in dependent.iterrows()) + ".")
                     + (" *Undecided at both budgets* says nothing either way: neither budget's trials decide it."
                        if UNDECIDED in outcomes else "")
                     + (f" Fewer than {MIN_SEEDS} replicates ran longer, so no label could be compared: what the "
                        f"check shows is convergence and the estimates at {factor:g}× (`gap_at_{factor:g}x`, "
                        "`budget_check.csv`)." if budget["replicates"].iloc[0] < MIN_SEEDS else ""))
    varying = lengths[lengths["epochs"].str.contains("/")]
    if varying.empty:
        lines.append("**Training length** cannot predict a result here: within every condition all trials trained "
                     "the same number of epochs under the same fixed schedule.")
    else:
        flagged = lengths[lengths["flag"]]
        lines.append(f"**Training length varies** within {len(varying)} condition(s); "
                     + ("it predicts test accuracy (Holm-corrected Spearman, α = 0.05) in "
                        + ", ".join(flagged["condition"]) + ": those conditions' results depend on when training "
                        "stopped." if not flagged.empty else
                        "it does not detectably predict test accuracy in any of them (Holm-corrected Spearman)."))
    return lines
