"""The official CIFAR-10 "python version" layout: read it.

Layout (the format torchvision and mmcls download): ``cifar-10-batches-py/`` with
``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta``, each a
pickled dict (bytes keys, written by Python 2). ``b"data"`` is uint8 [N, 3072]:
per row the 1024 red, then green, then blue values of a 32x32 image, row-major.
``b"labels"`` is a list of ints; ``batches.meta`` holds ``b"label_names"``.
The tarball ``cifar-10-python.tar.gz`` holds that folder.

The batches are pickles, so reading them could run code. We unpickle with an
allow-list that admits only what the real files contain (dicts, lists, bytes and
numpy arrays).
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from ..errors import DataError

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
BATCHES_DIR = "cifar-10-batches-py"
TARBALL_NAME = "cifar-10-python.tar.gz"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
META_FILE = "batches.meta"
SPLIT_FILES = {"train": TRAIN_FILES, "test": TEST_FILES}

# numpy's pickle helpers, under both the numpy 1.x and 2.x module names.
_ALLOWED_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy", "numpy.core.numeric",
                   "numpy._core.numeric")
    for name in ("_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer")
} | {("_codecs", "encode")}  # how protocol-2 pickles written by Python 3 store bytes


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR batch file")


def _load_pickle(data: bytes, source: str) -> dict:
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:
        raise DataError(f"cannot read CIFAR batch {source}: {exc}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"cannot read CIFAR batch {source}: expected a pickled dict, got {type(obj).__name__}")
    # Python 2 pickles give bytes keys; files re-saved by Python 3 tools give str keys.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _batch_arrays(batch: dict, source: str) -> tuple[np.ndarray, np.ndarray]:
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"CIFAR batch {source} has keys {sorted(batch)}; expected 'data' and 'labels'")
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"CIFAR batch {source}: 'data' has shape {data.shape}; expected [N, 3072]")
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if len(labels) != len(data):
        raise DataError(f"CIFAR batch {source}: {len(data)} images but {len(labels)} labels")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # -> N, H, W, C
    return np.ascontiguousarray(images), labels


def _label_names(meta: dict | None) -> list[str]:
    if meta and "label_names" in meta:
        return [n.decode() if isinstance(n, bytes) else str(n) for n in meta["label_names"]]
    return list(CIFAR10_CLASSES)


def _require_every_batch(present, where: str) -> None:
    """A copy that lost batch files (an interrupted download or extraction) would train on part of the data."""
    missing = [name for name in TRAIN_FILES + TEST_FILES if name not in present]
    if missing:
        raise DataError(
            f"CIFAR-10 {where} is incomplete: {', '.join(missing)} missing (a complete copy holds "
            f"{TRAIN_FILES[0]} .. {TRAIN_FILES[-1]} and {TEST_FILES[0]}); download or extract it again"
        )


def read_batches_folder(folder: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """{split: (images uint8 [N,32,32,3], labels int64 [N])}, label names, from an extracted folder."""
    _require_every_batch({p.name for p in folder.iterdir() if p.is_file()}, f"folder {folder}")
    splits = {}
    for split, names in SPLIT_FILES.items():
        parts = [_batch_arrays(_load_pickle((folder / n).read_bytes(), str(folder / n)), str(folder / n))
                 for n in names]
        splits[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    meta_path = folder / META_FILE
    meta = _load_pickle(meta_path.read_bytes(), str(meta_path)) if meta_path.is_file() else None
    return splits, _label_names(meta)


def read_tarball(path: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """Same as read_batches_folder, straight from cifar-10-python.tar.gz (no extraction)."""
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and (base in TRAIN_FILES or base in TEST_FILES or base == META_FILE):
                    members[base] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"cannot read CIFAR-10 tarball {path}: {exc}") from exc
    _require_every_batch(members, f"archive {path}")
    splits = {}
    for split, names in SPLIT_FILES.items():
        parts = [_batch_arrays(_load_pickle(members[n], f"{path}:{n}"), f"{path}:{n}") for n in names]
        splits[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    meta = _load_pickle(members[META_FILE], f"{path}:{META_FILE}") if META_FILE in members else None
    return splits, _label_names(meta)
