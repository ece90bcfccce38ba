"""Figures (PNG, matplotlib Agg): curves, gaps with CIs, the trade-off, effects per epoch, the gap
against training-set size, the report's prediction grids, confusions; and the verdicts as a Plotly
chart for optuna-dashboard's study page.

Each function takes tables already computed from the storage and returns the written path (the chart: its JSON).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from pokestudy.report.stats import interval_text, mean_interval  # noqa: E402
from pokestudy.report.tables import cell, column, extra_metrics, factors, interval, levels  # noqa: E402
from pokestudy.study.spec import Reference  # noqa: E402

if TYPE_CHECKING:
    from pokestudy.report.scaling import Sizes

MARKERS = "os^DvPX<>ph*d"  # 13 distinct markers; colours are distinct for any number of conditions
EXTRA_COLOURS = ("C2", "C4", "C5", "C6", "C8", "C9")  # extra sets' curves: not train's, val's or test's (C0, C1, C3)


def styles(n: int) -> list[tuple[tuple[float, float, float, float], str]]:
    """A distinct (colour, marker) per condition: tab20's colours (a continuous map beyond 20), and a
    marker of its own for up to 13 conditions."""
    colours = ([plt.cm.tab20(i) for i in range(n)] if n <= 20 else
               [plt.cm.turbo(v) for v in np.linspace(0.05, 0.95, n)])
    return [(c, MARKERS[i % len(MARKERS)]) for i, c in enumerate(colours)]


def _row_label(row: pd.Series, names: list[str]) -> str:
    """A condition in a figure, factors named: `arch=cnn · augment=none`."""
    return cell({f: row[column(f)] for f in names})


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves(df: pd.DataFrame, out: Path) -> Path:
    """Train vs test (and extra sets) accuracy per epoch for every condition: mean over seeds, band =
    min..max. Under the fixed schedule a condition's trials all train the same epochs; a shorter one
    would keep its last value, so that every seed counts at every epoch."""
    conditions = list(dict.fromkeys(df["condition"]))
    cols = min(4, len(conditions))
    rows = -(-len(conditions) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.7 * rows), sharex=True, sharey=True, squeeze=False)
    extra = [m for m in extra_metrics(df) if m.endswith("_acc")]
    for ax, condition in zip(axes.flat, conditions):
        group = df[df["condition"] == condition]
        for metric, colour in [("train_acc", "C0"), ("test_acc", "C3"), *_extra_colours(extra)]:
            values = _padded(group, metric) * 100
            epochs = np.arange(1, values.shape[1] + 1)
            ax.plot(epochs, values.mean(0), colour, label=metric.replace("_acc", ""))
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.fill_between(epochs, values.min(0), values.max(0), color=colour, alpha=0.2)
        ax.set_title(_row_label(group.iloc[0], factors(df)).replace(" · ", "\n"), fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(conditions):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)")
    fig.suptitle(f"accuracy per epoch (mean over {df.groupby('condition').size().min()}+ seeds, band: min–max)")
    return _save(fig, out / "curves.png")


def _extra_colours(metrics: list[str]) -> list[tuple[str, str]]:
    """A colour of its own for each extra set's curve (an outside set, the near-copy and far parts of test)."""
    return [(m, EXTRA_COLOURS[i % len(EXTRA_COLOURS)]) for i, m in enumerate(metrics)]


def _padded(group: pd.DataFrame, metric: str) -> np.ndarray:
    """Seeds x epochs of one metric; a shorter run is carried at its last value."""
    runs = [h[metric] for h in group["history"]]
    n = max(len(r) for r in runs)
    return np.array([r + [r[-1]] * (n - len(r)) for r in runs])


def gaps(table: pd.DataFrame, reference: Reference | None, out: Path) -> Path:
    """The gap per condition (train − test, train − each extra set) with its 95% CI, beside a
    published reference result when the spec names one."""
    labels = [_row_label(r, factors(table)) for _, r in table.iterrows()]
    metrics = ["gap", *[c[: -len("_mean")] for c in table.columns if c.endswith("_gap_mean")]]
    y = np.arange(len(table))
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(table) + 1.5))
    for i, metric in enumerate(metrics):
        mean = table[f"{metric}_mean"] * 100
        err = np.nan_to_num(np.abs(np.stack([mean - table[f"{metric}_lo"] * 100, table[f"{metric}_hi"] * 100 - mean])))
        ax.errorbar(mean, y + 0.3 * (i - (len(metrics) - 1) / 2), xerr=err, fmt="o", color=f"C{3 - i}", capsize=3,
                    label="train − test" if metric == "gap" else f"train − {metric.removesuffix('_gap')}")
    if reference:
        ax.axvline(100 * (reference.train_acc - reference.test_acc), color="grey", ls="--", lw=1,
                   label=f"{reference.label}: {100 * reference.train_acc:.0f} − {100 * reference.test_acc:.0f}")
    ax.axvline(0, color="black", lw=0.5)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("gap (accuracy points), 95% CI over seeds")
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    return _save(fig, out / "gap.png")


