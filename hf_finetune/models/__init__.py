"""The model: recipe `model` + `data_preprocessor` sections -> FinetuneResNetForImageClassification.

Importing this package registers the model with AutoConfig / AutoModelForImageClassification
(locally) and for `auto_map` (so save_pretrained ships the two self-contained code files).
"""

from __future__ import annotations

import difflib

from transformers import AutoConfig, AutoModelForImageClassification

from hf_finetune.errors import RecipeError
from hf_finetune.recipe import validate

from .checkpoints import LoadReport, load_checkpoint_file, load_pretrained, to_transformers_state_dict
from .configuration_finetune_resnet import RESNET_ARCH, FinetuneResNetConfig
from .modeling_finetune_resnet import FinetuneResNetForImageClassification

AutoConfig.register(FinetuneResNetConfig.model_type, FinetuneResNetConfig, exist_ok=True)
AutoModelForImageClassification.register(FinetuneResNetConfig, FinetuneResNetForImageClassification, exist_ok=True)
FinetuneResNetConfig.register_for_auto_class()
FinetuneResNetForImageClassification.register_for_auto_class("AutoModelForImageClassification")

# mmcls ResNet options we do not implement: accepted only at their default value.
_UNSUPPORTED_BACKBONE_DEFAULTS = {
    "num_stages": 4,
    "deep_stem": False,
    "avg_down": False,
    "in_channels": 3,
    "stem_channels": 64,
    "base_channels": 64,
    "with_cp": False,
}


def _did_you_mean(value, choices) -> str:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _backbone_kwargs(backbone: dict) -> dict:
    path = "model.backbone"
    for name, default in _UNSUPPORTED_BACKBONE_DEFAULTS.items():
        if name in backbone and backbone[name] != default:
            raise RecipeError(
                f"{path}.{name}={backbone[name]!r} is not supported (only {default!r}); remove it rather than "
                "have it silently ignored"
            )
    depth = backbone.get("depth", 50)
    if depth not in RESNET_ARCH:
        raise RecipeError(f"{path}.depth: {depth!r} is not supported; expected one of {sorted(RESNET_ARCH)}")
    out_indices = _as_list(backbone.get("out_indices", [3]))
    if out_indices not in ([3], [-1]):
        raise RecipeError(
            f"{path}.out_indices={out_indices!r} is not supported; only the last stage ([3]) feeds the head"
        )
    style = backbone.get("style", "pytorch")
    if style not in ("pytorch", "caffe"):
        raise RecipeError(f"{path}.style: {style!r} is not supported; expected 'pytorch' or 'caffe'"
                          f"{_did_you_mean(style, ['pytorch', 'caffe'])}")
    frozen = backbone.get("frozen_stages", -1)
    if isinstance(frozen, bool) or not isinstance(frozen, int) or not -1 <= frozen <= 4:
        raise RecipeError(f"{path}.frozen_stages: {frozen!r} is out of range; expected an integer from -1 "
                          "(nothing frozen) to 4 (stem and all four stages)")
    return {
        "depth": depth,
        "style": style,
        "frozen_stages": frozen,
        "norm_eval": bool(backbone.get("norm_eval", False)),
        "zero_init_residual": bool(backbone.get("zero_init_residual", True)),
    }


def _init_cfg(backbone: dict) -> dict | None:
    init_cfg = backbone.get("init_cfg")
    if not init_cfg:
        return None
    path = "model.backbone.init_cfg"
    checkpoint = init_cfg.get("checkpoint")
    if not isinstance(checkpoint, str) or not checkpoint.strip():
        raise RecipeError(f"{path}.checkpoint: required (an http(s) URL, a local path or a Hub repo id)")
    return init_cfg


def _head_kwargs(head: dict, feature_channels: int) -> dict:
    path = "model.head"
    num_classes = head.get("num_classes")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise RecipeError(f"{path}.num_classes: {num_classes!r} must be a positive integer")
    in_channels = head.get("in_channels", feature_channels)
    if in_channels != feature_channels:
        raise RecipeError(f"{path}.in_channels={in_channels} does not match the backbone's output "
                          f"({feature_channels} channels); remove it or set {feature_channels}")
    topk = _as_list(head.get("topk", [1, 5]))
    if max(topk) > num_classes:
        raise RecipeError(
            f"{path}.topk={topk} needs at least {max(topk)} classes but {path}.num_classes is {num_classes}; "
            "set model.head.topk to [1] (and the evaluators' topk too)"
        )
    loss = head.get("loss") or {}
    loss_type = loss.get("type", "CrossEntropyLoss")
    if loss_type == "LabelSmoothLoss":
        if "label_smooth_val" not in loss:
            raise RecipeError(f"{path}.loss.label_smooth_val: required for LabelSmoothLoss")
        smoothing, smoothing_key = loss["label_smooth_val"], "label_smooth_val"
    else:
        smoothing, smoothing_key = loss.get("label_smoothing", 0.0), "label_smoothing"
    if not 0.0 <= float(smoothing) < 1.0:
        raise RecipeError(f"{path}.loss.{smoothing_key}={smoothing!r} must be in [0, 1)")
    return {
        "num_labels": num_classes,
        "loss_type": loss_type,
        "label_smoothing": float(smoothing),
        "loss_weight": float(loss.get("loss_weight", 1.0)),
    }


