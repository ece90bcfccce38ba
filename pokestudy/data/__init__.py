"""Data: decode a source once into a cached uint8 tensor, then split it for trials.

`load` returns the cached `Dataset`; `pool` groups it into the `Pool` a study ships to its trials, and
`Pool.split` deals one replicate's train / val / test into the `Prepared` tensors a trial trains on
(`prepare` does both, for one split). Nothing downstream ever opens an image file.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pokestudy import UserError, __version__
from pokestudy.data import near, sources
from pokestudy.data.split import SPLITS, split
from pokestudy.models import MIN_RES

CACHE_FORMAT = 7  # bump when decoding or matching changes, so old caches are rebuilt (7: crop pairs in class)
MAX_RES = 1024  # the one resolution bound of the package: MIN_RES comes from the models


@dataclass
class Dataset:
    """Decoded, de-duplicated images at one resolution: exactly what the cache file holds."""

    images: torch.Tensor  # N x 3 x R x R, uint8
    labels: torch.Tensor  # N, int64
    groups: torch.Tensor  # N, int64: images of one group always land in the same split
    hashes: list[str]
    phashes: torch.Tensor  # N x 64, bool: perceptual hashes, for near-duplicates
    paths: list[str]  # where each image came from, for messages
    classes: list[str]
    extras: dict[str, tuple[torch.Tensor, torch.Tensor]]  # named extra evaluation sets
    manifest: dict
    keypoints: torch.Tensor  # M x 2 float16, descriptors M x 32 uint8, feature_offsets N + 1 (empty: no
    descriptors: torch.Tensor  # features, a source that is not a folder): the crop matcher's input, kept
    feature_offsets: torch.Tensor  # for checking outside sets against this data
    crop_pairs: torch.Tensor  # P x 2: pairs of images that the crop matcher found to be one picture
    path: Path

    def features(self) -> near.Features:
        return near.Features(self.keypoints.numpy(), self.descriptors.numpy(), self.feature_offsets.numpy())


@dataclass
class Prepared:
    """What a trial needs: (images, labels) per evaluation set — train, val, test, then extras."""

    sets: dict[str, tuple[torch.Tensor, torch.Tensor]]
    classes: list[str]
    manifest: dict
    train_groups: torch.Tensor  # the group of each training image, so a fraction keeps whole groups
    near_groups: list[dict] = field(default_factory=list)  # every near-duplicate group, for `data info --json`
    # {"train", "test"}: each image's group by the near-duplicate matcher, where the split's grouping lets such
    # groups straddle it (exact bytes only); None where it keeps every near copy on one side
    copy_groups: dict[str, torch.Tensor] | None = None

    @property
    def near_copy(self) -> torch.Tensor | None:
        """Which test images have a near copy in the training split (a boolean mask over the test set), so a
        trial can measure how much such copies inflate test accuracy; None where the grouping rules them out."""
        if self.copy_groups is None:
            return None
        return torch.isin(self.copy_groups["test"], self.copy_groups["train"])

    def keep_fraction(self, fraction: float, seed: int) -> "Prepared":
        """The same data with only `fraction` of each class's training groups (at least one); validation
        and test unchanged. Groups are drawn in one seeded order per class, so for one seed a smaller
        fraction's training set is part of every larger one's."""
        if fraction >= 1:
            return self
        x, y = self.sets["train"]
        rng = np.random.default_rng(seed)
        keep = []
        for c in torch.unique(y).tolist():
            ids = torch.unique(self.train_groups[y == c]).numpy()
            chosen = rng.permutation(ids)[: max(1, round(fraction * len(ids)))]
            keep.append(torch.nonzero((y == c) & torch.isin(self.train_groups, torch.from_numpy(chosen))).flatten())
        idx = torch.cat(keep).sort().values
        copies = None if self.copy_groups is None else {**self.copy_groups, "train": self.copy_groups["train"][idx]}
        return Prepared(sets={**self.sets, "train": (x[idx], y[idx])}, classes=self.classes, manifest=self.manifest,
                        train_groups=self.train_groups[idx], near_groups=self.near_groups, copy_groups=copies)

    def at_res(self, res: int, chunk: int = 512) -> "Prepared":
        """The same images at `res` pixels, area-averaged from the resolution they were decoded at, so a
        study with `res` as a factor decodes its data once, at the largest level (`data.res`)."""
        have = self.sets["train"][0].shape[-1]
        if res == have:
            return self
        if res > have:
            raise UserError(f"cannot train at {res} px on images decoded at {have} px; decode at {res} (data.res)")

        def shrink(x: torch.Tensor) -> torch.Tensor:
            parts = [F.interpolate(p.float(), size=(res, res), mode="area").round_().to(torch.uint8)
                     for p in x.split(chunk)]
            return torch.cat(parts) if parts else x.new_zeros((0, x.shape[1], res, res))

        return replace(self, sets={k: (shrink(x), y) for k, (x, y) in self.sets.items()})


def check_res(res: int) -> None:
    if not MIN_RES <= res <= MAX_RES:
        raise UserError(f"resolution {res} is out of range; use {MIN_RES}..{MAX_RES} pixels (64 suits a CPU)")


def load(spec: str, res: int) -> Dataset:
    """The dataset for `spec` at `res`, from the cache when its inputs are unchanged."""
    check_res(res)
    source = sources.parse(spec)
    key = {**source.describe(), "res": res, "format": CACHE_FORMAT}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = sources.cache_root() / "datasets" / f"{source.kind}-{res}px-{digest}.pt"
    if not path.exists():
        sources.progress(f"decoding {source.kind} data at {res}px into the cache (once)…")
        _write(_build(source.load(res), key), path)
        sources.progress(f"decoded {source.kind} data into {path}\n")
    blob = torch.load(path, weights_only=True, mmap=True)
    return Dataset(**blob, path=path)


def _build(raw: sources.Raw, key: dict) -> dict:
    """Drop exact duplicates (first copy wins) and label conflicts (the same bytes under two classes:
    no copy is used), number the groups, fingerprint the content and write the manifest."""
    labels_of: dict[str, set[int]] = {}
    for h, label in zip(raw.hashes, raw.labels):
        labels_of.setdefault(h, set()).add(label)
    conflicted = {h for h, ls in labels_of.items() if len(ls) > 1}
    conflicts = [{"classes": sorted(raw.classes[label] for label in labels_of[h]),
                  "paths": [p for p, h2 in zip(raw.paths, raw.hashes) if h2 == h]} for h in sorted(conflicted)]
    first: dict[str, int] = {}
    keep, duplicates = [], []
    for i, h in enumerate(raw.hashes):
        if h in conflicted:
            continue
        if h in first:
            duplicates.append({"path": raw.paths[i], "copy_of": raw.paths[first[h]]})
        else:
            first[h] = i
            keep.append(i)
    group_ids = {g: n for n, g in enumerate(dict.fromkeys(raw.groups[i] for i in keep))}
    labels = torch.tensor([raw.labels[i] for i in keep], dtype=torch.long)
    counts = torch.bincount(labels, minlength=len(raw.classes)).tolist()
    if 0 in counts:
        empty = [raw.classes[c] for c, n in enumerate(counts) if n == 0]
        raise UserError(f"class(es) {', '.join(empty[:5])} have no usable image (every copy is a label conflict); "
                        "fix the folders (`pokestudy data info` lists conflicts)")
    extras = {name: (_stack(imgs), torch.tensor(lbls, dtype=torch.long)) for name, (imgs, lbls) in raw.extras.items()}
    feats = near.Features.stack([raw.features[i] for i in keep]) if raw.features else None
    crop_pairs = near.matches(feats, progress=sources.progress) if feats else np.zeros((0, 2), np.int64)
    crop_pairs = crop_pairs[labels.numpy()[crop_pairs[:, 0]] == labels.numpy()[crop_pairs[:, 1]]]  # in class: see near
    content = hashlib.sha256(json.dumps([raw.classes, [(raw.hashes[i], raw.labels[i]) for i in keep]]).encode())
    for name, (x, y) in extras.items():
        content.update(name.encode() + x.numpy().tobytes() + y.numpy().tobytes())
    manifest = {
        **key,
        "pokestudy": __version__,
        "classes": len(raw.classes),
        "images": len(keep),
        "per_class": {"min": min(counts), "median": statistics.median(counts), "max": max(counts)},
        "duplicates": duplicates,
        "conflicts": conflicts,
        "fingerprint": content.hexdigest()[:16],
        "skipped": raw.skipped,
        "extras": {name: len(labels_) for name, (_, labels_) in raw.extras.items()},
    }
    return {
        "images": _stack([raw.images[i] for i in keep]),
        "labels": labels,
        "groups": torch.tensor([group_ids[raw.groups[i]] for i in keep], dtype=torch.long),
        "hashes": [raw.hashes[i] for i in keep],
        "phashes": torch.from_numpy(np.stack([raw.phashes[i] for i in keep])),
        "paths": [raw.paths[i] for i in keep],
        "classes": raw.classes,
        "extras": extras,
        "manifest": manifest,
        "keypoints": torch.from_numpy(feats.points if feats else np.zeros((0, 2), np.float16)),
        "descriptors": torch.from_numpy(feats.descriptors if feats else np.zeros((0, 32), np.uint8)),
        "feature_offsets": torch.from_numpy(feats.offsets if feats else np.zeros(0, np.int64)),
        "crop_pairs": torch.from_numpy(crop_pairs),
    }


def _stack(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def _write(blob: dict, path: Path) -> None:
    """Write to a temporary name and rename, so an interrupted decode never leaves half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(blob, tmp)
    os.replace(tmp, path)


