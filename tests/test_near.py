"""The crop matcher's candidates: each picture's few strongest partners, so the geometric checks grow with
the number of pictures, and a rough copy's original is still among them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pokestudy.data import near
from pokestudy.data.images import open_raster

FIXTURES = Path(__file__).parent / "fixtures" / "pokemon"
pytestmark = pytest.mark.fast


def test_strongest_keeps_each_owners_k_largest_ties_first_come():
    owner = np.array([0, 1, 0, 0, 1, 2, 0])
    strength = np.array([0.5, 0.1, 0.9, 0.5, 0.3, 0.2, 0.1])
    assert sorted(near.strongest(owner, strength, 2).tolist()) == [0, 1, 2, 4, 5]


def test_candidates_stay_few_per_picture_and_keep_the_copies_originals():
    pictures = [open_raster(p.read_bytes()) for p in sorted(FIXTURES.rglob("*.jpg"))]
    rng = np.random.default_rng(0)
    copies = []
    for img in pictures:  # a crop to 50-60% of the frame at a random offset, rescaled
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.5, 0.6)), int(h * rng.uniform(0.5, 0.6))
        x, y = int(rng.integers(w - cw + 1)), int(rng.integers(h - ch + 1))
        copies.append(img.crop((x, y, x + cw, y + ch)).resize((128, 128), Image.Resampling.BILINEAR))
    feats = near.Features.stack([near.features(i) for i in pictures + copies])
    n = len(pictures)
    pairs = near.candidate_pairs(feats)
    assert len(pairs) <= near.TOP * len(feats)
    voted = np.unique(np.sort(feats.owners()[np.stack(near.close_descriptors(feats), 1)], 1), axis=0)
    assert len(voted) > len(pairs)  # the ranking dropped pairs that votes alone would have checked
    found = {(int(i), int(j)) for i, j in pairs}
    kept = sum((k, k + n) in found for k in range(n))
    assert kept >= n - 1  # (15 of 15 here): a copy shares its rarest corners with its original


def test_a_crop_match_across_classes_joins_no_group(tmp_path: Path):
    """Across classes the matcher mostly finds shared screen furniture around different figures, so only
    pairs within one class join a group; the same picture filed under a second class stays apart."""
    from pokestudy.data import prepare

    for d in sorted(FIXTURES.iterdir()):
        (tmp_path / d.name).mkdir()
        for f in sorted(d.iterdir()):
            (tmp_path / d.name / f.name).write_bytes(f.read_bytes())
    original = open_raster((FIXTURES / "Squirtle" / "00000029.jpg").read_bytes())
    w, h = original.size  # a crop to half the frame at an offset: another pHash, so only the crop matcher joins it
    box = (round(0.35 * w), round(0.15 * h), round(0.85 * w), round(0.65 * h))
    copy = original.crop(box).resize((128, 128), Image.Resampling.BILINEAR)
    copy.save(tmp_path / "Charmander" / "filed-twice.jpg", "JPEG", quality=80)
    groups = [set(g["paths"]) for g in prepare(str(tmp_path), 32).near_groups]
    assert not any("Charmander/filed-twice.jpg" in g for g in groups)  # in Squirtle it is grouped (test_data)


def test_strongest_ranks_only_above_its_floor_yet_agrees_with_ranking_all():
    """`strongest` skips entries below a floor that is at most each owner's k-th largest; ties included."""
    for seed in range(50):
        rng = np.random.default_rng(seed)
        owner = rng.integers(0, int(rng.integers(1, 20)), int(rng.integers(0, 300)))
        strength = rng.integers(0, 5, len(owner)).astype(float)
        k = int(rng.integers(1, 10))
        order = np.lexsort((-strength, owner))
        rank = np.arange(len(order)) - np.searchsorted(owner[order], owner[order], side="left")
        assert near.strongest(owner, strength, k).tolist() == order[rank < k].tolist()


def test_distinct_is_unique():
    values = np.random.default_rng(0).integers(0, 50, 200)
    assert near.distinct(values).tolist() == np.unique(values).tolist()
    assert near.distinct(np.zeros(0, np.int64)).tolist() == []
