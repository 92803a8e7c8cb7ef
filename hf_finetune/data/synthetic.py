"""Synthetic CIFAR-shaped data: an offline dataset, and tiny copies in every local format.

The images are learnable on purpose: each class has its own colour and stripe
orientation, blurred by per-image noise, brightness and stripe phase, so a
smoke training run reaches clearly-above-chance accuracy in a few hundred steps.
Every writer emits the SAME images and labels for the same (n, seed, split), so
tests can check that all sources agree.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from functools import lru_cache
from pathlib import Path

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

def _split_arrays(n_train: int, n_test: int, seed: int):
    return {"train": synthetic_arrays(n_train, seed, "train"), "test": synthetic_arrays(n_test, seed, "test")}


def _batch_folder_files(n_train: int, n_test: int, seed: int) -> dict[str, bytes]:
    arrays = _split_arrays(n_train, n_test, seed)
    files = {**cifar.batch_files(*arrays["train"], train=True), **cifar.batch_files(*arrays["test"], train=False)}
    files[cifar.META_FILE] = cifar.meta_file()
    return files


def write_cifar10_batches(root, n_train: int = 50, n_test: int = 10, seed: int = 0) -> Path:
    """root/cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta). Returns that folder."""
    folder = Path(root) / cifar.BATCHES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in _batch_folder_files(n_train, n_test, seed).items():
        (folder / name).write_bytes(data)
    return folder


def write_cifar10_tarball(root, n_train: int = 50, n_test: int = 10, seed: int = 0) -> Path:
    """root/cifar-10-python.tar.gz holding cifar-10-batches-py/. Returns the tarball path."""
    path = Path(root) / cifar.TARBALL_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in _batch_folder_files(n_train, n_test, seed).items():
            info = tarfile.TarInfo(f"{cifar.BATCHES_DIR}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_imagefolder(root, n_train: int = 50, n_test: int = 10, seed: int = 0, *, split_dirs: bool = True) -> Path:
    """PNG files root/<split>/<class>/<index>.png (or root/<class>/<index>.png for the train
    split alone when split_dirs is False). Returns root."""
    root = Path(root)
    for split, (images, labels) in _split_arrays(n_train, n_test, seed).items():
        if not split_dirs and split != "train":
            continue
        base = root / split if split_dirs else root
        for name in CIFAR10_CLASSES:
            (base / name).mkdir(parents=True, exist_ok=True)
        for i, (img, lab) in enumerate(zip(images, labels)):
            (base / CIFAR10_CLASSES[lab] / f"{i:05d}.png").write_bytes(encode_png(img))
    return root


def write_save_to_disk(root, n_train: int = 50, n_test: int = 10, seed: int = 0) -> Path:
    """A datasets.DatasetDict (train/test; "img" PNG Image, "label" ClassLabel, like uoft-cs/cifar10)
    written with save_to_disk to root. Returns root."""
    import datasets

    arrays = _split_arrays(n_train, n_test, seed)
    dd = datasets.DatasetDict({split: _to_dataset(*arrays[split]) for split in ("train", "test")})
    dd.save_to_disk(str(root))
    return Path(root)
