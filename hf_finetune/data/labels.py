"""Label columns: which layout a `datasets` feature has, and multi-hot float targets from it.

Layouts:
  "single_label"  ClassLabel or an integer Value: one class index per sample.
  "class_lists"   Sequence(ClassLabel) (or a sequence of integers): the classes present, e.g. [0, 3]
                  (the common Hub layout for multi-label data).
  "multi_hot"     a fixed-length sequence of 0/1 (int, float or bool), one entry per class.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import torch

from hf_finetune.errors import DataError
from hf_finetune.recipe import did_you_mean

LAYOUTS = ("single_label", "class_lists", "multi_hot")
_INTEGER_DTYPES = {f"{sign}int{bits}" for sign in ("", "u") for bits in (8, 16, 32, 64)}
_MULTI_HOT_DTYPES = _INTEGER_DTYPES | {"bool", "float16", "float32", "float64"}


def _dtype(feature) -> str | None:
    return getattr(feature, "dtype", None) if type(feature).__name__ in ("Value", "ClassLabel") else None


def _is_class_label(feature) -> bool:
    return type(feature).__name__ == "ClassLabel"


def _list_item(feature):
    """The item feature of a List / LargeList / Sequence feature, else None."""
    return getattr(feature, "feature", None) if type(feature).__name__ in ("List", "LargeList", "Sequence") else None


def label_layout(feature, column: str = "label") -> str:
    """The layout of the label column's `datasets` feature: one of LAYOUTS; DataError otherwise.

    A fixed-length sequence of integers is taken as multi-hot; a variable-length one as class lists.
    """
    if _is_class_label(feature) or _dtype(feature) in _INTEGER_DTYPES:
        return "single_label"
    item = _list_item(feature)
    if item is not None:
        length = getattr(feature, "length", -1)
        if _is_class_label(item) or (_dtype(item) in _INTEGER_DTYPES and length in (-1, None)):
            return "class_lists"
        if _dtype(item) in _MULTI_HOT_DTYPES and length not in (-1, None):
            return "multi_hot"
    raise DataError(
        f"label column {column!r} has feature {feature}; expected ClassLabel (single label), "
        "Sequence(ClassLabel) (the classes of each sample) or a fixed-length Sequence of 0/1 values (multi-hot)"
    )


def label_names(feature) -> list[str] | None:
    """Class names of a ClassLabel or Sequence(ClassLabel) feature, else None."""
    item = feature if _is_class_label(feature) else _list_item(feature)
    return list(item.names) if item is not None and _is_class_label(item) else None


def num_label_classes(feature) -> int | None:
    """Number of classes a label feature states: ClassLabel names, or a multi-hot sequence's length."""
    names = label_names(feature)
    if names is not None:
        return len(names)
    length = getattr(feature, "length", -1)
    return length if _list_item(feature) is not None and length not in (-1, None) else None


def class_lists_to_multi_hot(lists: Sequence[Sequence[int]], num_classes: int, column: str = "label") -> torch.Tensor:
    """[[0, 3], [], [1]] -> float32 [N, num_classes] with ones at those classes."""
    targets = torch.zeros(len(lists), num_classes, dtype=torch.float32)
    for row, classes in enumerate(lists):
        classes = [int(c) for c in classes]
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise DataError(f"label column {column!r}: sample {row} names class {bad[0]}; "
                            f"expected class indices 0..{num_classes - 1}")
        targets[row, classes] = 1.0
    return targets


def multi_hot_to_tensor(rows: Sequence[Sequence[float]], num_classes: int, column: str = "label") -> torch.Tensor:
    """Rows of 0/1 values (one per class) -> float32 [N, num_classes]."""
    targets = torch.as_tensor([list(r) for r in rows], dtype=torch.float32)
    if len(rows) == 0:
        return targets.reshape(0, num_classes)
    if targets.ndim != 2 or targets.shape[1] != num_classes:
        raise DataError(f"label column {column!r}: multi-hot rows have shape {list(targets.shape)}; "
                        f"expected one value per class ({num_classes})")
    if not torch.all((targets == 0) | (targets == 1)):
        raise DataError(f"label column {column!r}: multi-hot values must be 0 or 1")
    return targets


def to_multi_hot(values: Sequence, layout: str, num_classes: int, column: str = "label") -> torch.Tensor:
    """A batch of a multi-label column (as `datasets` returns it) -> float32 multi-hot [N, num_classes]."""
    if layout == "class_lists":
        return class_lists_to_multi_hot(values, num_classes, column)
    if layout == "multi_hot":
        return multi_hot_to_tensor(values, num_classes, column)
    raise DataError(f"label column {column!r} has layout {layout!r}; multi-label targets need 'class_lists' "
                    "(Sequence(ClassLabel)) or 'multi_hot'")


def label_kind_fix(model, multi_label: bool) -> str:
    """How the recipe makes `model` single- or multi-label, for messages."""
    if model.key("loss") == "model.head.loss":
        return f"set model.head.type to {'MultiLabelLinearClsHead' if multi_label else 'LinearClsHead'}"
    return f"set model.loss.use_sigmoid to {str(multi_label).lower()}"


def describe_feature(feature) -> str:
    if isinstance(feature, datasets.Value):
        return feature.dtype
    return type(feature).__name__


def check_columns(features, image_column: str, label_column: str, source: str, key: str) -> list[str] | None:
    """An Image feature and a label column (single- or multi-label) among a split's `datasets`
    features, else one line naming them; -> the class names (None for plain integers)."""
    found = ", ".join(f"{name} ({describe_feature(f)})" for name, f in features.items())
    for column, what, key_name in ((image_column, "image", "image_column"), (label_column, "label", "label_column")):
        if column not in features:
            raise DataError(f"{source} has no {what} column {column!r}{did_you_mean(column, features)}; "
                            f"columns found: {found}. Set {key}.{key_name}")
    if not isinstance(features[image_column], datasets.Image):
        raise DataError(f"column {image_column!r} of {source} is {describe_feature(features[image_column])}, "
                        f"not an Image feature; columns found: {found}. Set {key}.image_column")
    label = features[label_column]
    if isinstance(label, datasets.ClassLabel):
        return list(label.names)
    if isinstance(label, datasets.Value) and label.dtype.startswith(("int", "uint")):
        return None
    try:
        label_layout(label, label_column)
    except DataError:
        raise DataError(f"column {label_column!r} of {source} is {describe_feature(label)}, not a label column "
                        f"(ClassLabel, integer, Sequence(ClassLabel) or multi-hot); columns found: {found}. "
                        f"Set {key}.label_column") from None
    return label_names(label)


__all__ = [
    "LAYOUTS",
    "check_columns",
    "class_lists_to_multi_hot",
    "describe_feature",
    "label_kind_fix",
    "label_layout",
    "label_names",
    "multi_hot_to_tensor",
    "num_label_classes",
    "to_multi_hot",
]
