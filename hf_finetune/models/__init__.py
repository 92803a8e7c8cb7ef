"""The model: recipe `model` + `data_preprocessor` sections -> FinetuneResNetForImageClassification
(model.type ImageClassifier), or a transformers image classifier from the Hub (hub_classifier.py).

Importing this package registers the model with AutoConfig / AutoModelForImageClassification
(locally) and for `auto_map` (so save_pretrained ships the two self-contained code files).
"""

from __future__ import annotations

import dataclasses
import json
import os

from transformers import AutoConfig, AutoModelForImageClassification

from hf_finetune.errors import CheckpointError, RecipeError

from .checkpoints import LoadReport, load_checkpoint_file, load_pretrained, to_transformers_state_dict, verify_weights
from .configuration_finetune_resnet import FinetuneResNetConfig
from .hub_classifier import build_hub_model, load_hub_folder, model_preprocessing
from .modeling_finetune_resnet import FinetuneResNetForImageClassification

AutoConfig.register(FinetuneResNetConfig.model_type, FinetuneResNetConfig, exist_ok=True)
AutoModelForImageClassification.register(FinetuneResNetConfig, FinetuneResNetForImageClassification, exist_ok=True)
FinetuneResNetConfig.register_for_auto_class()
FinetuneResNetForImageClassification.register_for_auto_class("AutoModelForImageClassification")


def build_config(model_cfg, preprocessor_cfg, id2label=None) -> FinetuneResNetConfig:
    """The model config from the typed `model` and `data_preprocessor` sections (checked by
    hf_finetune.config), with the dataset's class names."""
    backbone, head = model_cfg.backbone, model_cfg.head
    if id2label is None and head.num_classes is None:
        raise RecipeError("model.head.num_classes: needed to build the model without a dataset")
    names = id2label or {i: str(i) for i in range(head.num_classes)}
    id2label = {int(k): str(v) for k, v in dict(names).items()}
    if head.num_classes is not None and len(id2label) != head.num_classes:
        raise RecipeError(f"model.head.num_classes is {head.num_classes} but the dataset has "
                          f"{len(id2label)} classes; set model.head.num_classes={len(id2label)}")
    return FinetuneResNetConfig(
        depth=backbone.depth,
        style=backbone.style,
        frozen_stages=backbone.frozen_stages,
        norm_eval=backbone.norm_eval,
        # mmcls skips the zero-init of residual BNs when the backbone loads pretrained weights.
        zero_init_residual=backbone.zero_init_residual and backbone.init_cfg is None,
        with_cp=backbone.with_cp,
        problem_type="multi_label_classification" if head.multi_label else "single_label_classification",
        loss_type=head.loss.type,
        use_sigmoid=head.loss.use_sigmoid,
        label_smoothing=head.loss.smoothing(),
        loss_weight=head.loss.loss_weight,
        focal_gamma=head.loss.gamma,
        focal_alpha=head.loss.alpha,
        asymmetric_gamma_pos=head.loss.gamma_pos,
        asymmetric_gamma_neg=head.loss.gamma_neg,
        asymmetric_clip=head.loss.clip,
        mean=preprocessor_cfg.mean,
        std=preprocessor_cfg.std,
        to_rgb=preprocessor_cfg.to_rgb,
        id2label=id2label,
        label2id={name: index for index, name in id2label.items()},
        model_cfg=_plain(model_cfg),
    )


def build_model(model_cfg, preprocessor_cfg, id2label=None, load_from=None, load_key="load_from"):
    """The classifier; init_cfg loads the backbone, then load_from the whole model
    (load_key names where that path came from, for error messages). A Hub model
    (HuggingFaceClassifier / TimmClassifier) comes whole from model_cfg.model_name."""
    if model_cfg.type != "ImageClassifier":
        if load_from:
            raise RecipeError(f"{load_key}: a weights file does not load into a {model_cfg.type}; pass the "
                              f"folder it was saved in (a work dir or checkpoint-N)")
        if id2label is None:
            if model_cfg.num_classes is None:
                raise RecipeError("model.num_classes: needed to build the model without a dataset")
            id2label = {i: str(i) for i in range(model_cfg.num_classes)}
        return build_hub_model(model_cfg, preprocessor_cfg, {int(k): str(v) for k, v in id2label.items()})
    model = FinetuneResNetForImageClassification(build_config(model_cfg, preprocessor_cfg, id2label))
    init_cfg = model_cfg.backbone.init_cfg
    if init_cfg is not None:
        load_pretrained(model, init_cfg.checkpoint, prefix=init_cfg.prefix,
                        allow_partial=init_cfg.allow_partial, scope="backbone",
                        key="model.backbone.init_cfg.checkpoint")
    if load_from:
        load_pretrained(model, load_from, scope="model", key=load_key)
    return model


def load_saved_model(folder, key, preprocessor_cfg=None):
    """A model saved with save_pretrained (a work dir or checkpoint folder), its weights read
    without running code from them and checked finite first. Any image classifier other than
    ours loads through AutoModelForImageClassification without remote code, normalising uint8
    input with preprocessor_cfg's mean / std (else the folder's preprocessor_config.json)."""
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{key}: no config.json there (not a saved model)")
    verify_weights(folder, key=key)
    try:
        with open(config_file, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise CheckpointError(f"{key}: config.json there is not readable JSON") from None
    if model_type == FinetuneResNetConfig.model_type:
        return FinetuneResNetForImageClassification.from_pretrained(folder)
    pre = preprocessor_cfg
    return load_hub_folder(folder, key, mean=pre.mean if pre else None, std=pre.std if pre else None,
                           to_rgb=pre.to_rgb if pre else False)


def _plain(section):
    # asdict, not config.to_data: the config imports this package (the backbone's width).
    return dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section


__all__ = [
    "FinetuneResNetConfig",
    "FinetuneResNetForImageClassification",
    "LoadReport",
    "build_config",
    "build_model",
    "load_saved_model",
    "model_preprocessing",
    "load_checkpoint_file",
    "load_pretrained",
    "to_transformers_state_dict",
]
