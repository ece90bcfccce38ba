"""Figures (PNG, matplotlib Agg): curves, gaps with CIs, the report's prediction grids, confusions.

Each function takes tables already computed from the storage and returns the written path.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves(df: pd.DataFrame, out: Path) -> Path:
    """Train vs test accuracy per epoch for every condition: mean over seeds, band = min..max."""
    conditions = list(dict.fromkeys(df["condition"]))
    cols = min(4, len(conditions))
    rows = -(-len(conditions) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.7 * rows), sharex=True, sharey=True, squeeze=False)
    extra = [k for k in df["history"].iloc[0] if k not in ("train_acc", "val_acc", "test_acc")
             and not k.endswith("_augmented")]
    for ax, condition in zip(axes.flat, conditions):
        group = df[df["condition"] == condition]
        for metric, colour in [("train_acc", "C0"), ("test_acc", "C3"), *[(m, "C2") for m in extra]]:
            runs = [h[metric] for h in group["history"]]
            n = min(len(r) for r in runs)
            values = np.array([r[:n] for r in runs]) * 100
            epochs = np.arange(1, n + 1)
            ax.plot(epochs, values.mean(0), colour, label=metric.replace("_acc", ""))
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.fill_between(epochs, values.min(0), values.max(0), color=colour, alpha=0.2)
        ax.set_title(condition.replace(",", "\n"), fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(conditions):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)")
    fig.suptitle(f"train vs test accuracy (mean over {df.groupby('condition').size().min()}+ seeds, band: min–max)")
    return _save(fig, out / "curves.png")


def gaps(table: pd.DataFrame, out: Path) -> Path:
    """The gap per condition with its 95% CI, beside the report's single-run 98 − 50 = 48 points."""
    labels = [", ".join(str(r[f]) for f in table.attrs["factors"]) for _, r in table.iterrows()]
    y = np.arange(len(table))
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(table) + 1.5))
    for metric, colour, offset in [("gap", "C3", -0.15), ("artwork_gap", "C2", 0.15)]:
        if f"{metric}_mean" not in table:
            continue
        mean = table[f"{metric}_mean"] * 100
        err = np.nan_to_num(np.abs(np.stack([mean - table[f"{metric}_lo"] * 100, table[f"{metric}_hi"] * 100 - mean])))
        ax.errorbar(mean, y + offset, xerr=err, fmt="o", color=colour, capsize=3,
                    label="train − test" if metric == "gap" else "train − artwork")
    ax.axvline(48, color="grey", ls="--", lw=1, label="report: 98 − 50")
    ax.axvline(0, color="black", lw=0.5)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("gap (accuracy points), 95% CI over seeds")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, out / "gap.png")


def predictions(images: torch.Tensor, labels: torch.Tensor, classes: list[str],
                runs: dict[str, list[int]], out: Path, count: int = 16) -> Path:
    """The report's Figures 2 and 4, side by side: the same test images, each model's guess,
    red where a model is wrong, a frame where the two models disagree."""
    names = list(runs)
    pick = np.linspace(0, len(labels) - 1, count).astype(int)
    fig, axes = plt.subplots(len(names), count, figsize=(1.3 * count, 1.9 * len(names) + 0.6), squeeze=False)
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
    fig.suptitle("same 16 test images; title = prediction (green right, red wrong); orange frame = models disagree\n"
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