def tradeoff(table: pd.DataFrame, out: Path) -> Path:
    """Test accuracy against the gap per condition, 95% CIs on both axes: a narrower gap is only
    better when test accuracy does not fall with it."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for (_, r), (colour, marker) in zip(table.iterrows(), styles(len(table))):
        x, y = 100 * r["gap_mean"], 100 * r["test_acc_mean"]
        xerr = [[x - 100 * r["gap_lo"]], [100 * r["gap_hi"] - x]] if r["gap_lo"] == r["gap_lo"] else None
        yerr = ([[y - 100 * r["test_acc_lo"]], [100 * r["test_acc_hi"] - y]] if r["test_acc_lo"] == r["test_acc_lo"]
                else None)
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker, color=colour, capsize=3,
                    mfc="white" if r["converged"] != "yes" else None,
                    label=_row_label(r, factors(table)) + ("" if r["converged"] == "yes" else " (not converged)"))
    ax.set_xlabel("gap: train − test (points)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    ax.set_title("test accuracy vs gap per condition (95% CIs); up and left is better", fontsize=9)
    return _save(fig, out / "tradeoff.png")


def scaling(df: pd.DataFrame, sizes: "Sizes", classes: int, out: Path) -> Path:
    """Test accuracy and gap against training images per class (log x; the gap on log y, where a power
    law is a line), mean ± 95% CI over seeds per size, per condition of the other factors, with every
    fitted form (power law dashed, log-linear dotted) carried on to the printed extrapolation, if any."""
    from pokestudy.report.scaling import FORMS, TARGET, per_class

    fig, (acc_ax, gap_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (_, fit) in enumerate(sizes.fits.iterrows()):
        mask = (np.logical_and.reduce([df[column(f)] == fit[column(f)] for f in sizes.others]) if sizes.others
                else np.ones(len(df), bool))
        group = df[mask].assign(n=per_class(df[mask], classes))
        label = cell({f: fit[column(f)] for f in sizes.others}) or "all"
        for ax, metric in ((acc_ax, "test_acc"), (gap_ax, "gap")):
            by = group.groupby(column(sizes.factor), observed=True)
            cis = by[metric].apply(interval)  # (mean, sd, lo, hi) per size; no interval under MIN_SEEDS
            mean, half = cis.map(lambda c: 100 * c[0]), cis.map(lambda c: 100 * (c[3] - c[2]) / 2)
            ax.errorbar(by["n"].mean(), mean, yerr=np.nan_to_num(half), fmt="o", color=f"C{i}", capsize=3, label=label)
        end = fit["n_target_hi"] if fit["n_target_hi"] == fit["n_target_hi"] else group["n"].max()
        grid = np.geomspace(group["n"].min(), max(end, group["n"].max()), 100)
        for form, style in zip(FORMS, ("--", ":")):
            if fit[f"{form.key}_slope"] == fit[f"{form.key}_slope"]:
                line = fit[f"{form.key}_intercept"] + fit[f"{form.key}_slope"] * np.log(grid)
                gap = 100 * form.back(line)
                keep = gap > 0  # the log-linear line crosses 0; the log axis cannot show it there
                gap_ax.plot(grid[keep], gap[keep], color=f"C{i}", ls=style, lw=1, label=f"{label}: {form.name}")
        if fit["n_target"] == fit["n_target"]:
            gap_ax.errorbar(fit["n_target"], 100 * TARGET, xerr=[[fit["n_target"] - fit["n_target_lo"]],
                            [fit["n_target_hi"] - fit["n_target"]]], fmt="x", color=f"C{i}", capsize=4)
    gap_ax.axhline(100 * TARGET, color="grey", lw=0.8, ls=":")
    gap_ax.set_yscale("log")
    for ax, name in ((acc_ax, "test accuracy (%)"), (gap_ax, "gap: train − test (points, log)")):
        ax.set_xscale("log")
        ax.set_xlabel("training images per class (log)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for axis in (acc_ax.xaxis, gap_ax.xaxis, gap_ax.yaxis):  # plain numbers at 1, 2, 5 × 10^k on log axes
        axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    gap_ax.set_title(f"dashed: power law · dotted: log-linear · ×: {100 * TARGET:.0f} points where the forms agree",
                     fontsize=8)
    acc_ax.set_title("mean ± 95% CI over seeds", fontsize=8)
    return _save(fig, out / "scaling.png")


def effects_over_epochs(df: pd.DataFrame, confidence: float, out: Path) -> Path | None:
    """The paired difference in gap between each factor's levels, epoch by epoch, one value per replicate
    (the mean of its pairs over the other factors' cells, as a verdict takes it) and a band at the
    verdicts' family-wise `confidence` over replicates (a plain t band, so under an adaptive design's
    Stein intervals the last epoch's band is not the verdict's): an effect that shrinks to 0 by the end
    only delayed the gap; one that stays away from 0 moved it."""
    names = factors(df)
    pairs = [(f, level, ls[0]) for f, ls in levels(df).items() for level in ls[1:]
             if {level, ls[0]} <= set(df[column(f)])]  # levels with finished trials (a running study may lack some)
    if not pairs:
        return None
    cols = min(3, len(pairs))
    rows = -(-len(pairs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False, sharex=True)
    for ax, (factor, level, reference) in zip(axes.flat, pairs):
        others = [column(f) for f in names if f != factor]
        sides = {}
        for lv in (level, reference):
            group = df[df[column(factor)] == lv].sort_values([*others, "seed"])
            sides[lv] = (group[[*others, "seed"]].astype(str).agg("|".join, axis=1).tolist(), _padded(group, "gap"))
        keys = sorted(set(sides[level][0]) & set(sides[reference][0]))
        n = max(sides[level][1].shape[1], sides[reference][1].shape[1])

        def aligned(lv: str) -> np.ndarray:
            names, values = sides[lv]
            values = np.pad(values, ((0, 0), (0, n - values.shape[1])), mode="edge")
            return values[[names.index(k) for k in keys]]

        per_pair = pd.DataFrame((aligned(level) - aligned(reference)) * 100)
        diff = per_pair.groupby([k.rsplit("|", 1)[-1] for k in keys]).mean().to_numpy()  # one row per replicate
        mean = diff.mean(0)
        epochs = np.arange(1, n + 1)
        ax.plot(epochs, mean, "C0")
        bands = [mean_interval(diff[:, e], confidence) for e in range(n)]
        if bands[0].lo == bands[0].lo:  # enough replicates for an interval
            ax.fill_between(epochs, [b.lo for b in bands], [b.hi for b in bands], color="C0", alpha=0.25)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(f"{factor}: {level} − {reference}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(pairs):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("Δ gap (points)")
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    fig.suptitle(f"paired difference in train − test gap per epoch ({100 * confidence:.2f}% band over replicates: "
                 "the verdicts' family-wise level)", fontsize=10)
    return _save(fig, out / "effects_over_epochs.png")


def verdicts_chart(verdicts: pd.DataFrame, confidence: float) -> dict | None:
    """Each claim's paired difference in the gap with its family-wise interval, its verdict under its name and
    its test-accuracy difference on hover, as a Plotly figure's JSON: the chart optuna-dashboard shows on the
    study page beside its importance chart, which answers another question (`summary.IMPORTANCE`). Plotly's
    JSON has no NaN, so a missing interval is null and its label says "no CI". None without claims."""
    if verdicts.empty:
        return None
    value, lo, hi = (100 * verdicts[f"gap_{k}"] for k in ("diff", "lo", "hi"))
    claims = [f"{c}<br><i>{v}</i>" for c, v in zip(verdicts["claim"], verdicts["verdict"])]
    tests = [interval_text(v, a, b, unit=" points") for v, a, b in
             zip(verdicts["test_acc_diff"], verdicts["test_acc_lo"], verdicts["test_acc_hi"])]
    trace = {"type": "scatter", "mode": "markers+text", "name": "gap", "x": _plain(value), "y": claims,
             "error_x": {"type": "data", "symmetric": False, "array": _plain(hi - value),
                         "arrayminus": _plain(value - lo), "color": "#d62728"},
             "marker": {"color": "#d62728", "size": 9}, "textposition": "top center", "textfont": {"size": 11},
             "text": [interval_text(v, a, b) for v, a, b in zip(verdicts["gap_diff"], verdicts["gap_lo"],
                                                               verdicts["gap_hi"])],
             "customdata": tests, "hovertemplate": "%{y}<br>gap %{text} points<br>test accuracy %{customdata}"
                                                   "<extra></extra>"}
    note = ("Beside it, Hyperparameter Importance ranks which factors the top 10% of trials by validation accuracy "
            "share:<br>another question (no gap, no pairing, no interval); these intervals are the verdicts.")
    layout = {"title": {"text": f"Verdicts: paired effect on the gap (train − test),<br>{100 * confidence:.2f}% "
                                "family-wise intervals over replicates", "font": {"size": 14}},
              "xaxis": {"title": {"text": "level − reference (points)"}, "zeroline": True, "zerolinewidth": 2},
              "yaxis": {"autorange": "reversed", "automargin": True}, "showlegend": False,
              "height": 190 + 80 * len(verdicts), "margin": {"t": 70, "b": 110},
              "annotations": [{"text": note, "xref": "paper", "yref": "paper", "x": 0, "y": 0, "yshift": -75,
                               "showarrow": False, "xanchor": "left", "yanchor": "top", "align": "left",
                               "font": {"size": 10}}]}
    return {"data": [trace], "layout": layout}


def _plain(values: pd.Series) -> list[float | None]:
    """Numbers as JSON takes them: NaN becomes null."""
    return [None if v != v else round(float(v), 4) for v in values]


def trial_curves(history: dict[str, list[float]], title: str, path: Path) -> Path:
    """One trial's accuracy per epoch (train, val, test, extra sets), dotted where the learning rate
    was cut: the small figure on the trial's page in optuna-dashboard."""
    fig, ax = plt.subplots(figsize=(4.2, 2.6))
    epochs = np.arange(1, len(history["train_acc"]) + 1)
    extra = [m for m in history if m.endswith("_acc") and m not in
             ("train_acc", "val_acc", "test_acc", "train_acc_augmented")]
    for metric, colour in [("train_acc", "C0"), ("val_acc", "C1"), ("test_acc", "C3"), *_extra_colours(extra)]:
        ax.plot(epochs, np.array(history[metric]) * 100, colour, label=metric.removesuffix("_acc"))
    for e in np.flatnonzero(np.diff(history["lr"]) < 0) + 1.5:
        ax.axvline(e, color="grey", ls=":", lw=1)
    ax.set_xlabel("epoch (dotted: lr ×0.1)", fontsize=8)
    ax.set_ylabel("accuracy (%)", fontsize=8)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def predictions(images: torch.Tensor, labels: torch.Tensor, classes: list[str],
                runs: dict[str, list[int]], out: Path, count: int = 16) -> Path:
    """The report's Figures 2 and 4, side by side: the same test images, each model's guess,
    red where a model is wrong, a frame where the two models disagree."""
    names = list(runs)
    pick = np.unique(np.linspace(0, len(labels) - 1, min(count, len(labels))).astype(int))
    fig, axes = plt.subplots(len(names), len(pick), figsize=(1.3 * len(pick), 1.9 * len(names) + 0.6), squeeze=False)
    for row, name in enumerate(names):
        pred = runs[name]
        for col, i in enumerate(pick):
            ax = axes[row, col]
            ax.imshow(images[i].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            right = pred[i] == labels[i]
            ax.set_title(f"{classes[pred[i]][:10]}", fontsize=7, color="green" if right else "red")
            if len({runs[n][i] for n in names}) > 1:
                for spine in ax.spines.values():
                    spine.set_edgecolor("orange")
                    spine.set_linewidth(3)
            if col == 0:
                ax.set_ylabel(name.split("\n")[0], fontsize=8)
            if row == len(names) - 1:
                ax.set_xlabel(f"true: {classes[labels[i]][:10]}", fontsize=6)
    models = "; ".join(n.replace("\n", ": ") for n in names)
    fig.suptitle(f"same {len(pick)} test images; title = prediction (green right, red wrong); "
                 "orange frame = models disagree\n"
                 + models, fontsize=9)
    return _save(fig, out / "predictions.png")


def confusions(pairs: pd.DataFrame, out: Path, top: int = 15) -> Path:
    """The (true → predicted) class pairs most often confused, summed over every finished trial."""
    head = pairs.head(top)
    fig, ax = plt.subplots(figsize=(6, 0.32 * len(head) + 1.2))
    ax.barh([f"{t} → {p}" for t, p in zip(head["true"], head["predicted"])], head["count"], color="C1")
    ax.invert_yaxis()
    ax.set_xlabel("test images, summed over trials")
    ax.set_title("most frequent confusions")
    return _save(fig, out / "confusions.png")
