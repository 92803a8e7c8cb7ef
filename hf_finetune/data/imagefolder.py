"""An image folder indexed by path: <root>/<class>/**/<image>, or <root>/<split>/<class>/**/<image>.

The index is one Arrow file per split holding each image's absolute path (a ``datasets``
``Image`` value without bytes), its class and a split key; the batch transform reads a
file when a batch needs it. Building it lists folders with ``os.scandir`` and stats each
image (no file is opened), one directory in memory at a time, rows streamed into the
Arrow writer. What counts as an image follows ``load_dataset("imagefolder")``: the
extension, any case; names starting with "." or "__" (hidden files, ``__MACOSX``) are
skipped. Class folders may nest subfolders (as torchvision's and mmpretrain's folders)
and be symlinks; a link that leads back to a folder above it is an error.

Hand-written because ``load_dataset("imagefolder")`` globs and stats every file through
fsspec, one call each (its first batch on 20k photos took 30 s, ours under 1 s:
benchmarks/own_data_scale.py), and labels by the immediate parent folder only.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

from ..errors import DataError

logger = logging.getLogger(__name__)

# What counts as an image: load_dataset("imagefolder")'s extensions (the formats Pillow opens).
IMAGE_EXTENSIONS = frozenset(ImageFolder.EXTENSIONS)
ACCEPTED_IMAGES = ('.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp and the other extensions '
                   'load_dataset("imagefolder") reads')
# Split folder names (any case); "validation" is "val".
SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
WHOLE = "all"  # the split name of every image of a folder without split folders
_ROWS_PER_WRITE = 8192
_KEY_SALT = b"hf_finetune-val_split"  # the fixed seed of the stratified split


def _skipped(name: str) -> bool:
    return name.startswith((".", "__"))


def _entries(folder: str) -> list[os.DirEntry]:
    """One folder's entries, sorted by name (a deterministic order on any file system)."""
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not _skipped(e.name)), key=lambda e: e.name)
    except PermissionError:
        raise DataError(f"cannot list the folder {folder}: permission denied (the image folder's folders must be "
                        f"readable)") from None
    except OSError as exc:
        raise DataError(f"cannot list the folder {folder}: {exc.strerror or exc}") from None


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(f"{entry.path} is a symlink loop (a link that points to itself); remove it") from None
        raise DataError(f"cannot read {entry.path}: {exc.strerror or exc}") from None


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def images_under(folder: str, ancestors: frozenset = frozenset()):
    """(path, size, mtime_ns) of every image under folder, recursively, in name order.

    Symlinked folders are followed; one that leads back to a folder above it is a
    DataError (walking it would never end). Only one folder's entries are in memory.
    """
    ancestors = ancestors | {_identity(folder)}
    for entry in _entries(folder):
        if _is_dir(entry):
            if _identity(entry.path) in ancestors:
                raise DataError(f"symlink loop: {entry.path} leads back to a folder above it "
                                f"({os.path.realpath(entry.path)}); remove or fix the link")
            yield from images_under(entry.path, ancestors)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
            try:
                st = entry.stat()
            except OSError as exc:
                what = "a symlink loop" if exc.errno == errno.ELOOP else (
                    "a broken link" if entry.is_symlink() else exc.strerror or str(exc))
                raise DataError(f"image {entry.path} cannot be indexed: {what}; fix or remove it") from None
            yield entry.path, st.st_size, st.st_mtime_ns


def _above(root: Path, folder: Path) -> frozenset:
    """The folders above a class folder, which a link inside it must not lead back to."""
    return frozenset({_identity(str(root)), _identity(str(folder))})


def _subfolders(folder: Path) -> list[os.DirEntry]:
    return [e for e in _entries(str(folder)) if _is_dir(e)]


def layout(root: Path) -> dict[str, Path]:
    """{split: folder of class folders}: the split folders when root has a train, val, validation
    or test folder (then every subfolder is a split), else {"all": root}; {} when root has no subfolder."""
    folders = _subfolders(root)
    if not any(e.name.lower() in SPLIT_FOLDERS for e in folders):
        return {WHOLE: root} if folders else {}
    splits = {}
    for e in folders:
        split = SPLIT_FOLDERS.get(e.name.lower(), e.name)
        if split in splits:
            raise DataError(f"{root} has two folders for split {split!r}: {splits[split].name} and {e.name} "
                            f"(val and validation are one split); merge them")
        splits[split] = Path(e.path)
    return splits