@dataclass
class Pool:
    """A study's data before any split: decoded, grouped, with its outside evaluation sets. Each replicate
    splits it its own way (`split`); it holds NumPy arrays, which Ray's object store hands to every trial of
    a node without a copy (a torch tensor is deserialized into each trial's own memory)."""

    images: np.ndarray  # N x 3 x R x R, uint8
    labels: np.ndarray  # N, int64
    groups: np.ndarray  # N, int64: the near-duplicate groups, which no split cuts in two
    extras: dict[str, tuple[np.ndarray, np.ndarray]]
    classes: list[str]
    fractions: tuple[float, float, float]
    manifest: dict  # the data, the grouping rule and the base split (`split_seed`, its sizes)
    near_groups: list[dict] = field(default_factory=list)  # every near-duplicate group, for `data info --json`
    copy_groups: np.ndarray | None = None  # N, int64: the matcher's groups where `groups` lets them straddle a split

    def split(self, seed: int) -> Prepared:
        """The data as split by `seed`: stratified by class, whole groups to each split, deterministic."""
        labels, groups = torch.from_numpy(self.labels), torch.from_numpy(self.groups)
        idx = split(labels, groups, self.fractions, seed)
        _check_splittable(self.classes, labels, groups, idx)
        sets = {s: (torch.from_numpy(self.images[idx[s].numpy()]), labels[idx[s]]) for s in SPLITS}
        sets.update({name: (torch.from_numpy(x.copy()), torch.from_numpy(y.copy())) for name, (x, y) in
                     self.extras.items()})
        manifest = {**self.manifest, "split_seed": seed, "splits": {s: len(idx[s]) for s in SPLITS}}
        copies = None if self.copy_groups is None else {s: torch.from_numpy(self.copy_groups[idx[s].numpy()])
                                                        for s in ("train", "test")}
        return Prepared(sets=sets, classes=self.classes, manifest=manifest, train_groups=groups[idx["train"]],
                        near_groups=self.near_groups, copy_groups=copies)


