"""Config -> datasets.DatasetDict with the batched pipeline set as each split's transform."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import datasets
import numpy as np

from ..errors import DataError, RecipeError
from ..recipe import is_int
from . import imagefolder
from .decode import decode_image
from .labels import check_columns, label_kind_fix, label_layout, num_label_classes
from .labels import label_names as feature_label_names
from .sources import ACCEPTED_FORMATS, SourceLoader, find_local_copy
from .streaming import StreamingSplit, streamed_split
from .transforms import ROW_COLUMN, BatchTransform

logger = logging.getLogger(__name__)

DEFAULT_SPLITS = {"train": "train", "val": "test", "test": "test"}
# Columns after building: every split names its images and labels alike, whatever the source.
IMAGE, LABEL = "img", "label"


def build_datasets(cfg, splits=None) -> datasets.DatasetDict:
    """The splits the config's train/val/test dataloaders name, transforms set.

    Splits whose dataloader section is null, or not in `splits` when given, are left out. Splits reading the same source
    share its (memory-mapped) data; each split is its own Dataset. The label column is a
    ClassLabel, so `label_names(dd)` reads the class names from the features.
    """
    loader = SourceLoader()
    held_out = _held_out(cfg)
    built, reference = {}, None if splits is None or "train" in splits else _training_classes(held_out)
    for split, section in cfg.dataloaders().items():
        if splits is None or split in splits:
            built[split] = _build_split(section.dataset, f"{split}_dataloader.dataset", DEFAULT_SPLITS[split],
                                        cfg.model, loader, held_out, reference)
            reference = reference or _class_names(built[split])
    return datasets.DatasetDict(built)


def preview_counts(cfg) -> list[str]:
    """'<split>: <counts> from <source>' for each split read from a local image folder (its index is
    built, or reused); other sources are counted when training loads them."""
    loader, held_out, lines = SourceLoader(), _held_out(cfg), []
    for split, section in cfg.dataloaders().items():
        dataset = section.dataset
        if getattr(dataset, "streaming", False):
            continue  # a stream is not read up front
        root = Path(dataset.data_root).expanduser() if getattr(dataset, "data_root", None) else None
        try:
            found = find_local_copy(root) if root else None
        except DataError:
            found = None  # not an image folder: training says what is wrong with it
        if found and found[0] == "imagefolder":
            key = f"{split}_dataloader.dataset"
            ds, source = _load_source(dataset, key, dataset.split or DEFAULT_SPLITS[split], loader, held_out)
            lines.append(f"{split}: {describe_counts(split_counts(ds, dataset.label_column))} from {source}")
    return lines


def _held_out(cfg) -> tuple[Path, float | None] | None:
    """(folder, val_split) when the training set comes from a local folder: an image folder there
    without val images is split, so no other split reads the training images. val_split None: the
    training split streams the whole folder (a stream is not split)."""
    dataset = cfg.train_dataloader.dataset if cfg.train_dataloader else None
    if dataset is None or not getattr(dataset, "data_root", None) or not hasattr(dataset, "val_split"):
        return None
    return Path(dataset.data_root).expanduser().resolve(), None if dataset.streaming else dataset.val_split


def _training_classes(held_out) -> list[str] | None:
    """The class folder names of the training image folder, when the training split is not built
    (--eval-only): a separate test folder's labels still follow them."""
    found = find_local_copy(held_out[0]) if held_out else None
    return imagefolder.class_names(imagefolder.layout(found[1])) if found and found[0] == "imagefolder" else None


def _class_names(ds) -> list[str] | None:
    feature = ds.features[LABEL]
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def split_counts(ds, label_column: str = LABEL) -> dict:
    """{"images": N, "classes": {name: N, ...}} of a single-label split ({"images": N} otherwise);
    a stream is not read up front, so only its declared images per epoch (or None) are known."""
    if isinstance(ds, StreamingSplit):
        return {"images": ds.num_samples, "streamed": True}
    feature = ds.features[label_column]
    if not isinstance(feature, datasets.ClassLabel):
        return {"images": len(ds)}
    names = feature.names
    counts = np.bincount(np.asarray(ds.with_format("arrow")[label_column].to_numpy()), minlength=len(names))
    return {"images": len(ds), "classes": {name: int(n) for name, n in zip(names, counts)}}


