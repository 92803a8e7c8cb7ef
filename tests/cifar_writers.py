"""Test fixtures: tiny CIFAR-10 copies in every local format, from the synthetic images.

Every writer emits the SAME images and labels for the same (n, seed, split), so tests can
check that all sources agree.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


from hf_finetune.data import cifar
from hf_finetune.data.synthetic import _to_dataset, encode_png, synthetic_arrays

CIFAR10_CLASSES = cifar.CIFAR10_CLASSES


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
