"""Synthetic multi-label data: 32 px images holding one to three of five coloured shapes.

The label of an image is the set of shapes drawn on it, stored as Sequence(ClassLabel) (the common
Hub layout for multi-label data). Each shape has its own colour and form, placed at a random
position and size over a noisy background of random brightness, so a ResNet-18 learns it at
32 px in about a minute on a CPU. Deterministic in (num_samples, seed, split).
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np

from .synthetic import encode_png

SHAPES = ("square", "disc", "triangle", "bar", "cross")
IMAGE_SIZE = 32
MAX_SHAPES = 3
# One colour per shape (RGB).
_COLOURS = np.array([[230, 40, 40], [40, 200, 60], [50, 80, 240], [240, 220, 40], [210, 60, 220]], dtype=np.float32)


def _shape_mask(shape: int, cy: float, cx: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    if SHAPES[shape] == "square":
        return (np.abs(dy) <= radius) & (np.abs(dx) <= radius)
    if SHAPES[shape] == "disc":
        return dy ** 2 + dx ** 2 <= radius ** 2
    if SHAPES[shape] == "triangle":  # apex up: widens towards the base
        return (dy >= -radius) & (dy <= radius) & (np.abs(dx) <= (dy + radius) / 2)
    if SHAPES[shape] == "bar":
        return (np.abs(dy) <= radius / 3) & (np.abs(dx) <= radius * 1.3)
    return ((np.abs(dy) <= radius / 3) | (np.abs(dx) <= radius / 3)) & (np.abs(dy) <= radius) & (np.abs(dx) <= radius)


def synthetic_multilabel_arrays(num_samples: int, seed: int = 0, split: str = "train"):
    """Images uint8 [N, 32, 32, 3] and, per image, the sorted list of shape indices drawn on it."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), len(SHAPES)])
    images = np.empty((num_samples, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = []
    for index in range(num_samples):
        shapes = sorted(rng.choice(len(SHAPES), size=rng.integers(1, MAX_SHAPES + 1), replace=False).tolist())
        image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), rng.uniform(60, 160), dtype=np.float32)
        for shape in shapes:
            radius = rng.uniform(4, 7)
            cy, cx = rng.uniform(radius, IMAGE_SIZE - radius, size=2)
            image[_shape_mask(shape, cy, cx, radius)] = _COLOURS[shape]
        image += rng.normal(0.0, 15.0, image.shape).astype(np.float32)
        images[index] = np.clip(image, 0, 255).astype(np.uint8)
        labels.append(shapes)
    return images, labels


def synthetic_multilabel_features():
    import datasets

    labels = datasets.Sequence(datasets.ClassLabel(names=list(SHAPES)))
    return datasets.Features({"img": datasets.Image(), "label": labels})


@lru_cache(maxsize=8)
def _cached(num_samples: int, seed: int, split: str):
    import datasets

    images, labels = synthetic_multilabel_arrays(num_samples, seed, split)
    return datasets.Dataset.from_dict(
        {"img": [{"bytes": encode_png(image), "path": None} for image in images], "label": labels},
        features=synthetic_multilabel_features(),
    )


def synthetic_multilabel_dataset(num_samples: int, seed: int = 0, split: str = "train"):
    """In-memory datasets.Dataset: "img" (PNG Image feature) and "label" (Sequence(ClassLabel) of SHAPES)."""
    return _cached(int(num_samples), int(seed), str(split))


__all__ = ["SHAPES", "synthetic_multilabel_arrays", "synthetic_multilabel_dataset", "synthetic_multilabel_features"]