MAX_LISTED_CLASSES = 20  # more classes: the smallest and largest count only


def describe_counts(counts: dict) -> str:
    """'850 images, 2 classes (cat 400, dog 450)' for logs, the model card and --print-recipe."""
    if counts.get("streamed"):
        return f"streamed, {counts['images']:,} images per epoch" if counts["images"] else "streamed"
    text = f"{counts['images']:,} images"
    classes = counts.get("classes")
    if classes:
        text += f", {len(classes)} classes"
        if len(classes) <= MAX_LISTED_CLASSES:
            text += " (" + ", ".join(f"{name} {n:,}" for name, n in classes.items()) + ")"
        else:
            text += f" ({min(classes.values()):,} to {max(classes.values()):,} per class)"
    return text


def batch_transform(split) -> BatchTransform | None:
    """The BatchTransform a split of build_datasets builds its batches with."""
    if isinstance(split, StreamingSplit):
        return split.transform
    return split.format["format_kwargs"].get("transform")


def label_names(dataset_dict) -> list[str]:
    """Class names, index = label id (for the model's id2label)."""
    ds = dataset_dict["train"] if "train" in dataset_dict else next(iter(dataset_dict.values()))
    feature = ds.features[LABEL]
    return list((feature if isinstance(feature, datasets.ClassLabel) else feature.feature).names)


def _build_split(cfg, key: str, default_split: str, model, loader: SourceLoader, held_out=None,
                 reference: list[str] | None = None):
    """model: the recipe's model section (its num_classes, multi_label and their keys);
    reference: the class names of the split built first (train's): another split's classes
    are checked against them and its labels renumbered to match."""
    num_classes, multi_label, classes_key = model.num_classes, model.multi_label, model.key("num_classes")
    steps = [step.op for step in cfg.pipeline]
    split = cfg.split or default_split
    if cfg.type == "WebDataset" or getattr(cfg, "streaming", False):  # config.is_streamed
        return streamed_split(cfg, key, split, model, steps, (IMAGE, LABEL))
    ds, source = _load_source(cfg, key, split, loader, held_out)
    image_column = getattr(cfg, "image_column", IMAGE)
    label_column = getattr(cfg, "label_column", LABEL)
    names = check_columns(ds.features, image_column, label_column, source, key)
    if len(ds) == 0:
        raise DataError(f"{source} is empty (0 images); check {key}.split and the data")
    layout = label_layout(ds.features[label_column], label_column)
    if (layout != "single_label") != multi_label:
        raise DataError(
            f"{source}: the labels in column {label_column!r} are "
            f"{'one class per image' if layout == 'single_label' else 'several classes per image'} but "
            f"the model is {'multi' if multi_label else 'single'}-label; {label_kind_fix(model, not multi_label)}")
    if multi_label:
        ds, names = _class_lists(ds, label_column, layout, num_classes, classes_key, source)
        label_feature = datasets.Sequence(datasets.ClassLabel(names=names))
    else:
        if reference is not None and names is not None and names != reference:
            ds, names = _renumbered(ds, label_column, names, reference, source)
        names = _check_labels(ds, label_column, names, num_classes, classes_key, source)
        label_feature = datasets.ClassLabel(names=names)

    renames = {old: new for old, new in ((image_column, IMAGE), (label_column, LABEL)) if old != new}
    ds = ds.rename_columns(renames) if renames else ds
    ds = ds.cast_column(IMAGE, datasets.Image(decode=False))
    ds = ds.cast_column(LABEL, label_feature)
    ds = ds.add_column(ROW_COLUMN, np.arange(len(ds), dtype=np.int64))
    ds = _subset(ds, cfg.indices, f"{key}.indices", source)
    if cfg.on_corrupt == "skip" and not _reads_files(ds, IMAGE):
        ds = _drop_undecodable(ds, IMAGE, source)  # files are skipped as batches read them instead
    transform = BatchTransform(steps, image_column=IMAGE, label_column=LABEL, source=source,
                               on_corrupt=cfg.on_corrupt,
                               multi_label_classes=len(names) if multi_label else None, class_names=names)
    ds.set_transform(transform, columns=[IMAGE, LABEL, ROW_COLUMN])
    logger.info("%s: %s", key.split("_dataloader")[0], describe_counts(split_counts(ds)))
    return ds