def looks_like_image_folder(root: Path) -> bool:
    """root has class folders (or split folders of class folders), one of them with an image."""
    try:
        return any(any(True for _ in images_under(class_folder.path))
                   for folder in layout(root).values() for class_folder in _subfolders(folder))
    except DataError:
        return True  # a symlink loop, an unreadable folder ...: the index names it


def class_names(splits: dict[str, Path]) -> list[str]:
    """Every class folder name of every split, sorted: label i is the i-th."""
    return sorted({e.name for folder in splits.values() for e in _subfolders(folder)})


def fingerprint(root: Path, version: int) -> str:
    """A hash of every image's path, size and mtime (and of the layout): equal while nothing changed.

    Also the checks that need a look at every folder: a class folder with no image is a DataError.
    """
    digest = hashlib.sha256(f"{version}\0{root.resolve()}\n".encode())
    for split, folder in layout(root).items():
        loose, prefix, above = 0, len(str(folder)) + 1, _above(root, folder)
        for entry in _entries(str(folder)):
            if not _is_dir(entry):
                loose += os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
                continue
            digest.update(f"{split}\0{entry.name}\n".encode())
            count = 0
            for path, size, mtime in images_under(entry.path, above):
                digest.update(f"{path[prefix:]}\0{size}\0{mtime}\n".encode())
                count += 1
            if count == 0:
                raise DataError(f"class folder {entry.path} holds no image (accepted: files ending in "
                                f"{ACCEPTED_IMAGES}, any case, in it or its subfolders); "
                                f"add images or remove the folder")
        if loose:
            logger.warning("%d image(s) directly in %s are in no class folder: left out", loose, folder)
    return digest.hexdigest()[:16]


def _split_key(relative: str) -> int:
    """The stratified split's order within a class: a salted hash of the path below the split
    folder, so adding images to a class moves few of the others between train and val."""
    return int.from_bytes(hashlib.blake2b(relative.encode(), digest_size=8, key=_KEY_SALT).digest(), "little")


def features(classes: list[str]) -> datasets.Features:
    return datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=classes),
                              "key": datasets.Value("uint64")})


def write_index(root: Path, target: Path) -> list[str]:
    """target/<split>.arrow for every split of the folder at root; -> the split names."""
    splits = layout(root)
    classes = class_names(splits)
    feats = features(classes)
    image_type = feats["img"].pa_type
    for split, folder in splits.items():
        writer = ArrowWriter(features=feats, path=str(target / f"{split}.arrow"))
        paths, labels, keys = [], [], []

        def flush():
            if paths:
                images = pa.StructArray.from_arrays([pa.nulls(len(paths), pa.binary()), pa.array(paths, pa.string())],
                                                    fields=list(image_type))
                writer.write_table(pa.table({"img": images, "label": pa.array(labels, pa.int64()),
                                             "key": pa.array(keys, pa.uint64())}))
                paths.clear(), labels.clear(), keys.clear()

        prefix, above = len(str(folder)) + 1, _above(root, folder)
        for class_folder in _subfolders(folder):
            label = classes.index(class_folder.name)
            for path, _, _ in images_under(class_folder.path, above):
                paths.append(os.path.abspath(path))
                labels.append(label)
                keys.append(_split_key(path[prefix:]))
                if len(paths) >= _ROWS_PER_WRITE:
                    flush()
        flush()
        writer.finalize()
    return list(splits)


def stratified_split(ds: datasets.Dataset, val_split: float) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(train rows, val rows, labels of one-image classes): per class, round(n * val_split) images to val,
    at least 1 and at most n - 1 when the class has 2 or more (val_split > 0); a class of 1 trains only.

    Deterministic: each class's images in the order of their split key (a hash of the path)."""
    labels = ds.data.column("label").to_numpy()
    keys = ds.data.column("key").to_numpy()
    order = np.lexsort((keys, labels))
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    counts = np.diff(np.r_[starts, len(order)])
    take = np.where(counts >= 2, np.clip(np.rint(counts * val_split), 1, counts - 1), 0) if val_split > 0 \
        else np.zeros_like(counts)
    val = np.sort(np.concatenate([order[s:s + k] for s, k in zip(starts, take.astype(np.int64))] or [[]]))
    val = val.astype(np.int64)
    train = np.setdiff1d(np.arange(len(labels)), val)
    singles = [int(sorted_labels[s]) for s, n in zip(starts, counts) if n == 1]
    return train, val, singles