def pool(spec: str, res: int, split_seed: int = 0, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
         evals: dict[str, str] | None = None, near_duplicates: int | str | None = None) -> Pool:
    """Load (or decode) the data and group it, once per study: the split is left to each replicate.

    `near_duplicates` is the grouping rule (`near.parse_rule`: BITS, the most bits in which two images'
    perceptual hashes may differ for them to share a group, 0 for exact bytes only, and `+crops` for the
    crop matcher too; None: the source's default). `evals` adds outside evaluation sets: {name: folder in
    the ImageFolder layout}. `split_seed` is the base split the manifest describes (its sizes, and how many
    near-duplicate groups the exact-bytes rule would have let straddle it)."""
    ds = load(spec, res)
    source = sources.parse(spec)
    rule = near.parse_rule(source.near_duplicates if near_duplicates is None else near_duplicates)
    if rule.crops and not len(ds.feature_offsets):
        raise UserError(f"near-duplicates {rule.value}: the crop matcher needs a folder of pictures; "
                        f"{source.kind} data takes BITS only (e.g. --near-duplicates {rule.bits})")
    by_phash, groups = _grouped(ds, rule)
    crops_changed = not torch.equal(groups, by_phash)
    copies = _straddling(ds, near.parse_rule(source.near_duplicates), rule, groups)
    exact = split(ds.labels, ds.groups, fractions, split_seed)
    idx = split(ds.labels, groups, fractions, split_seed) if rule.bits or rule.crops else exact
    summary, listing = _near_summary(ds, groups, by_phash, rule, exact)
    tested = set(ds.labels[idx["test"]].tolist())
    manifest = {**ds.manifest, "data": spec, "cache": str(ds.path), "split_seed": split_seed,
                "fractions": list(fractions), "splits": {s: len(idx[s]) for s in SPLITS}, "near_duplicates": summary,
                "train_only": [c for n, c in enumerate(ds.classes) if n not in tested]}
    extras = {name: (x.numpy(), y.numpy()) for name, (x, y) in ds.extras.items()}
    if evals:
        manifest["evals"] = {}
        for name, path in evals.items():
            if name in (*SPLITS, *extras):
                raise UserError(f"evaluation set name {name!r} is taken; choose another than "
                                f"{', '.join((*SPLITS, *extras))}")
            (x, y), manifest["evals"][name] = _outside(name, path, res, ds, rule)
            extras[name] = (x.numpy(), y.numpy())
            crops_changed |= manifest["evals"][name]["found_only_by_crops"] > 0
    # The rule as it acted: `BITS+crops` only where the crop matcher changed a group or an outside set, so a
    # study whose data it leaves alone keeps the identity it had before the matcher existed.
    summary["threshold"] = near.Rule(rule.bits, rule.crops and crops_changed).value
    if copies is not None:
        manifest["near_copies"] = {"rule": copies[0].value, "test_images": int(torch.isin(
            copies[1][idx["test"]], copies[1][idx["train"]]).sum())}
    _check_splittable(ds.classes, ds.labels, groups, idx)
    return Pool(images=ds.images.numpy(), labels=ds.labels.numpy(), groups=groups.numpy(), extras=extras,
                classes=ds.classes, fractions=tuple(fractions), manifest=manifest, near_groups=listing,
                copy_groups=None if copies is None else copies[1].numpy())