def _preprocessor_kwargs(preprocessor: dict, num_classes: int) -> dict:
    path = "data_preprocessor"
    if preprocessor.get("num_classes", num_classes) != num_classes:
        raise RecipeError(f"{path}.num_classes={preprocessor['num_classes']} differs from "
                          f"model.head.num_classes={num_classes}")
    # mmcls: no mean/std means no normalisation (just the float conversion).
    stats = {}
    for name, default in (("mean", [0.0, 0.0, 0.0]), ("std", [1.0, 1.0, 1.0])):
        values = preprocessor.get(name, default)
        if not isinstance(values, (list, tuple)) or len(values) != 3:
            raise RecipeError(f"{path}.{name}: expected 3 numbers (0-255 scale), got {values!r}")
        stats[name] = [float(v) for v in values]
    if min(stats["std"]) <= 0:
        raise RecipeError(f"{path}.std: values must be positive, got {stats['std']}")
    return {**stats, "to_rgb": bool(preprocessor.get("to_rgb", False))}


def build_config(recipe: dict, id2label: dict | None = None) -> FinetuneResNetConfig:
    """Validate the recipe's model / data_preprocessor sections and turn them into a config."""
    # Keys and types are the schema's (recipe.validate); a recipe from load_recipe already
    # passed, a dict handed to the Python API is checked the same way here.
    validate({key: recipe[key] for key in ("model", "data_preprocessor") if key in recipe})
    model_cfg = recipe.get("model") or {}
    backbone = model_cfg.get("backbone") or {}
    kwargs = _backbone_kwargs(backbone)
    pretrained = _init_cfg(backbone) is not None
    layer_type = RESNET_ARCH[kwargs["depth"]][0]
    feature_channels = 2048 if layer_type == "bottleneck" else 512
    kwargs.update(_head_kwargs(model_cfg.get("head") or {}, feature_channels))
    kwargs.update(_preprocessor_kwargs(recipe.get("data_preprocessor") or {}, kwargs["num_labels"]))
    # mmcls skips the zero-init of residual BNs when the backbone loads pretrained weights.
    kwargs["zero_init_residual"] = kwargs["zero_init_residual"] and not pretrained
    if id2label is not None:
        id2label = {int(k): str(v) for k, v in dict(id2label).items()}
        if len(id2label) != kwargs["num_labels"]:
            raise RecipeError(
                f"model.head.num_classes is {kwargs['num_labels']} but the dataset has {len(id2label)} "
                f"classes; set model.head.num_classes={len(id2label)}"
            )
        kwargs["id2label"] = id2label
        kwargs["label2id"] = {name: index for index, name in id2label.items()}
    try:
        return FinetuneResNetConfig(model_cfg=model_cfg, **kwargs)
    except ValueError as exc:
        raise RecipeError(f"model: {exc}") from None


def build_model(recipe: dict, id2label: dict | None = None) -> FinetuneResNetForImageClassification:
    """Build the classifier from a validated recipe; load init_cfg (backbone) then load_from (whole model)."""
    config = build_config(recipe, id2label)
    model = FinetuneResNetForImageClassification(config)
    init_cfg = _init_cfg(recipe.get("model", {}).get("backbone") or {})
    if init_cfg is not None:
        load_pretrained(
            model,
            init_cfg["checkpoint"],
            prefix=init_cfg.get("prefix"),
            allow_partial=bool(init_cfg.get("allow_partial", False)),
            scope="backbone",
            key="model.backbone.init_cfg.checkpoint",
        )
    if recipe.get("load_from"):
        load_pretrained(model, recipe["load_from"], scope="model", key="load_from")
    return model


__all__ = [
    "FinetuneResNetConfig",
    "FinetuneResNetForImageClassification",
    "LoadReport",
    "build_config",
    "build_model",
    "load_checkpoint_file",
    "load_pretrained",
    "to_transformers_state_dict",
]
