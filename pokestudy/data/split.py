"""Train / validation / test splits that are stratified by class and never cut a group in two."""

from __future__ import annotations

import numpy as np
import torch

SPLITS = ("train", "val", "test")


def split(labels: torch.Tensor, groups: torch.Tensor, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
          seed: int = 0) -> dict[str, torch.Tensor]:
    """Indices per split, deterministic from `seed`.

    Whole groups are dealt to splits class by class: test and validation are filled first up to
    their share of the class's images (one group each at least, when a class has three or more
    groups), the rest goes to train. Duplicates share a group upstream, so they cannot straddle;
    a group with images of several classes is dealt once, in the first of them.
    """
    rng = np.random.default_rng(seed)
    labels_np, groups_np = labels.numpy(), groups.numpy()
    assigned: dict[int, str] = {}  # a group that spans classes keeps the split it got in its first class
    for c in np.unique(labels_np):
        in_class = np.flatnonzero(labels_np == c)
        ids, sizes = np.unique(groups_np[in_class], return_counts=True)
        order = rng.permutation(len(ids))
        ids, sizes = ids[order], sizes[order]
        taken = np.array([i in assigned for i in ids], dtype=bool)
        free, free_sizes = ids[~taken], sizes[~taken]
        total, k = sizes.sum(), 0
        for name, frac in (("test", fractions[2]), ("val", fractions[1])):
            want = frac * total
            got = sum(int(n) for i, n in zip(ids[taken], sizes[taken]) if assigned[i] == name)
            while k < len(free) - 1 and (got == 0 and len(ids) >= 3 or got + free_sizes[k] / 2 <= want):
                assigned[free[k]] = name
                got += free_sizes[k]
                k += 1
        assigned.update({i: "train" for i in free[k:]})
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, g in enumerate(groups_np):
        out[assigned[g]].append(i)
    return {s: torch.tensor(v, dtype=torch.long) for s, v in out.items()}