def _grouped(ds: Dataset, rule: near.Rule) -> tuple[torch.Tensor, torch.Tensor]:
    """The groups by `rule`'s pHash alone, and with the crop matcher's pairs too where the rule has them."""
    by_phash = merge_groups(ds.groups, phash_pairs(ds.phashes, rule.bits))
    return by_phash, merge_groups(by_phash, ds.crop_pairs) if rule.crops else by_phash


def _straddling(ds: Dataset, default: near.Rule, rule: near.Rule,
                groups: torch.Tensor) -> tuple[near.Rule, torch.Tensor] | None:
    """The near-duplicate groups of the source's own rule (`default`, the crop matcher only where the data has
    features), where the study's `rule` lets one of them straddle a split: each trial then measures its test
    images with a near copy in train apart from the rest. None where every such group lies in one of `groups`."""
    marked = near.Rule(default.bits, default.crops and bool(len(ds.feature_offsets)))
    if marked == rule:
        return None
    matched = _grouped(ds, marked)[1]
    together = len(torch.unique(torch.stack([matched, groups]), dim=1)[0]) == len(torch.unique(matched))
    return None if together else (marked, matched)


def prepare(spec: str, res: int, split_seed: int = 0, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
            evals: dict[str, str] | None = None, near_duplicates: int | str | None = None) -> Prepared:
    """The data split once, by `split_seed`: for one trial (`pokestudy train`, the benchmark); see `pool`."""
    return pool(spec, res, split_seed, fractions, evals, near_duplicates).split(split_seed)


