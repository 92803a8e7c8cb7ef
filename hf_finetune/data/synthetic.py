"""Synthetic CIFAR-shaped data: an offline dataset (the smoke recipe's SyntheticCIFAR10).

The images are learnable on purpose: each class has its own colour and stripe
orientation, blurred by per-image noise, brightness and stripe phase, so a
smoke training run reaches clearly-above-chance accuracy in a few hundred steps.
tests/cifar_writers.py writes the same images and labels in every local format.
"""

from __future__ import annotations

import struct
import zlib
from functools import lru_cache

import numpy as np

from . import cifar

CIFAR10_CLASSES = cifar.CIFAR10_CLASSES
IMAGE_SIZE = 32

# One clearly distinct colour per class (RGB).
_PALETTE = np.array([
    [220, 50, 50], [50, 180, 60], [50, 70, 220], [230, 220, 60], [200, 60, 210],
    [60, 210, 220], [240, 140, 30], [120, 70, 30], [160, 160, 160], [40, 40, 40],
], dtype=np.float32)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHUNK_SIZE = 1024  # images generated per numpy step (bounds float32 temporaries)


def synthetic_arrays(num_samples: int, seed: int = 0, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 32, 32, 3] and labels int64 [N], deterministic in (num_samples, seed, split)."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    labels = rng.permutation(np.arange(num_samples) % len(CIFAR10_CLASSES)).astype(np.int64)
    images = np.empty((num_samples, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    for start in range(0, num_samples, _CHUNK_SIZE):
        lab = labels[start:start + _CHUNK_SIZE]
        n = len(lab)
        angle = (lab * np.pi / len(CIFAR10_CLASSES)).astype(np.float32)[:, None, None]
        freq = (2 * np.pi * (2 + lab % 3) / IMAGE_SIZE).astype(np.float32)[:, None, None]
        phase = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
        stripes = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
        img = _PALETTE[lab][:, None, None, :] * (0.7 + 0.3 * stripes[..., None])
        img += rng.normal(0.0, 18.0, img.shape).astype(np.float32)
        img += rng.uniform(-30, 30, (n, 1, 1, 1)).astype(np.float32)
        images[start:start + n] = np.clip(img, 0, 255).astype(np.uint8)
    return images, labels


def encode_png(image: np.ndarray) -> bytes:
    """A plain 8-bit RGB PNG (no filtering) of an [H, W, 3] uint8 array; fast for tiny images."""
    h, w, _ = image.shape
    rows = np.zeros((h, 1 + w * 3), dtype=np.uint8)  # leading 0 = filter type "None"
    rows[:, 1:] = image.reshape(h, w * 3)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (_PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))


def _features():
    import datasets

    return datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(CIFAR10_CLASSES))})


def _to_dataset(images: np.ndarray, labels: np.ndarray):
    import datasets

    return datasets.Dataset.from_dict(
        {"img": [{"bytes": encode_png(a), "path": None} for a in images], "label": labels.tolist()},
        features=_features(),
    )


@lru_cache(maxsize=8)
def _synthetic_dataset_cached(num_samples: int, seed: int, split: str):
    return _to_dataset(*synthetic_arrays(num_samples, seed, split))


def synthetic_dataset(num_samples: int, seed: int = 0, split: str = "train"):
    """In-memory datasets.Dataset: "img" (PNG Image feature) and "label" (ClassLabel, CIFAR-10 names)."""
    return _synthetic_dataset_cached(int(num_samples), int(seed), str(split))


# ---------------------------------------------------------------- writers (tests, users)
