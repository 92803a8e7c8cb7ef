"""Recipe -> datasets.DatasetDict with the batched pipeline set as each split's transform."""

from __future__ import annotations

import warnings
from pathlib import Path

import datasets
import numpy as np

from ..errors import DataError, RecipeError
from .decode import decode_image
from .sources import ACCEPTED_FORMATS, SourceLoader
from .transforms import ROW_COLUMN, BatchTransform, _did_you_mean, _is_int, build_pipeline

DATASET_TYPES = ("CIFAR10", "HFImageDataset", "SyntheticCIFAR10")
SPLIT_SECTIONS = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader"}
DEFAULT_SPLITS = {"train": "train", "val": "test", "test": "test"}
CIFAR10_HUB_ID = "uoft-cs/cifar10"
CIFAR10_DATA_ROOT = "data/cifar10"
SYNTHETIC_DEFAULT_SAMPLES = 1000
ON_CORRUPT = ("error", "skip")


def build_datasets(recipe: dict, data_root=None) -> datasets.DatasetDict:
    """The splits named by the recipe's train/val/test dataloaders, transforms set.

    data_root (the CLI's --data-root) replaces every split's dataset.data_root.
    Splits whose dataloader section is absent or null are left out. Splits reading
    the same source share its (memory-mapped) data; each split is its own Dataset.
    """
    num_classes = _recipe_num_classes(recipe)
    loader = SourceLoader()
    splits = {}
    for split, section in SPLIT_SECTIONS.items():
        loader_cfg = recipe.get(section)
        if not loader_cfg:
            continue
        dataset_cfg = loader_cfg.get("dataset")
        if not isinstance(dataset_cfg, dict):
            raise RecipeError(f"{section}.dataset: required (a dict with a 'type', one of {', '.join(DATASET_TYPES)})")
        splits[split] = _build_split(dataset_cfg, f"{section}.dataset", DEFAULT_SPLITS[split], data_root,
                                     num_classes, loader)
    return datasets.DatasetDict(splits)


def label_names(dataset_dict) -> list[str]:
    """Class names, index = label id (for the model's id2label)."""
    ds = dataset_dict["train"] if "train" in dataset_dict else next(iter(dataset_dict.values()))
    transform = (ds.format.get("format_kwargs") or {}).get("transform")
    names = getattr(transform, "label_names", None)
    if names is None:
        raise DataError("label_names: this dataset was not built by build_datasets")
    return list(names)


def _recipe_num_classes(recipe: dict) -> tuple:
    """(num_classes, the recipe key it came from) or (None, None)."""
    value = (recipe.get("data_preprocessor") or {}).get("num_classes")
    if value is not None:
        return value, "data_preprocessor.num_classes"
    value = ((recipe.get("model") or {}).get("head") or {}).get("num_classes")
    return (value, "model.head.num_classes") if value is not None else (None, None)


def _build_split(cfg: dict, key: str, default_split: str, data_root_override, num_classes, loader: SourceLoader):
    kind = cfg.get("type", "CIFAR10")
    if kind not in DATASET_TYPES:
        raise RecipeError(f"{key}.type: unknown dataset type {kind!r}{_did_you_mean(kind, DATASET_TYPES)}; "
                          f"known: {', '.join(DATASET_TYPES)}")
    steps = build_pipeline(cfg.get("pipeline"), f"{key}.pipeline")  # cheap checks before any loading
    on_corrupt = cfg.get("on_corrupt", "error")
    if on_corrupt not in ON_CORRUPT:
        raise RecipeError(f"{key}.on_corrupt: expected one of {', '.join(ON_CORRUPT)}, got {on_corrupt!r}")
    image_column = cfg.get("image_column") or "img"
    label_column = cfg.get("label_column") or "label"
    split = cfg.get("split") or default_split

    ds, source, converted = _load_source(kind, cfg, key, split, data_root_override, loader)
    if converted:  # our own conversions name the columns img/label
        renames = {old: new for old, new in (("img", image_column), ("label", label_column)) if old != new}
        if renames:
            ds = ds.rename_columns(renames)
    names = _check_columns(ds, image_column, label_column, source, key)
    if len(ds) == 0:
        raise DataError(f"{source} is empty (0 images); check {key}.split and the data")
    names = _check_labels(ds, label_column, names, num_classes, source)

    ds = ds.cast_column(image_column, datasets.Image(decode=False))
    ds = ds.add_column(ROW_COLUMN, np.arange(len(ds), dtype=np.int64))
    ds = _subset(ds, cfg.get("indices"), f"{key}.indices", source)
    if on_corrupt == "skip":
        ds = _drop_undecodable(ds, image_column, source)
    transform = BatchTransform(steps, image_column=image_column, label_column=label_column, source=source,
                               on_corrupt=on_corrupt, label_names=names)
    ds.set_transform(transform, columns=[image_column, label_column, ROW_COLUMN])
    return ds