def _load_source(cfg, key, split, loader: SourceLoader, held_out=None):
    """-> (raw Dataset, description); our own conversions name the columns img/label.
    held_out: _held_out(cfg), the folder the training set comes from and its val_split."""
    if cfg.type == "SyntheticCIFAR10":
        return loader.synthetic(cfg.num_samples, cfg.seed, split)
    if cfg.type == "SyntheticMultiLabel":
        return loader.synthetic_multilabel(cfg.num_samples, cfg.seed, split)
    if cfg.data_root:
        root = Path(cfg.data_root).expanduser()
        trains_here = held_out is not None and root.resolve() == held_out[0]
        local = loader.local(root, split, key, held_out[1] if trains_here else None,
                             whole=not (trains_here and held_out[1] is None))
        if local is not None:
            ds, description, converted = local
            return _renamed(ds, cfg) if converted else ds, description
        if not (cfg.download and cfg.hub_id):
            raise DataError(f"data root {root} ({key}.data_root) holds no dataset. It must hold one "
                            f"of: {ACCEPTED_FORMATS}")
    hint = (f"Point --data-root (or the recipe key {key}.data_root) at a local copy: {ACCEPTED_FORMATS}"
            + (f" (looked in {Path(cfg.data_root).expanduser()}, which does not exist)."
               if cfg.data_root else "."))
    # CIFAR-sized images are re-encoded once into our cache (decoding them is then a copy).
    reencode = (cfg.image_column, cfg.label_column) if cfg.type == "CIFAR10" else None
    ds, description, converted = loader.hub(cfg.hub_id, cfg.config_name, cfg.revision, split, key,
                                            hint, reencode_columns=reencode)
    return _renamed(ds, cfg) if converted else ds, description


def _renamed(ds, cfg):
    """Our conversions write img/label; the recipe's column names then refer to those."""
    renames = {old: new for old, new in ((IMAGE, cfg.image_column), (LABEL, cfg.label_column))
               if old != new and old in ds.column_names}
    return ds.rename_columns(renames) if renames else ds


def _class_lists(ds, label_column, layout, num_classes, classes_key, source):
    """Multi-label columns as class lists (multi-hot rows converted), every class in range;
    -> (dataset, class names)."""
    feature = ds.features[label_column]
    count = num_label_classes(feature)
    num_classes = num_classes or count
    if num_classes is None:
        raise DataError(f"{source}: the label column names no classes; set {classes_key}")
    if count is not None and count != num_classes:
        raise DataError(f"{source} has {count} classes but {classes_key} is {num_classes}; "
                        f"set {classes_key}={count}")
    names = feature_label_names(feature) or [str(i) for i in range(num_classes)]
    if layout == "multi_hot":
        ds = ds.map(lambda batch: {label_column: [[i for i, v in enumerate(row) if v] for row in batch[label_column]]},
                    batched=True, features=datasets.Features({**ds.features, label_column: datasets.Sequence(
                        datasets.Value("int64"))}), desc="multi-hot labels to class lists")
    for start in range(0, len(ds), 4096):
        lists = ds.with_format("arrow")[start:start + 4096][label_column].to_pylist()
        bad = [(start + i, c) for i, row in enumerate(lists) for c in row if not 0 <= c < num_classes]
        if bad:
            raise DataError(f"label {bad[0][1]} at index {bad[0][0]} of {source} is outside "
                            f"0..{num_classes - 1} ({classes_key})")
    return ds, names


