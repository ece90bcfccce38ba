"""Near-duplicates that survive rough re-use: a tight crop, a rescale, a re-encode, a border, a new background.

The global pHash (`images.perceptual_hash`) finds gentle copies, but a copy cropped to half the frame
has another hash altogether. This matcher compares local features instead: ORB keypoints (OpenCV) of
every picture; candidate pairs proposed by locality-sensitive hashing of their descriptors, each picture
keeping only its few strongest partners (so the checks grow with the number of pictures, not of pairs);
and a geometric check that accepts a pair only when enough keypoints agree on one affine map (a crop, a
rescale, a mild change of aspect). Measured by `tools/crop_recall.py`; the numbers are in the README
("Near-duplicates").

Only pairs within one class count (`data._build`, `data._outside`): across classes the matches found on the
report's data were mostly shared screen furniture (Pokémon GO's CP arc, name and HP bars around different
figures): 19% of rough copies also matched a picture of another class, and such matches chained 239 pictures
of dozens of classes into one group. The pHash still joins one picture filed under two classes.

Changing a constant below changes which pairs match, hence splits: bump MATCHER then, which the identity of
a study grouped with the crop matcher records (so a stored one is refused, not resumed on other splits).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np
from PIL import Image

MATCHER = 2  # 2: each picture's TOP candidates, pairs within one class
SIZE = 256  # features are taken on the grey picture scaled to this longest side (PokemonData: 128 px)
FEATURES = 500  # ORB keypoints per picture at most
TABLES = 16  # hash tables over descriptor bits
KEY_BITS = (16, 64)  # a bucket's key is 16 random bits, extended up to 64 until it holds at most BUCKET
BUCKET = 16
MAX_DISTANCE = 24  # descriptor pairs closer than this (of 256 bits) vote; true matches: median 13
MIN_VOTES = 3  # descriptor pairs that a candidate image pair needs before it is checked
TOP = 8  # each picture's strongest candidates that are checked (`strongest`)
RATIO = 0.75  # Lowe's ratio test on the candidate pair's own best two matches
REPROJECTION = 4.0  # pixels at SIZE
MIN_INLIERS = 10  # keypoints that must agree on one affine map; across classes that is not enough (see above)
CHUNK = 500  # candidate pairs a thread checks at a time (and between progress lines)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Rule:
    """How images are grouped: pHash within `bits` of 64 (0: exact bytes only), plus the crop matcher."""

    bits: int
    crops: bool = False

    @property
    def value(self) -> int | str:
        """The rule as a spec or `--near-duplicates` gives it, and as the study identity records it."""
        return f"{self.bits}+crops" if self.crops else self.bits


def parse_rule(value: int | str) -> Rule:
    """`10` (pHash within 10 bits), `10+crops` (and the crop matcher) or `0` (exact bytes only)."""
    m = re.fullmatch(r"\s*(\d+)\s*(\+\s*crops)?\s*", str(value))
    if isinstance(value, bool) or m is None or not 0 <= int(m[1]) <= 32:
        from pokestudy import UserError

        raise UserError(f"near-duplicates {value} is out of range; use BITS or BITS+crops with BITS 0..32 of 64 "
                        "(0: exact bytes only; 10 finds 98% of gently re-encoded copies; +crops adds tight crops, "
                        "borders and new backgrounds)")
    return Rule(int(m[1]), m[2] is not None)


def features(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """ORB keypoints (K x 2, float16, at SIZE) and descriptors (K x 32, uint8) of a decoded picture."""
    grey = np.asarray(img.convert("L"))
    scale = SIZE / max(grey.shape)
    size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
    grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    orb = cv2.ORB_create(nfeatures=FEATURES, edgeThreshold=15, patchSize=15, fastThreshold=10)
    points, desc = orb.detectAndCompute(grey, None)
    if desc is None:
        return np.zeros((0, 2), np.float16), np.zeros((0, 32), np.uint8)
    return cv2.KeyPoint_convert(points).astype(np.float16).reshape(-1, 2), desc


@dataclass
class Features:
    """Every picture's keypoints and descriptors, concatenated; picture i owns rows offsets[i]:offsets[i+1]."""

    points: np.ndarray  # M x 2 float16
    descriptors: np.ndarray  # M x 32 uint8
    offsets: np.ndarray  # N + 1 int64

    @classmethod
    def stack(cls, per_image: list[tuple[np.ndarray, np.ndarray]]) -> "Features":
        counts = [len(d) for _, d in per_image]
        return cls(np.concatenate([p for p, _ in per_image] or [np.zeros((0, 2), np.float16)]),
                   np.concatenate([d for _, d in per_image] or [np.zeros((0, 32), np.uint8)]),
                   np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def of(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.points[a:b].astype(np.float32), self.descriptors[a:b]

    def owners(self) -> np.ndarray:
        return np.repeat(np.arange(len(self)), np.diff(self.offsets))


def matches(feats: Features, side: np.ndarray | None = None, progress: Progress | None = None) -> np.ndarray:
    """Verified pairs (P x 2, i < j) of pictures that show one picture; with `side` (0/1 per picture)
    only pairs across the two sides are looked for (an outside set against the training data). The checks
    run on `workers()` threads: OpenCV releases the GIL, and each check is independent and deterministic."""
    candidates = candidate_pairs(feats, side, progress)
    chunks = [candidates[k:k + CHUNK] for k in range(0, len(candidates), CHUNK)]
    keep = []
    with ThreadPoolExecutor(workers()) as pool:
        for n, ok in enumerate(pool.map(lambda pairs: _verified(feats, pairs), chunks)):
            if progress:
                progress(f"near-duplicates: checked {min((n + 1) * CHUNK, len(candidates)):,} of "
                         f"{len(candidates):,} candidate pairs")
            keep.append(chunks[n][ok])
    return np.concatenate(keep or [np.zeros((0, 2), np.int64)]).astype(np.int64).reshape(-1, 2)


def _verified(feats: Features, pairs: np.ndarray) -> np.ndarray:
    """Which of `pairs` pass the geometric check."""
    return np.array([inliers(feats.of(int(i)), feats.of(int(j))) >= MIN_INLIERS for i, j in pairs], bool)


def workers() -> int:
    """Threads for decoding and matching: the cores this process may use (the issue's budget is 2 cores)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def candidate_pairs(feats: Features, side: np.ndarray | None = None, progress: Progress | None = None) -> np.ndarray:
    """The pairs the geometric check sees: those with at least MIN_VOTES close descriptor pairs in which one
    picture is among the other's TOP strongest partners.

    Votes alone do not tell: the ORB descriptors of drawings on white are alike, so nearly every pair of
    pictures shares a few close ones (of 600 PokemonData pictures × 90 rough copies, 96% of all pairs had
    3 votes), and checking them all grew with the square of the pictures (17 minutes for 600 on a loaded
    machine). A close descriptor pair is weighted by how rare its two descriptors are (1 / √(c_a · c_b),
    c the descriptor's close partners: a generic corner near hundreds counts little), a picture pair's
    strength is its weights' sum over √ of both pictures' total strengths (a picture close to everything
    ranks no one high), and each picture keeps its TOP strongest. Of 2,495 pictures and 150 rough copies,
    this kept the copy's original for 90% / 94% / 100% of 40-50% / 50-70% / 70-90% crops, where all pairs
    with 3 votes held 94% / 96% / 100%, with 20,000 candidates instead of 284,000."""
    a, b = close_descriptors(feats, side, progress)
    if progress:
        progress(f"near-duplicates: ranking the pictures that {len(a):,} close keypoint pairs join")
    owner, n = feats.owners(), len(feats)
    ia, ib = owner[a], owner[b]
    partners = (np.bincount(a, minlength=len(feats.descriptors))
                + np.bincount(b, minlength=len(feats.descriptors))).astype(np.float64)
    images, which, votes = np.unique(np.minimum(ia, ib) * n + np.maximum(ia, ib), return_inverse=True,
                                     return_counts=True)
    weight = np.bincount(which, weights=1 / np.sqrt(partners[a] * partners[b]), minlength=len(images))
    keep = votes >= MIN_VOTES
    i, j, weight = images[keep] // n, images[keep] % n, weight[keep]
    total = np.bincount(np.r_[i, j], weights=np.r_[weight, weight], minlength=n)
    strength = weight / np.sqrt(total[i] * total[j])
    if side is None:  # a pair is checked when either picture ranks the other among its TOP
        chosen = np.unique(strongest(np.r_[i, j], np.r_[strength, strength], TOP) % max(len(i), 1))
    else:  # an outside picture (side 1) against the data (side 0): its own TOP only
        chosen = np.sort(strongest(np.where(side[j] == 1, j, i), strength, TOP))
    return np.stack([i[chosen], j[chosen]], axis=1)


def strongest(owner: np.ndarray, strength: np.ndarray, k: int) -> np.ndarray:
    """Positions of each owner's `k` largest strengths (ties: the earlier position first). Only entries at or
    above `_floor` are ranked: sorting all of them (millions) was most of the ranking's time."""
    keep = np.flatnonzero(strength >= _floor(owner, strength, k))
    order = keep[np.lexsort((-strength[keep], owner[keep]))]
    ranked = owner[order]
    rank = np.arange(len(order)) - np.searchsorted(ranked, ranked, side="left")
    return order[rank < k]


def _floor(owner: np.ndarray, strength: np.ndarray, k: int) -> np.ndarray:
    """For each entry, a strength at most its owner's k-th largest, without sorting: the entries fall into k
    classes by position, and each class's largest of an owner is another entry, so the least of the k
    largest is at most the k-th largest (-inf where a class has none of the owner's entries)."""
    size = int(owner.max()) + 1 if len(owner) else 0
    floor = np.full(size, np.inf)
    for c in range(k):
        best = np.full(size, -np.inf)
        np.maximum.at(best, owner[c::k], strength[c::k])
        floor = np.minimum(floor, best)
    return floor[owner]


def close_descriptors(feats: Features, side: np.ndarray | None = None,
                      progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Distinct pairs of descriptors of different pictures that share a hash bucket and lie within
    MAX_DISTANCE bits. Each table keys descriptors by random bits; a bucket with more than BUCKET
    descriptors is split by more bits, so every bucket stays small and the work grows linearly with
    the number of descriptors, not with the number of image pairs. The tables are independent and
    NumPy releases the GIL on large arrays, so they are hashed on `workers()` threads."""
    desc, owner, n = np.ascontiguousarray(feats.descriptors), feats.owners(), len(feats.descriptors)
    rng = np.random.default_rng(0)
    keys = [rng.choice(256, KEY_BITS[1], replace=False) for _ in range(TABLES)]
    found = []
    with ThreadPoolExecutor(workers()) as pool:
        for t, codes in enumerate(pool.map(lambda key: _close_in_table(desc, owner, side, key), keys)):
            if progress:
                progress(f"near-duplicates: hashed {n:,} keypoints, table {t + 1} of {TABLES}")
            found.append(codes)
    pairs = distinct(np.concatenate(found or [np.zeros(0, np.int64)]))
    return pairs // n, pairs % n


def _close_in_table(desc: np.ndarray, owner: np.ndarray, side: np.ndarray | None,
                    positions: np.ndarray) -> np.ndarray:
    """The close pairs (a * n + b, a < b) that share a bucket of the table keyed by `positions`. Sorted by key,
    a bucket's members lie side by side, so its pairs are the descriptors `gap` = 1..BUCKET-1 places apart
    within one bucket: each gap is a few passes over shifted copies of the sorted descriptor words, in memory
    order (gathering each pair's words was most of the time)."""
    order, buckets = _buckets(desc, positions)
    words = np.take(desc.view(np.uint64), order, axis=0).T.copy()  # 4 x n: each word contiguous
    who, room = owner[order], _room(buckets, len(desc))
    found = []
    for gap in range(1, BUCKET):
        quarter = np.bitwise_count(words[0, :-gap] ^ words[0, gap:])
        distance = quarter + np.bitwise_count(words[1:, :-gap] ^ words[1:, gap:]).sum(0, dtype=np.int16)
        # the quarter's own limit is part of what a close pair is (it was a cheap first pass)
        a = np.flatnonzero((quarter <= MAX_DISTANCE // 2) & (distance <= MAX_DISTANCE) & (room[:-gap] >= gap))
        b = a + gap
        ok = who[a] != who[b]
        if side is not None:
            ok &= side[who[a]] != side[who[b]]
        a, b = order[a[ok]], order[b[ok]]
        found.append(np.minimum(a, b) * len(desc) + np.maximum(a, b))
    return np.concatenate(found)


def _room(buckets: np.ndarray, n: int) -> np.ndarray:
    """For each sorted position, how many of its bucket's members follow it (0 outside every bucket)."""
    start, size = buckets[:, 0], buckets[:, 1]
    ahead = np.arange(size.sum()) - np.repeat(np.cumsum(size) - size, size)  # place within its bucket
    room = np.zeros(n, np.int64)
    room[np.repeat(start, size) + ahead] = np.repeat(size, size) - 1 - ahead
    return room


def distinct(values: np.ndarray) -> np.ndarray:
    """`np.unique` of an integer array by sorting: NumPy 2's hash-based unique is many times slower on
    millions of distinct values (numpy/numpy#31969; 15 of the matcher's 29 s on 800 pictures)."""
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]][:len(values)]]


def _buckets(desc: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors sorted by their key (`_keys`) and the buckets as (start, size) rows: each the shortest
    key prefix of KEY_BITS[0]..[1] bits that holds at most BUCKET."""
    key = _keys(desc, positions)
    order = np.argsort(key, kind="stable")
    key = key[order]
    rows, left = [], np.arange(len(key))  # positions not yet in a small enough bucket: whole runs, in order
    for bits in range(KEY_BITS[0], KEY_BITS[1] + 1):
        prefix = key[left] >> np.uint64(KEY_BITS[1] - bits)
        run_start = np.flatnonzero(np.r_[True, prefix[1:] != prefix[:-1]])
        run_size = np.diff(np.r_[run_start, len(prefix)])
        small = run_size <= BUCKET
        rows.append(np.stack([left[run_start[small]], run_size[small]], axis=1))
        left = left[np.repeat(~small, run_size)]
        if not len(left):
            break
    return order, np.concatenate(rows)


def _keys(desc: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Each descriptor's bits at `positions` (of 256; at most 64) as one integer, the first most significant.
    A table per descriptor byte maps its value to the key bits it sets: one look-up per byte, not one
    pass over all descriptors per bit (4 times faster)."""
    table = np.zeros((desc.shape[1], 256), np.uint64)
    value = np.arange(256)
    for rank, p in enumerate(positions):
        bit = ((value >> (7 - (p & 7))) & 1).astype(np.uint64)
        table[p >> 3] |= bit << np.uint64(len(positions) - 1 - rank)
    key = np.zeros(len(desc), np.uint64)
    for byte in np.unique(positions >> 3):
        key |= table[byte][desc[:, byte]]
    return key


def inliers(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> int:
    """Keypoints of `a` whose best match in `b` passes the ratio test and agrees with one affine map
    that is a plausible crop and rescale (scales 0.2..5, aspect change under 2.5, no mirror)."""
    (pa, da), (pb, db) = a, b
    if len(da) < 3 or len(db) < 3:
        return 0
    # the two nearest in b of each descriptor of a, as BFMatcher.knnMatch finds them, without a Python object each
    distance, nearest = cv2.batchDistance(da, db, cv2.CV_32S, normType=cv2.NORM_HAMMING, K=2)
    good = np.flatnonzero(distance[:, 0] < RATIO * distance[:, 1])
    if len(good) < MIN_INLIERS:
        return 0
    src, dst = pa[good], pb[nearest[good, 0]]
    affine, inlier = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=REPROJECTION)
    if affine is None or inlier is None:
        return 0
    big, small = np.linalg.svd(affine[:, :2], compute_uv=False)
    if not (small > 0.2 and big < 5 and big / small < 2.5 and np.linalg.det(affine[:, :2]) > 0):
        return 0
    return int(inlier.sum())
