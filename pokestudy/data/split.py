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
    groups), the rest goes to train. Duplicates share a group upstream, so they cannot straddle.
    """
    rng = np.random.default_rng(seed)
    labels_np, groups_np = labels.numpy(), groups.numpy()
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in np.unique(labels_np):
        in_class = np.flatnonzero(labels_np == c)
        ids, sizes = np.unique(groups_np[in_class], return_counts=True)
        order = rng.permutation(len(ids))
        ids, sizes = ids[order], sizes[order]
        total, assigned, k = sizes.sum(), {}, 0
        for name, frac in (("test", fractions[2]), ("val", fractions[1])):
            want, got = frac * total, 0
            while k < len(ids) - 1 and (got == 0 and len(ids) >= 3 or got + sizes[k] / 2 <= want):
                assigned[ids[k]] = name
                got += sizes[k]
                k += 1
        for i in in_class:
            out[assigned.get(groups_np[i], "train")].append(int(i))
    return {s: torch.tensor(sorted(v), dtype=torch.long) for s, v in out.items()}