def _check_labels(ds: datasets.Dataset, label_column: str, names, num_classes, classes_key: str,
                  source: str) -> list[str]:
    """Every label in 0..num_classes-1 and as many class names as classes; -> the names.
    num_classes None: the dataset's class names (or largest label + 1) say how many."""
    labels = np.asarray(ds.with_format("arrow")[label_column].to_numpy())
    if num_classes is None:
        num_classes = len(names) if names is not None else int(labels.max()) + 1
    if names is not None and len(names) != num_classes:
        raise DataError(f"{source} has {len(names)} classes but {classes_key} is "
                        f"{num_classes}; set {classes_key}={len(names)}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"label {int(labels[i])} at index {i} of {source} is outside "
                        f"0..{num_classes - 1} ({classes_key}); {bad.size} label(s) out of range")
    return names if names is not None else [str(i) for i in range(num_classes)]


def _subset(ds: datasets.Dataset, indices, key: str, source: str) -> datasets.Dataset:
    if indices is None:
        return ds
    n = len(ds)
    if is_int(indices):
        if not 1 <= indices <= n:
            raise RecipeError(f"{key}: expected 1..{n} (the first N of {n} images in {source}), got {indices}")
        return ds.select(range(indices))
    if isinstance(indices, (list, tuple)):
        if not indices:
            raise RecipeError(f"{key}: the index list is empty")
        bad = [i for i in indices if not is_int(i) or not 0 <= i < n]
        if bad:
            raise RecipeError(f"{key}: index {bad[0]!r} is not an int in 0..{n - 1} ({source} has {n} images)")
        return ds.select(list(indices))
    raise RecipeError(f"{key}: expected an int (first N) or a list of indices, got {type(indices).__name__}")


def _renumbered(ds, label_column: str, names: list[str], reference: list[str], source: str):
    """A split whose classes are a subset of the training set's, its labels renumbered by class name
    (a separate test folder may lack a class; its folder order must not shift the labels)."""
    unknown = [name for name in names if name not in reference]
    if unknown:
        raise DataError(f"{source} has class(es) the training data lacks: {', '.join(map(repr, unknown[:10]))}; "
                        f"the training classes are {', '.join(reference[:20])}{', ...' if len(reference) > 20 else ''}")
    lookup = np.array([reference.index(name) for name in names], dtype=np.int64)
    features = datasets.Features({**ds.features, label_column: datasets.ClassLabel(names=reference)})
    ds = ds.map(lambda batch: {label_column: lookup[np.asarray(batch[label_column], dtype=np.int64)]},
                batched=True, features=features, desc="class ids of the training set")
    return ds, reference


def _reads_files(ds: datasets.Dataset, image_column: str) -> bool:
    """The images are paths to files (an indexed image folder): checking them all before training
    would read the whole folder."""
    if not len(ds):
        return False
    item = ds.with_format("arrow")[:1][image_column].to_pylist()[0]
    return isinstance(item, dict) and item.get("bytes") is None and bool(item.get("path"))


def _drop_undecodable(ds: datasets.Dataset, image_column: str, source: str) -> datasets.Dataset:
    """on_corrupt="skip": decode every image once now, drop failures, warn once with the count."""
    bad, first_error = [], None
    for start in range(0, len(ds), 1024):
        chunk = ds[start:start + 1024]
        for offset, item in enumerate(chunk[image_column]):
            try:
                decode_image(item)
            except Exception as exc:
                bad.append(start + offset)
                if first_error is None:
                    first_error = f"index {chunk[ROW_COLUMN][offset]}: {exc}"
    if not bad:
        return ds
    if len(bad) == len(ds):
        raise DataError(f"none of the {len(ds)} images of {source} can be decoded (first: {first_error})")
    warnings.warn(f"skipped {len(bad)} undecodable image(s) of {source} (on_corrupt='skip'); first: {first_error}",
                  stacklevel=3)
    keep = np.setdiff1d(np.arange(len(ds)), np.asarray(bad))
    return ds.select(keep)
