"""A user's own data functions, as a user's file would hold them: images in memory as NumPy arrays (or
torch, or PIL), and broken ones that the bad-input tests expect to be refused in one line."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

CLASSES = ["red", "green", "blue", "grey"]


def arrays() -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """4 classes × 12 noisy 40×40 images tinted by class, N×H×W×3 uint8, two images per group.
    MY_DATA_SHIFT (an integer) changes one pixel's value, for the fingerprint test."""
    rng = np.random.default_rng(0)
    tints = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [128, 128, 128]])
    labels = np.repeat(np.arange(len(CLASSES)), 12)
    images = np.clip(tints[labels][:, None, None, :] + rng.normal(0, 50, (len(labels), 40, 40, 3)), 0, 255)
    images = images.astype(np.uint8)
    images[0, 0, 0, 0] = int(os.environ.get("MY_DATA_SHIFT", images[0, 0, 0, 0]))
    return images, labels, CLASSES, np.arange(len(labels)) // 2


def channels_first() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The same images as a torch tensor N×3×H×W, without groups."""
    images, labels, classes, _ = arrays()
    return torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(labels), classes


def pictures() -> tuple[list[Image.Image], list[int], list[str]]:
    """The same images as PIL images of differing sizes and modes."""
    images, labels, classes, _ = arrays()
    return [Image.fromarray(x).resize((40 + i % 3 * 10, 40)).convert("RGBA" if i % 2 else "RGB")
            for i, x in enumerate(images)], labels.tolist(), classes


def floats() -> tuple[np.ndarray, np.ndarray, list[str]]:
    images, labels, classes, _ = arrays()
    return images.astype(np.float32) / 255, labels, classes


def grey() -> tuple[np.ndarray, np.ndarray, list[str]]:
    images, labels, classes, _ = arrays()
    return images[..., 0], labels, classes


def label_out_of_range() -> tuple[np.ndarray, np.ndarray, list[str]]:
    images, labels, classes, _ = arrays()
    return images, labels + 1, classes


def two_things() -> tuple[np.ndarray, np.ndarray]:
    images, labels, _, _ = arrays()
    return images, labels


def raises() -> None:
    raise FileNotFoundError("/data/mine.npz")
