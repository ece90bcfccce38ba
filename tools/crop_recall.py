"""How many rough copies each near-duplicate method finds, and how often it matches different pictures.

    .venv/bin/python tools/crop_recall.py --data ../shared/data/PokemonData [--copies 300] [--json]

Copies are made from random pictures of the data as another collection would re-use them: a random
crop of 40-50%, 50-70% or 70-90% of the frame's width and height (each drawn apart) at a random
offset, rescaled to 128 x 128, re-encoded as JPEG (quality 60-90); a third of them also get a
coloured border and a third a new background colour (near-white pixels repainted). Each copy is
looked for in the whole data set, as grouping would: found when the method joins it to its original;
a false match when it joins it to a picture of another class that is not its original's group. The
cross-class rate on the data itself counts every pair of pictures of two classes that a method joins
(one picture filed under two classes is a true match there, so this is an upper bound).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pokestudy.data import hamming, load, merge_groups, near, phash_pairs, sources  # noqa: E402
from pokestudy.data.images import on_white, open_raster, perceptual_hash  # noqa: E402

BANDS = ((0.4, 0.5), (0.5, 0.7), (0.7, 0.9))
PHASH_BITS = 10


def rough_copy(img: Image.Image, band: tuple[float, float], rng: np.random.Generator) -> Image.Image:
    """One rough copy of `img` (see the module docstring)."""
    pixels = np.asarray(on_white(img)).copy()
    kind = rng.integers(3)  # 0 plain, 1 border, 2 new background
    if kind == 2:
        pixels[(pixels > 235).all(axis=2)] = rng.integers(0, 256, 3)
    h, w = pixels.shape[:2]
    cw, ch = (max(1, round(rng.uniform(*band) * s)) for s in (w, h))
    x, y = rng.integers(w - cw + 1), rng.integers(h - ch + 1)
    out = Image.fromarray(pixels[y:y + ch, x:x + cw]).resize((128, 128), Image.Resampling.BILINEAR)
    if kind == 1:
        pad = int(rng.integers(4, 20))
        framed = Image.new("RGB", (128 + 2 * pad, 128 + 2 * pad), tuple(int(c) for c in rng.integers(0, 256, 3)))
        framed.paste(out, (pad, pad))
        out = framed.resize((128, 128), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=int(rng.integers(60, 91)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a folder in the ImageFolder layout")
    p.add_argument("--copies", type=int, default=300, help="copies, spread evenly over the crop bands")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    started = time.time()
    ds = load(args.data, 64)  # the cache holds every picture's pHash, local features and crop matches
    loaded = time.time() - started
    rng = np.random.default_rng(args.seed)
    root = Path(args.data).expanduser().resolve()
    picks = rng.choice(len(ds.paths), args.copies, replace=False)
    copies, feats = [], []
    for n, i in enumerate(picks):
        copy = rough_copy(open_raster((root / ds.paths[i]).read_bytes()), BANDS[n % len(BANDS)], rng)
        copies.append(perceptual_hash(copy))
        feats.append(near.features(copy))
    train = ds.features()
    added = near.Features.stack(feats)
    both = near.Features(np.concatenate([train.points, added.points]),
                         np.concatenate([train.descriptors, added.descriptors]),
                         np.concatenate([train.offsets, train.offsets[-1] + added.offsets[1:]]))
    side = np.r_[np.zeros(len(train), np.int64), np.ones(len(added), np.int64)]
    t = time.time()
    crop_found = near.matches(both, side, progress=sources.progress)
    match_s = time.time() - t
    sources.progress("")
    by_copy: dict[int, set[int]] = {}
    for i, j in crop_found.tolist():  # i: a picture of the data, j: a copy
        by_copy.setdefault(j - len(train), set()).add(i)
    close = hamming(torch.from_numpy(np.stack(copies)), ds.phashes) <= PHASH_BITS
    # A copy joined to its original's group (pHash and crops together, as grouping uses them) is no false match.
    groups = merge_groups(merge_groups(ds.groups, phash_pairs(ds.phashes, PHASH_BITS)), ds.crop_pairs)
    rows = []
    for method in ("phash", "crops", "phash+crops"):
        for b, band in enumerate(BANDS):
            found = false = 0
            for n in range(b, args.copies, len(BANDS)):
                i = int(picks[n])
                hits = set()
                if method != "crops":
                    hits |= set(torch.nonzero(close[n]).flatten().tolist())
                if method != "phash":
                    hits |= by_copy.get(n, set())
                found += i in hits
                false += any(int(ds.labels[h]) != int(ds.labels[i]) and groups[h] != groups[i] for h in hits)
            total = len(range(b, args.copies, len(BANDS)))
            rows.append({"method": method, "crop": f"{band[0]:.0%}-{band[1]:.0%}", "copies": total,
                         "recall": found / total, "false_matches": false})
    labels = ds.labels
    cross_pairs = (len(labels) ** 2 - int((torch.bincount(labels) ** 2).sum())) // 2
    ph = phash_pairs(ds.phashes, PHASH_BITS)
    ph = ph[ph[:, 0] < ph[:, 1]]
    on_data = {"phash": int((labels[ph[:, 0]] != labels[ph[:, 1]]).sum()),
               "crops": int((labels[ds.crop_pairs[:, 0]] != labels[ds.crop_pairs[:, 1]]).sum())}
    result = {"data": str(root), "images": len(labels), "cross_class_pairs": cross_pairs,
              "cross_class_matches_on_the_data": on_data, "copies": rows,
              "seconds": {"load": round(loaded, 1), "match_copies": round(match_s, 1)}}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{len(labels):,} pictures, {args.copies} rough copies ({time.time() - started:.0f} s)\n")
    print("| method | " + " | ".join(f"recall, crop {r['crop']}" for r in rows[:3]) + " | copies falsely matched |")
    print("|---|" + "---|" * 4)
    for m in range(3):
        part = rows[3 * m:3 * m + 3]
        print(f"| {part[0]['method']} | " + " | ".join(f"{r['recall']:.0%}" for r in part)
              + f" | {sum(r['false_matches'] for r in part)} of {args.copies} |")
    print(f"\ncross-class pairs of the data joined: pHash <= {PHASH_BITS} bits {on_data['phash']}, "
          f"crop matcher {on_data['crops']}, of {cross_pairs:,}")


if __name__ == "__main__":
    main()