def _check_splittable(classes: list[str], labels: torch.Tensor, groups: torch.Tensor,
                      idx: dict[str, torch.Tensor]) -> None:
    """A class with fewer than 3 groups cannot give train, val and test one each, so it is trained on only
    (`train_only` in the manifest); when no class can be split there is nothing to validate or test on."""
    if len(idx["val"]) and len(idx["test"]):
        return
    sizes = [len(torch.unique(groups[labels == c])) for c in range(len(classes))]
    small = [f"{classes[c]} ({n})" for c, n in enumerate(sizes) if n < 3]
    raise UserError(f"too few pictures to split into train, val and test: a class needs 3 groups of pictures "
                    f"(near-duplicates count as one) and {', '.join(small[:5])}{' …' if len(small) > 5 else ''} "
                    "have fewer; add pictures to these classes")


def hamming(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bits in which each hash of `a` differs from each of `b` (len(a) x len(b)), by one matrix product."""
    sa, sb = a.float() * 2 - 1, b.float() * 2 - 1
    return ((a.shape[1] - sa @ sb.T) / 2).round().long()


def phash_pairs(phashes: torch.Tensor, threshold: int) -> torch.Tensor:
    """Pairs (P x 2) of images whose perceptual hashes differ in at most `threshold` bits (none for 0)."""
    found = [torch.zeros((0, 2), dtype=torch.long)]
    for start in range(0, len(phashes) if threshold else 0, 1024):
        close = (hamming(phashes[start:start + 1024], phashes) <= threshold).nonzero()
        found.append(close + torch.tensor([start, 0]))
    return torch.cat(found)


def merge_groups(groups: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """The groups of `groups` merged along `pairs` of images, across classes too (the split then keeps such
    a group in one split in every class); each group is numbered by the smallest group it merged."""
    parent = list(range(int(groups.max()) + 1 if len(groups) else 0))

    def root(g: int) -> int:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    for i, j in pairs.tolist():
        a, b = root(int(groups[i])), root(int(groups[j]))
        parent[max(a, b)] = min(a, b)
    return torch.tensor([root(int(g)) for g in groups], dtype=torch.long)


def _near_summary(ds: Dataset, groups: torch.Tensor, by_phash: torch.Tensor, rule: near.Rule,
                  exact_split: dict[str, torch.Tensor]) -> tuple[dict, list[dict]]:
    """What near-duplicate grouping did: groups that merged images of two or more exact groups, the
    largest, a few examples, those across classes, those only the crop matcher found, and how many the
    exact-bytes rule let straddle splits; and every such group with its paths, for an audit."""
    if not (rule.bits or rule.crops):
        return {"threshold": 0, "bits": 0, "crops": False}, []
    where = torch.empty(len(groups), dtype=torch.long)
    for n, s in enumerate(SPLITS):
        where[exact_split[s]] = n
    pairs = torch.unique(torch.stack([groups, ds.groups]), dim=1)[0]  # (near group, exact group) pairs
    ids, counts = torch.unique(pairs, return_counts=True)
    merged = [torch.nonzero(groups == g).flatten() for g in ids[counts > 1].tolist()]
    merged.sort(key=len, reverse=True)
    across = [m for m in merged if len(torch.unique(ds.labels[m])) > 1]
    within = [m for m in merged if len(torch.unique(ds.labels[m])) == 1]

    def found_by(m: torch.Tensor) -> str:
        """`phash` where the hash alone formed the group, `crops` where it joined none of it, else both."""
        parts = len(torch.unique(by_phash[m]))
        exact_parts = len(torch.unique(ds.groups[m]))
        return "phash" if parts == 1 else "crops" if parts == exact_parts else "phash+crops"

    def paths(groups: list[torch.Tensor], n: int) -> list[list[str]]:
        return [[ds.paths[i] for i in m[:4].tolist()] for m in groups[:n]]

    listing = [{"paths": [ds.paths[i] for i in m.tolist()], "found_by": found_by(m),
                "classes": sorted({ds.classes[c] for c in ds.labels[m].tolist()})} for m in merged]
    summary = {"threshold": rule.value, "bits": rule.bits, "crops": rule.crops, "groups": len(merged),
               "images": sum(map(len, merged)), "largest": len(merged[0]) if merged else 0,
               "across_classes": len(across), "crop_groups": sum(g["found_by"] != "phash" for g in listing),
               "straddled_exact_split": sum(len(torch.unique(where[m])) > 1 for m in merged),
               "examples": paths(within, 3), "examples_across_classes": paths(across, 2)}
    return summary, listing


def normalise(name: str) -> str:
    """Class names as people spell them: case, spaces and punctuation ignored (`Mr. Mime` = `mr-mime`)."""
    return "".join(c for c in name.casefold() if c.isalnum())


def _outside(name: str, path: str, res: int, train: Dataset,
             rule: near.Rule) -> tuple[tuple[torch.Tensor, torch.Tensor], dict]:
    """An outside evaluation set: its class folders matched to the training classes by normalised name;
    unmatched folders, copies (the same bytes) and near-copies (by `rule`) of any image of the training
    data are left out and counted."""
    ds = load(path, res)
    ours = {normalise(c): i for i, c in enumerate(train.classes)}
    mapping = {i: ours[normalise(c)] for i, c in enumerate(ds.classes) if normalise(c) in ours}
    unmatched = [c for i, c in enumerate(ds.classes) if i not in mapping]
    if not mapping:
        raise UserError(f"evaluation set {name} ({path}): no class folder matches a training class "
                        f"(e.g. {', '.join(ds.classes[:3])} vs {', '.join(train.classes[:3])}); "
                        "folders are matched by name, ignoring case, spaces and punctuation")
    matched = [i for i, label in enumerate(ds.labels.tolist()) if label in mapping]
    seen = set(train.hashes)
    copy = [ds.hashes[i] in seen for i in matched]
    near_phash = [False] * len(matched)
    if rule.bits and matched:
        near_phash = (hamming(ds.phashes[matched], train.phashes).min(1).values <= rule.bits).tolist()
    pairs = _outside_crop_matches(train, ds) if rule.crops else torch.zeros((0, 2), dtype=torch.long)
    cropped = {j for i, j in pairs.tolist() if mapping.get(int(ds.labels[j])) == int(train.labels[i])}  # in class
    near_crops = [i in cropped for i in matched]
    keep = [i for i, c, p, k in zip(matched, copy, near_phash, near_crops) if not (c or p or k)]
    if not keep:
        raise UserError(f"evaluation set {name} ({path}) has no image left: every matched image is a copy or a "
                        "near-copy of a training image")
    labels = torch.tensor([mapping[int(ds.labels[i])] for i in keep], dtype=torch.long)
    info = {"path": path, "fingerprint": ds.manifest["fingerprint"], "images": len(keep),
            "classes": len(set(mapping.values())), "unmatched": unmatched, "copies_of_training_images": sum(copy),
            "near_copies_of_training_images": sum((p or k) and not c for c, p, k in zip(copy, near_phash, near_crops)),
            "found_only_by_crops": sum(k and not (c or p) for c, p, k in zip(copy, near_phash, near_crops)),
            "skipped": ds.manifest["skipped"]}
    return (ds.images[keep], labels), info


def _outside_crop_matches(train: Dataset, outside: Dataset) -> torch.Tensor:
    """(training image, outside image) pairs that the crop matcher finds; cached beside both datasets' caches,
    since matching the two takes as long as grouping one."""
    path = train.path.with_name(f"{train.path.stem}.outside-{outside.path.stem}.pt")
    if path.exists():
        return torch.load(path, weights_only=True)
    a, b = train.features(), outside.features()
    both = near.Features(np.concatenate([a.points, b.points]), np.concatenate([a.descriptors, b.descriptors]),
                         np.concatenate([a.offsets, a.offsets[-1] + b.offsets[1:]]))
    side = np.r_[np.zeros(len(a), np.int64), np.ones(len(b), np.int64)]
    pairs = near.matches(both, side, progress=sources.progress)  # i < j: j is the outside image
    found = torch.from_numpy(pairs - np.array([0, len(a)]))
    _write(found, path)
    return found