def _load_source(kind, cfg, key, split, data_root_override, loader: SourceLoader):
    """-> (raw Dataset, description, whether we converted it ourselves)."""
    if kind == "SyntheticCIFAR10":
        num_samples = cfg.get("num_samples", SYNTHETIC_DEFAULT_SAMPLES)
        seed = cfg.get("seed", 0)
        if not _is_int(num_samples) or num_samples < 1:
            raise RecipeError(f"{key}.num_samples: expected an int >= 1, got {num_samples!r}")
        if not _is_int(seed):
            raise RecipeError(f"{key}.seed: expected an int, got {seed!r}")
        ds, description = loader.synthetic(num_samples, seed, split)
        return ds, description, True

    if kind == "CIFAR10":
        hub_id = cfg.get("hub_id") or CIFAR10_HUB_ID
        data_root = data_root_override or cfg.get("data_root") or CIFAR10_DATA_ROOT
    else:
        hub_id = cfg.get("hub_id")
        data_root = data_root_override or cfg.get("data_root")
        if not hub_id and not data_root:
            raise RecipeError(f"{key}.hub_id: HFImageDataset needs a hub_id (e.g. \"uoft-cs/cifar100\") "
                              f"or a data_root")
    root_key = "--data-root" if data_root_override else f"{key}.data_root"
    if data_root:
        root = Path(data_root).expanduser()
        local = loader.local(root, split, key)
        if local is not None:
            return local
        if data_root_override or (kind == "HFImageDataset" and not hub_id):
            raise DataError(f"data root {root} ({root_key}) does not exist. It must hold one of: {ACCEPTED_FORMATS}")
    hint = (f"Point --data-root (or the recipe key {key}.data_root) at a local copy: {ACCEPTED_FORMATS}"
            + (f" (looked in {Path(data_root).expanduser()}, which does not exist)." if data_root else "."))
    # CIFAR-sized images are re-encoded once into our cache (decoding them is then a copy).
    reencode = (cfg.get("image_column") or "img", cfg.get("label_column") or "label") if kind == "CIFAR10" else None
    return loader.hub(hub_id, cfg.get("config_name"), cfg.get("revision"), split, key, hint,
                      reencode_columns=reencode)


def _describe_feature(feature) -> str:
    if isinstance(feature, datasets.Value):
        return feature.dtype
    return type(feature).__name__


def _check_columns(ds: datasets.Dataset, image_column: str, label_column: str, source: str, key: str) -> list[str]:
    """Image feature + ClassLabel/int label column; returns the label names (None for plain ints)."""
    features = ds.features
    found = ", ".join(f"{name} ({_describe_feature(f)})" for name, f in features.items())
    for column, what, key_name in ((image_column, "image", "image_column"), (label_column, "label", "label_column")):
        if column not in features:
            raise DataError(f"{source} has no {what} column {column!r}{_did_you_mean(column, features)}; "
                            f"columns found: {found}. Set {key}.{key_name}")
    if not isinstance(features[image_column], datasets.Image):
        raise DataError(f"column {image_column!r} of {source} is {_describe_feature(features[image_column])}, "
                        f"not an Image feature; columns found: {found}. Set {key}.image_column")
    label = features[label_column]
    if isinstance(label, datasets.ClassLabel):
        return list(label.names)
    if isinstance(label, datasets.Value) and label.dtype.startswith(("int", "uint")):
        return None
    raise DataError(f"column {label_column!r} of {source} is {_describe_feature(label)}, not a ClassLabel or integer "
                    f"label column; columns found: {found}. Set {key}.label_column")


def _check_labels(ds: datasets.Dataset, label_column: str, names, num_classes, source: str) -> list[str]:
    bound, bound_key = num_classes
    if bound is None and names is not None:
        bound, bound_key = len(names), f"the {len(names)} class names of {source}"
    labels = np.asarray(ds.with_format("arrow")[label_column].to_numpy())
    bad = np.flatnonzero((labels < 0) | ((labels >= bound) if bound is not None else False))
    if bad.size:
        i = int(bad[0])
        allowed = f"0..{bound - 1} ({bound_key})" if bound is not None else ">= 0"
        raise DataError(f"label {int(labels[i])} at index {i} of {source} is outside {allowed}; "
                        f"{bad.size} label(s) out of range")
    if names is not None:
        return names
    count = bound if bound is not None else int(labels.max()) + 1
    return [str(i) for i in range(count)]


def _subset(ds: datasets.Dataset, indices, key: str, source: str) -> datasets.Dataset:
    if indices is None:
        return ds
    n = len(ds)
    if _is_int(indices):
        if not 1 <= indices <= n:
            raise RecipeError(f"{key}: expected 1..{n} (the first N of {n} images in {source}), got {indices}")
        return ds.select(range(indices))
    if isinstance(indices, (list, tuple)):
        if not indices:
            raise RecipeError(f"{key}: the index list is empty")
        bad = [i for i in indices if not _is_int(i) or not 0 <= i < n]
        if bad:
            raise RecipeError(f"{key}: index {bad[0]!r} is not an int in 0..{n - 1} ({source} has {n} images)")
        return ds.select(list(indices))
    raise RecipeError(f"{key}: expected an int (first N) or a list of indices, got {type(indices).__name__}")


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
