"""Test fixtures: tiny CIFAR-10 copies in every local format, from the synthetic images.

Every writer emits the SAME images and labels for the same (n, seed, split), so tests can
check that all sources agree.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from hf_finetune.data import cifar
from hf_finetune.data.synthetic import _to_dataset, encode_png, synthetic_arrays

CIFAR10_CLASSES = cifar.CIFAR10_CLASSES


def batch_files(images: np.ndarray, labels: np.ndarray, train: bool) -> dict[str, bytes]:
    """Pickled batch files (official layout) for images uint8 [N,32,32,3] and labels."""
    names = cifar.TRAIN_FILES if train else cifar.TEST_FILES
    out = {}
    for name, idx in zip(names, np.array_split(np.arange(len(images)), len(names))):
        rows = images[idx].transpose(0, 3, 1, 2).reshape(len(idx), -1)
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels[idx]],
                 b"data": np.ascontiguousarray(rows, dtype=np.uint8),
                 b"filenames": [f"{int(i):05d}.png".encode() for i in idx]}
        out[name] = pickle.dumps(batch, protocol=2)
    return out


def meta_file(label_names=CIFAR10_CLASSES) -> bytes:
    return pickle.dumps({b"num_cases_per_batch": 10000, b"num_vis": 3072,
                         b"label_names": [n.encode() for n in label_names]}, protocol=2)


def _split_arrays(n_train: int, n_test: int, seed: int):
    return {"train": synthetic_arrays(n_train, seed, "train"), "test": synthetic_arrays(n_test, seed, "test")}


def _batch_folder_files(n_train: int, n_test: int, seed: int) -> dict[str, bytes]:
    arrays = _split_arrays(n_train, n_test, seed)
    files = {**batch_files(*arrays["train"], train=True), **batch_files(*arrays["test"], train=False)}
    files[cifar.META_FILE] = meta_file()
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
