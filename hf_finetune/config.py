"""The typed recipe: every key's default, type, allowed values and help, checked once.

`load_config(path, cfg_options)` reads a recipe (recipe.py: `_base_`, merge rules,
`--cfg-options`) and returns a `Config`: one dataclass per section, the same names as an
mmcls 1.x config. Every check happens while parsing, with errors that name the file and the
dotted key; nothing outside this module reads raw recipe keys. `Config.to_dict()` is the
recipe again (what `recipe.json` in the work dir holds) and parses back to an equal Config.

A field's metadata holds its help line and its constraints:
    choices  allowed values            min / gt   lower bound (>= / >), also per list item
    types    {type name: dataclass}    for sections whose `type` key picks the keys
    check    fn(value) -> message | None, for rules no metadata expresses
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .errors import RecipeError
from .metrics import metric_key, reported_names
from .models.configuration_finetune_resnet import LOSS_TYPES, RESNET_ARCH, STYLES, stage_widths
from .recipe import check_size, did_you_mean, excerpt, json_type, load_recipe, show_path

REQUIRED = object()  # default of a key the recipe must set


def knob(default=None, help="", **meta):
    """A recipe key: its default (lists are copied per instance), help line and constraints."""
    meta["help"] = help
    if default is REQUIRED:
        meta["required"] = True
        default = None
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata=meta)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


# --- model -----------------------------------------------------------------------------------


@dataclass
class PretrainedInit:
    type: str = knob("Pretrained", "mmcls init type", choices=("Pretrained",))
    checkpoint: str = knob(REQUIRED, "http(s) URL, local file or Hub repo id of the weights",
                           check=lambda v: None if v.strip() else "must not be empty")
    prefix: Optional[str] = knob(None, "take only keys under this prefix (e.g. 'backbone')")
    allow_partial: bool = knob(False, "accept a checkpoint that lacks some backbone weights")


def _last_stage(value):
    return None if value in (3, -1, [3], [-1]) else "only the last stage (3) feeds the head"


@dataclass
class ResNetBackbone:
    type: str = knob("ResNet", "backbone type", choices=("ResNet",))
    depth: int = knob(50, "ResNet depth", choices=tuple(RESNET_ARCH))
    num_stages: int = knob(4, "mmcls key; only 4 stages are built", choices=(4,))
    out_indices: Union[int, list[int]] = knob([3], "stage outputs; the last stage feeds the head",
                                              check=_last_stage)
    style: str = knob("pytorch", "where the stride-2 conv sits", choices=STYLES)
    frozen_stages: int = knob(-1, "-1 nothing, 0 the stem, k the stem and stages 1..k",
                              min=-1, max=4)
    norm_eval: bool = knob(False, "keep every BatchNorm in eval mode while training")
    deep_stem: bool = knob(False, "mmcls key; only false is built", choices=(False,))
    avg_down: bool = knob(False, "mmcls key; only false is built", choices=(False,))
    in_channels: int = knob(3, "input channels; only 3 is built", choices=(3,))
    stem_channels: int = knob(64, "stem width; only 64 is built", choices=(64,))
    base_channels: int = knob(64, "stage-1 width; only 64 is built", choices=(64,))
    zero_init_residual: bool = knob(True, "zero the last BN of each block (from scratch only)")
    with_cp: bool = knob(False, "gradient checkpointing of each residual block")
    init_cfg: Optional[PretrainedInit] = knob(None, "pretrained backbone weights")


@dataclass
class LossCfg:
    type: str = knob("CrossEntropyLoss", "loss type", choices=LOSS_TYPES)
    loss_weight: float = knob(1.0, "multiplies the loss", min=0)
    label_smoothing: float = knob(0.0, "CrossEntropyLoss label smoothing", min=0, lt=1)
    label_smooth_val: Optional[float] = knob(None, "LabelSmoothLoss smoothing", min=0, lt=1)
    use_sigmoid: bool = knob(False, "CrossEntropyLoss: sigmoid per class (multi-label)")
    gamma: float = knob(2.0, "FocalLoss focusing parameter", min=0)
    alpha: float = knob(0.25, "FocalLoss positive-class weight", min=0, max=1)
    gamma_pos: float = knob(0.0, "AsymmetricLoss gamma of positives", min=0)
    gamma_neg: float = knob(4.0, "AsymmetricLoss gamma of negatives", min=0)
    clip: float = knob(0.05, "AsymmetricLoss probability margin of negatives", min=0, lt=1)

    def smoothing(self):
        return self.label_smooth_val if self.type == "LabelSmoothLoss" else self.label_smoothing


@dataclass
class HeadCfg:
    type: str = knob("LinearClsHead", "head type",
                     choices=("LinearClsHead", "MultiLabelLinearClsHead"))
    num_classes: Optional[int] = knob(None, "number of classes (null: the dataset's)", min=1)
    in_channels: Optional[int] = knob(None, "backbone output channels (derived from depth)", min=1)
    loss: LossCfg = knob(LossCfg, "the training loss")
    topk: Union[int, list[int]] = knob([1], "k of top-k accuracy the head reports", min=1)
    thr: Optional[float] = knob(None, "MultiLabelLinearClsHead: score threshold", min=0, max=1)

    def __post_init__(self):
        if self.type == "MultiLabelLinearClsHead" and self.loss == LossCfg():
            self.loss = LossCfg(use_sigmoid=True)  # mmpretrain's default loss for this head

    @property
    def multi_label(self):
        return self.type == "MultiLabelLinearClsHead" or self.loss.use_sigmoid or \
            self.loss.type in ("FocalLoss", "AsymmetricLoss")


@dataclass
class NeckCfg:
    type: str = knob("GlobalAveragePooling", "neck type", choices=("GlobalAveragePooling",))


@dataclass
class MixupCfg:
    type: str = "Mixup"
    alpha: float = knob(REQUIRED, "the mixing ratio is drawn from Beta(alpha, alpha), e.g. 0.8", gt=0)


def _box_sides(value):
    if value is None or len(value) == 2 and 0 < value[0] < value[1] < 1:
        return None
    return f"expected [min, max] with 0 < min < max < 1, got {excerpt(value)}"


@dataclass
class CutMixCfg:
    type: str = "CutMix"
    alpha: float = knob(REQUIRED, "the share of the image kept is drawn from Beta(alpha, alpha), "
                        "e.g. 1.0", gt=0)
    cutmix_minmax: Optional[list[float]] = knob(None, "box sides uniform in [min, max] of the image's "
                                                "(alpha then has no effect)", check=_box_sides)
    correct_lam: bool = knob(True, "mix the labels by the box area left after clipping at the border")


BATCH_AUGMENT_TYPES = {"Mixup": MixupCfg, "CutMix": CutMixCfg}


@dataclass
class ModelTrainCfg:
    augments: list[Any] = knob([], "batch augments, one per batch: Mixup, CutMix",
                               types=BATCH_AUGMENT_TYPES, listify=True)
    probs: Union[None, float, list[float]] = knob(None, "chance of each augment, at most 1 in all; "
                                                  "the rest is no augment (default: one, uniformly)",
                                                  min=0, max=1)


@dataclass
class ModelCfg:
    """mmcls ImageClassifier: our ResNet backbone, pooling neck and linear head.

    Every model section answers the same questions (num_classes, loss, multi_label, topk, thr,
    with_cp, frozen_stages, norm_eval, key) so callers need not ask which type it is."""

    type: str = knob("ImageClassifier", "model type")
    backbone: ResNetBackbone = knob(ResNetBackbone, "the backbone")
    neck: Optional[NeckCfg] = knob(NeckCfg, "pooling between backbone and head")
    head: HeadCfg = knob(REQUIRED, "the classification head")
    train_cfg: ModelTrainCfg = knob(ModelTrainCfg, "training-only model settings (batch augments)")

    num_classes = property(lambda self: self.head.num_classes)
    loss = property(lambda self: self.head.loss)
    multi_label = property(lambda self: self.head.multi_label)
    topk = property(lambda self: self.head.topk)
    thr = property(lambda self: self.head.thr)
    with_cp = property(lambda self: self.backbone.with_cp)
    frozen_stages = property(lambda self: self.backbone.frozen_stages)
    norm_eval = property(lambda self: self.backbone.norm_eval)

    @staticmethod
    def key(name):
        """The recipe key of a setting named as the properties above."""
        where = {"num_classes": "head", "loss": "head", "topk": "head", "thr": "head"}.get(name, "backbone")
        return f"model.{where}.{name}"


def _model_name(value):
    return None if value.strip() else "must not be empty"


@dataclass
class HuggingFaceClassifierCfg:
    """mmpretrain's HuggingFaceClassifier: any transformers image classifier
    (AutoModelForImageClassification), its head resized to the dataset's classes."""

    type: str = "HuggingFaceClassifier"
    model_name: str = knob(REQUIRED, "Hub model id (e.g. google/vit-base-patch16-224) or a local folder "
                           "saved with save_pretrained", check=_model_name)
    pretrained: bool = knob(False, "load the model's weights (false: its architecture with fresh weights)")
    revision: Optional[str] = knob(None, "Hub revision (branch, tag or commit) of model_name")
    trust_remote_code: bool = knob(False, "allow a model_name whose code lives in its repo (runs that code)")
    num_classes: Optional[int] = knob(None, "number of classes (null: the dataset's)", min=1)
    loss: LossCfg = knob(LossCfg, "the training loss (use_sigmoid, FocalLoss, AsymmetricLoss: multi-label)")
    train_cfg: ModelTrainCfg = knob(ModelTrainCfg, "training-only model settings (batch augments)")
    with_cp: bool = knob(False, "gradient checkpointing (the model's gradient_checkpointing_enable())")
    frozen_stages: int = knob(-1, "-1 nothing; 0 the embeddings; N the embeddings and the first N "
                              "stages or blocks (per family, see models.hub_classifier.FAMILIES)", min=-1)
    norm_eval: bool = knob(False, "keep every BatchNorm in eval mode while training")

    topk = property(lambda self: [1])  # no head to declare more: the evaluators' topk adds to it
    thr = property(lambda self: None)

    @property
    def multi_label(self):
        return self.loss.use_sigmoid or self.loss.type in ("FocalLoss", "AsymmetricLoss")

    @staticmethod
    def key(name):
        return f"model.{name}"


@dataclass
class TimmClassifierCfg(HuggingFaceClassifierCfg):
    """mmpretrain's TimmClassifier: a timm model through transformers' TimmWrapper (needs timm)."""

    type: str = "TimmClassifier"
    model_name: str = knob(REQUIRED, "timm model on the Hub (timm/<name>; a bare <name> means "
                           "timm/<name>) or a local folder saved with save_pretrained", check=_model_name)


MODEL_TYPES = {"ImageClassifier": ModelCfg, "HuggingFaceClassifier": HuggingFaceClassifierCfg,
               "TimmClassifier": TimmClassifierCfg}


@dataclass
class DataPreprocessorCfg:
    type: str = knob("ClsDataPreprocessor", "preprocessor type", choices=("ClsDataPreprocessor",))
    num_classes: Optional[int] = knob(None, "must equal model.head.num_classes", min=1)
    mean: Optional[list[float]] = knob(None, "per-channel mean, 0-255 scale (null: the model's: its image "
                                       "processor's for Hub models, 0 for ImageClassifier)",
                                       check=lambda v: None if len(v) == 3 else "expected 3 numbers")
    std: Optional[list[float]] = knob(None, "per-channel std, 0-255 scale (null: the model's: its image "
                                      "processor's for Hub models, 1 for ImageClassifier)", gt=0,
                                      check=lambda v: None if len(v) == 3 else "expected 3 numbers")
    to_rgb: bool = knob(False, "flip BGR input to RGB")


# --- data ------------------------------------------------------------------------------------


@dataclass
class Step:
    """One pipeline step: its recipe form and the step object built from it once."""

    type: str
    args: dict
    op: Any = dataclasses.field(compare=False, repr=False)

    def to_dict(self):
        return {"type": self.type, **self.args}


def _check_pipeline(steps):
    from .data.transforms import pipeline_order_problem

    return pipeline_order_problem([step.type for step in steps])


@dataclass
class DatasetCfg:
    type: str = knob(REQUIRED, "dataset type")
    data_root: Optional[str] = knob(None, "a local copy (folder or archive)")
    split: Optional[str] = knob(None, "split name in the source (default: train / test)")
    pipeline: list[Step] = knob([], "batched uint8 pipeline steps", check=lambda v: _check_pipeline(v))
    indices: Union[None, int, list[int]] = knob(None, "first N images, or a list of indices",
                                                min=0)
    on_corrupt: str = knob("error", "an undecodable image: stop, or skip it",
                           choices=("error", "skip"))


@dataclass
class HFImageDatasetCfg(DatasetCfg):
    type: str = knob("HFImageDataset", "an image dataset from a Hub or a local folder")
    hub_id: Optional[str] = knob(None, "Hub dataset id, used when data_root holds no copy")
    config_name: Optional[str] = knob(None, "Hub dataset configuration")
    revision: Optional[str] = knob(None, "Hub dataset revision")
    image_column: str = knob("img", "column holding the images")
    label_column: str = knob("label", "column holding the labels")
    download: bool = knob(True, "fetch hub_id when data_root holds no copy")
    val_split: float = knob(0.15, "train_dataloader's: the share of each class an image folder without "
                                  "val images holds out for validation (and test, without a test folder); "
                                  "0: validation reads the training images", min=0, lt=1)
    streaming: bool = knob(False, "read the split as a stream (datasets' streaming=True): nothing is downloaded "
                                  "or converted up front; data_root is then a Hub-format folder (parquet, "
                                  "imagefolder, ...), else hub_id is streamed from the Hub")
    num_samples: Optional[int] = knob(None, "streaming: images per epoch (default: the split's num_examples "
                                            "in the dataset's info)", min=1)
    shuffle_buffer: int = knob(1000, "streaming: images in the shuffle buffer (the shard order is shuffled too)",
                               min=1)


@dataclass
class CIFAR10Cfg(HFImageDatasetCfg):
    type: str = knob("CIFAR10", "CIFAR-10: a local copy in data_root, else the Hub's")
    data_root: Optional[str] = knob("data/cifar10", "a local CIFAR-10 copy")
    hub_id: Optional[str] = knob("uoft-cs/cifar10", "Hub dataset id")


@dataclass
class SyntheticCIFAR10Cfg(DatasetCfg):
    type: str = knob("SyntheticCIFAR10", "generated CIFAR-shaped data (no download)")
    num_samples: int = knob(1000, "number of images", min=1)
    seed: int = knob(0, "generator seed")


@dataclass
class SyntheticMultiLabelCfg(DatasetCfg):
    type: str = knob("SyntheticMultiLabel", "generated images of 1-3 of 5 coloured shapes (multi-label)")
    num_samples: int = knob(1000, "number of images", min=1)
    seed: int = knob(0, "generator seed")


@dataclass
class WebDatasetCfg(DatasetCfg):
    type: str = knob("WebDataset", "WebDataset tar shards, streamed through datasets' webdataset loader")
    shards: Union[None, str, list[str]] = knob(
        None, "a folder of .tar shards (or of <split>/ folders of them), a glob, or a list of paths / http(s) "
              "URLs (default: data_root)")
    image_column: Union[str, list[str]] = knob(["jpg", "jpeg", "png", "webp"], "the member extension(s) "
                                               "holding the image; a sample uses the first it has")
    label_column: str = knob("cls", "the member holding the class index (an integer, as in s0001.cls)")
    classes: Union[None, str, list[str]] = knob(
        None, "class names, index = label: a list, or a text file with one name per line (default: "
              "model.head.num_classes names '0', '1', ...)")
    num_samples: Optional[int] = knob(None, "images per epoch (the shards are not counted up front)", min=1)
    shuffle_buffer: int = knob(1000, "images in the shuffle buffer (the shard order is shuffled too)", min=1)


DATASET_TYPES = {"CIFAR10": CIFAR10Cfg, "HFImageDataset": HFImageDatasetCfg,
                 "SyntheticCIFAR10": SyntheticCIFAR10Cfg, "SyntheticMultiLabel": SyntheticMultiLabelCfg,
                 "WebDataset": WebDatasetCfg}


@dataclass
class SamplerCfg:
    type: str = knob("DefaultSampler", "sampler type", choices=("DefaultSampler",))
    shuffle: bool = knob(True, "shuffle every epoch")


@dataclass
class DataloaderCfg:
    batch_size: Optional[int] = knob(None, "per-device batch (train: see train_cfg.total_batch_size)",
                                     min=1)
    num_workers: int = knob(0, "loader worker processes", min=0)
    persistent_workers: Optional[bool] = knob(None, "keep workers between epochs "
                                              "(default: when num_workers > 0)")
    pin_memory: Optional[bool] = knob(None, "page-locked batches (default: on CUDA)")
    prefetch_factor: Optional[int] = knob(None, "batches each worker loads ahead", min=1)
    shared_slots: bool = knob(True, "workers hand batches over in reused shared-memory slots "
                                    "(false: torch's usual transfer)")
    drop_last: bool = knob(False, "drop the last incomplete batch")
    sampler: SamplerCfg = knob(SamplerCfg, "order of the images")
    dataset: DatasetCfg = knob(REQUIRED, "the images", types=DATASET_TYPES)
    collate_fn: Optional[dict] = knob(None, "mmcls key; batches are built by the pipeline", compat=True,
                                      check=lambda v: None if v in (None, {"type": "default_collate"})
                                      else "only default_collate")

    def keep_workers(self):
        return self.num_workers > 0 if self.persistent_workers is None else \
            self.persistent_workers and self.num_workers > 0


def is_streamed(dataset_cfg):
    """Whether a split is read as a stream (datasets' IterableDataset) rather than indexed."""
    return dataset_cfg.type == "WebDataset" or getattr(dataset_cfg, "streaming", False)


MULTI_LABEL_METRICS = ("MultiLabelMetric", "AveragePrecision")
MULTI_LABEL_THR = 0.5  # mmpretrain's: a class scoring at least this is predicted


def topk_list(topk):
    """A recipe's topk (k, [k, ...] or null) as a list: null is top-1, mmpretrain's default."""
    return topk if isinstance(topk, list) else [1] if topk is None else [topk]


@dataclass
class AccuracyCfg:
    type: str = knob("Accuracy", "Accuracy (single-label); MultiLabelMetric, AveragePrecision "
                     "(multi-label: mAP and precision / recall / F1)",
                     choices=("Accuracy",) + MULTI_LABEL_METRICS)
    topk: Union[None, int, list[int]] = knob(None, "Accuracy: k of top-k (default 1); "
                                             "MultiLabelMetric: the k best classes count as predicted",
                                             min=1)
    thr: Optional[float] = knob(None, f"MultiLabelMetric: score threshold (default {MULTI_LABEL_THR})",
                                min=0, max=1)


@dataclass
class SingleLabelMetricCfg:
    type: str = knob("SingleLabelMetric", "precision / recall / F1 / support of a single-label head",
                     choices=("SingleLabelMetric",))
    thrs: Union[None, float, list[Optional[float]]] = knob(
        0.0, "a prediction counts when its probability is above this; null: always; a list: each",
        min=0, max=1)
    items: list[str] = knob(["precision", "recall", "f1-score"], "what to report",
                            choices=("precision", "recall", "f1-score", "support"),
                            check=lambda v: None if v else "must name at least one item")
    average: Optional[str] = knob("macro", "macro: mean over classes; micro: from summed counts; "
                                  "null: every class", choices=("macro", "micro", None))


EVALUATOR_TYPES = {"Accuracy": AccuracyCfg, **{name: AccuracyCfg for name in MULTI_LABEL_METRICS},
                   "SingleLabelMetric": SingleLabelMetricCfg}


# --- schedule ----------------------------------------------------------------------------------


@dataclass
class SGDCfg:
    type: str = "SGD"
    lr: float = knob(REQUIRED, "learning rate", gt=0)
    momentum: float = knob(0.0, "momentum", min=0)
    weight_decay: float = knob(0.0, "L2 weight decay", min=0)
    nesterov: bool = knob(False, "Nesterov momentum")
    dampening: float = knob(0.0, "momentum dampening", min=0)


@dataclass
class AdamCfg:
    type: str = "Adam"
    lr: float = knob(REQUIRED, "learning rate", gt=0)
    betas: list[float] = knob([0.9, 0.999], "moment decay rates", min=0, lt=1,
                              check=lambda v: None if len(v) == 2 else "expected 2 numbers")
    eps: float = knob(1e-8, "denominator epsilon", gt=0)
    weight_decay: float = knob(0.0, "weight decay", min=0)
    amsgrad: bool = knob(False, "AMSGrad variant")


@dataclass
class AdamWCfg(AdamCfg):
    type: str = "AdamW"
    weight_decay: float = knob(0.01, "decoupled weight decay", min=0)


OPTIMIZER_TYPES = {"SGD": SGDCfg, "Adam": AdamCfg, "AdamW": AdamWCfg}


@dataclass
class CustomKeyCfg:
    lr_mult: float = knob(1.0, "LR multiplier", min=0)
    decay_mult: float = knob(1.0, "weight-decay multiplier", min=0)


@dataclass
class ParamwiseCfg:
    custom_keys: dict[str, CustomKeyCfg] = knob({}, "{parameter-name substring: multipliers}")
    norm_decay_mult: Optional[float] = knob(None, "weight-decay multiplier of norm layers", min=0)
    bias_decay_mult: Optional[float] = knob(None, "weight-decay multiplier of biases", min=0)
    layer_decay_rate: Optional[float] = knob(None, "LR decay per layer from the head "
                                             "(LearningRateDecayOptimWrapperConstructor)", gt=0, max=1)


@dataclass
class ClipGradCfg:
    max_norm: float = knob(REQUIRED, "clip the gradient norm to this", gt=0)
    norm_type: float = knob(2.0, "norm type; only 2", choices=(2,))


@dataclass
class OptimWrapperCfg:
    type: str = knob("OptimWrapper", "AmpOptimWrapper: mixed precision",
                     choices=("OptimWrapper", "AmpOptimWrapper"))
    optimizer: Any = knob(REQUIRED, "the optimizer", types=OPTIMIZER_TYPES)
    paramwise_cfg: ParamwiseCfg = knob(ParamwiseCfg, "per-parameter LR / decay rules")
    constructor: Optional[str] = knob(None, "optimizer constructor",
                                      choices=(None, "DefaultOptimWrapperConstructor",
                                               "LearningRateDecayOptimWrapperConstructor"))
    clip_grad: Optional[ClipGradCfg] = knob(None, "gradient clipping")
    accumulative_counts: int = knob(1, "batches accumulated per update", min=1)
    dtype: Optional[str] = knob(None, "AmpOptimWrapper precision (default float16)",
                                choices=(None, "float16", "fp16", "bfloat16", "bf16"))


@dataclass
class SchedulerCfg:
    type: str = knob(REQUIRED, "scheduler type")
    by_epoch: bool = knob(True, "begin/end/milestones count epochs (else updates)")
    begin: int = knob(0, "first step it acts on", min=0)
    end: Optional[int] = knob(None, "step it stops at (default: the end)", min=1)
    convert_to_iter_based: bool = knob(False, "epoch schedule applied smoothly per update")


@dataclass
class MultiStepLRCfg(SchedulerCfg):
    type: str = "MultiStepLR"
    milestones: list[int] = knob(REQUIRED, "steps at which the LR is multiplied by gamma", min=0)
    gamma: float = knob(0.1, "LR multiplier at each milestone", gt=0)


@dataclass
class StepLRCfg(SchedulerCfg):
    type: str = "StepLR"
    step_size: int = knob(REQUIRED, "steps between LR drops", min=1)
    gamma: float = knob(0.1, "LR multiplier every step_size", gt=0)


@dataclass
class CosineAnnealingLRCfg(SchedulerCfg):
    type: str = "CosineAnnealingLR"
    T_max: Optional[int] = knob(None, "steps of the half cosine (default: its range)", min=1)
    eta_min: float = knob(0.0, "final LR", min=0)
    eta_min_ratio: Optional[float] = knob(None, "final LR as a fraction of the base LR", min=0)


@dataclass
class LinearLRCfg(SchedulerCfg):
    type: str = "LinearLR"
    start_factor: float = knob(1.0 / 3, "LR factor at begin", gt=0, max=1)
    end_factor: float = knob(1.0, "LR factor at end", min=0, max=1)


@dataclass
class ConstantLRCfg(SchedulerCfg):
    type: str = "ConstantLR"
    factor: float = knob(1.0 / 3, "LR factor until end", gt=0, max=1)


SCHEDULER_TYPES = {"MultiStepLR": MultiStepLRCfg, "StepLR": StepLRCfg,
                   "CosineAnnealingLR": CosineAnnealingLRCfg, "LinearLR": LinearLRCfg,
                   "ConstantLR": ConstantLRCfg}


@dataclass
class TrainCfg:
    type: Optional[str] = knob(None, "the loop (sets by_epoch)",
                               choices=(None, "EpochBasedTrainLoop", "IterBasedTrainLoop"))
    by_epoch: Optional[bool] = knob(None, "length in epochs, else max_iters updates (default: false "
                                    "for IterBasedTrainLoop, else true)")
    max_epochs: int = knob(1, "epochs to train", min=1)
    max_iters: Optional[int] = knob(None, "updates to train when by_epoch is false", min=1)
    val_interval: int = knob(1, "validate every N epochs (updates when by_epoch is false)", min=1)
    total_batch_size: Optional[int] = knob(None, "images per update over all processes", min=1)

    def __post_init__(self):
        if self.by_epoch is None:  # mmengine: the loop type says it
            self.by_epoch = self.type != "IterBasedTrainLoop"


@dataclass
class LoopCfg:
    type: Optional[str] = knob(None, "mmcls key; the Trainer runs evaluation", compat=True)


@dataclass
class AutoScaleLRCfg:
    enable: bool = knob(False, "scale the LR by total batch / base_batch_size")
    base_batch_size: int = knob(128, "the batch the LR was set for", min=1)


# --- runtime -----------------------------------------------------------------------------------


@dataclass
class LoggerHookCfg:
    type: str = knob("LoggerHook", "hook type", choices=("LoggerHook",))
    interval: int = knob(100, "log every N updates", min=1)


def _interval(v):
    return None if v == -1 or v >= 1 else f"{v} is out of range; expected -1 (never) or >= 1"


@dataclass
class CheckpointHookCfg:
    type: str = knob("CheckpointHook", "hook type", choices=("CheckpointHook",))
    interval: int = knob(1, "save every N epochs (updates when by_epoch is false); -1 never",
                         check=_interval)
    max_keep_ckpts: int = knob(3, "checkpoints kept (plus the best); -1 all", check=_interval)
    save_best: Optional[str] = knob("auto", "metric that picks the best checkpoint; null: none")
    rule: Optional[str] = knob(None, "is a larger save_best better", choices=(None, "greater", "less"))
    by_epoch: Optional[bool] = knob(None, "interval in epochs (default: train_cfg.by_epoch)")


@dataclass
class DefaultHooksCfg:
    timer: Optional[dict] = knob({"type": "IterTimerHook"}, "mmcls hook (timing is always on)", compat=True)
    logger: LoggerHookCfg = knob(LoggerHookCfg, "training log interval")
    param_scheduler: Optional[dict] = knob({"type": "ParamSchedulerHook"},
                                           "mmcls hook (the schedule always steps)", compat=True)
    checkpoint: CheckpointHookCfg = knob(CheckpointHookCfg, "checkpoint saving")
    sampler_seed: Optional[dict] = knob({"type": "DistSamplerSeedHook"},
                                        "mmcls hook (the order is reseeded per epoch)", compat=True)
    visualization: Optional[dict] = knob({"type": "VisualizationHook", "enable": False},
                                         "mmcls hook; prediction drawing is not built", compat=True,
                                         check=lambda v: None if v is None or not v.get("enable")
                                         else "enable: true is not supported")


@dataclass
class EnvCfg:
    cudnn_benchmark: bool = knob(False, "let cuDNN pick the fastest convolutions")
    channels_last: bool = knob(True, "NHWC convolutional models and inputs (faster on GPUs and on CPU; "
                               "a ViT-like model stays as it is); false runs NCHW, mmpretrain's float "
                               "summation order")
    mp_cfg: Optional[dict] = knob(None, "mmcls key; processes are started by accelerate", compat=True)
    dist_cfg: Optional[dict] = knob(None, "mmcls key; the backend is chosen by accelerate", compat=True)


@dataclass
class RandomnessCfg:
    seed: Optional[int] = knob(None, "seed of initialisation, data order and augmentation "
                               "(null: drawn and recorded)", min=0, lt=2**32)
    deterministic: bool = knob(False, "deterministic kernels (slower)")
    diff_rank_seed: bool = knob(False, "mmcls key; augmentation differs per rank anyway", compat=True)


@dataclass
class HubCfg:
    """Where --push-to-hub sends the result; the token is never written anywhere."""

    push: bool = knob(False, "push the result when training ends")
    model_id: Optional[str] = knob(None, "repo id (default: the work dir's name)")
    private: bool = knob(False, "create the repo private")
    strategy: str = knob("end", "push at the end only; or also each saved model in the background "
                         "(every_save), with the checkpoint under last-checkpoint/ (checkpoint) "
                         "or under checkpoint-N/ (all_checkpoints)",
                         choices=("end", "every_save", "checkpoint", "all_checkpoints"))
    always_push: bool = knob(False, "queue a checkpoint push while the previous one runs "
                             "(default: that save is not pushed)")
    token: Optional[str] = dataclasses.field(default=None, repr=False, compare=False,
                                             metadata={"help": "in memory only", "secret": True})


@dataclass
class ModelCardCfg:
    license: Optional[str] = knob(None, "Hub license id of the weights (e.g. apache-2.0, mit)")


# mmengine's hook priorities: accepted so configs translate; callbacks run in list order.
PRIORITIES = ("HIGHEST", "VERY_HIGH", "HIGH", "ABOVE_NORMAL", "NORMAL", "BELOW_NORMAL", "LOW",
              "VERY_LOW", "LOWEST")


def _priority(value):
    if value in PRIORITIES or isinstance(value, int) and 0 <= value <= 100:
        return None
    return f"expected one of {', '.join(PRIORITIES)} or an integer 0..100, got {excerpt(value)}"


@dataclass
class EMAHookCfg:
    type: str = "EMAHook"
    momentum: float = knob(0.0002, "average = (1 - momentum) * average + momentum * weights", gt=0, lt=1)
    interval: int = knob(1, "update the average every N optimizer updates", min=1)
    begin_iter: int = knob(0, "the average follows the weights until this update", min=0)
    begin_epoch: int = knob(0, "the average follows the weights until this epoch (1-based)", min=0)
    update_buffers: bool = knob(False, "average the buffers (BatchNorm statistics) too")
    ema_type: str = knob("ExponentialMovingAverage", "the average", choices=("ExponentialMovingAverage",))
    strict_load: bool = knob(False, "--resume only from an ema.safetensors that matches the model")
    priority: Union[str, int] = knob("NORMAL", "mmengine key; callbacks run in list order (EMAHook "
                                     "swaps its weights in before any evaluation or save)",
                                     check=_priority, compat=True)


@dataclass
class EarlyStoppingHookCfg:
    """transformers' EarlyStoppingCallback under mmengine's names. It watches the metric that
    picks the best checkpoint (metric_for_best_model), so `monitor` must be save_best's."""

    type: str = "EarlyStoppingHook"
    monitor: str = knob(REQUIRED, "the metric watched, default_hooks.checkpoint.save_best's "
                        "(e.g. 'accuracy/top1')")
    rule: Optional[str] = knob(None, "is larger better (default: from the metric's name)",
                               choices=(None, "greater", "less"))
    min_delta: float = knob(0.1, "an evaluation improves when it beats the best so far by more "
                            "than this (accuracies in percent)", min=0)
    strict: bool = knob(True, "stop with an error when an evaluation lacks the monitor",
                        check=lambda v: None if v else "only true: the best-checkpoint metric must "
                        "be in every evaluation")
    check_finite: bool = knob(True, "stop at once when the monitor is NaN or infinite")
    patience: int = knob(5, "evaluations in a row without improvement before training stops", min=1)
    stopping_threshold: Optional[float] = knob(None, "stop at once when the monitor beats this "
                                               "(accuracies in percent)")
    priority: Union[str, int] = knob("NORMAL", "mmengine key; callbacks run in list order",
                                     check=_priority, compat=True)


HOOK_TYPES = {"EMAHook": EMAHookCfg, "EarlyStoppingHook": EarlyStoppingHookCfg}
# mmengine's rule of a metric from its name (CheckpointHook, EarlyStoppingHook).
GREATER_KEYS = ("acc", "top", "AR@", "auc", "precision", "mAP", "mDice", "mIoU", "mAcc", "aAcc")
LESS_KEYS = ("loss",)


def infer_rule(metric):
    """mmengine's rule ("greater" or "less") of a metric name: exact key, then substring;
    None when the name says neither."""
    name = metric.lower()
    keys = [([k.lower() for k in GREATER_KEYS], "greater"), ([k.lower() for k in LESS_KEYS], "less")]
    for match in (lambda k: name == k, lambda k: k in name):
        for names, rule in keys:
            if any(match(k) for k in names):
                return rule
    return None


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# TrainingArguments fields the mmcls sections own -> the recipe key to set instead, so no
# value is silently overridden.
OWNED_FIELDS = {
    "output_dir": "work_dir (or --work-dir)",
    "num_train_epochs": "train_cfg.max_epochs",
    "max_steps": "train_cfg.max_iters (with train_cfg.by_epoch false)",
    "per_device_train_batch_size": "train_cfg.total_batch_size or train_dataloader.batch_size",
    "per_device_eval_batch_size": "val_dataloader.batch_size",
    "gradient_accumulation_steps": "optim_wrapper.accumulative_counts",
    "learning_rate": "optim_wrapper.optimizer.lr",
    "weight_decay": "optim_wrapper.optimizer.weight_decay",
    "optim": "optim_wrapper.optimizer.type",
    "adam_beta1": "optim_wrapper.optimizer.betas",
    "adam_beta2": "optim_wrapper.optimizer.betas",
    "adam_epsilon": "optim_wrapper.optimizer.eps",
    "lr_scheduler_type": "param_scheduler",
    "lr_scheduler_kwargs": "param_scheduler",
    "warmup_steps": "param_scheduler (a LinearLR entry)",
    "warmup_ratio": "param_scheduler (a LinearLR entry)",
    "max_grad_norm": "optim_wrapper.clip_grad.max_norm",
    "seed": "randomness.seed",
    "data_seed": "randomness.seed",
    "full_determinism": "randomness.deterministic",
    "logging_steps": "default_hooks.logger.interval",
    "save_strategy": "default_hooks.checkpoint.interval",
    "save_steps": "default_hooks.checkpoint.interval",
    "save_total_limit": "default_hooks.checkpoint.max_keep_ckpts",
    "metric_for_best_model": "default_hooks.checkpoint.save_best",
    "eval_strategy": "train_cfg.val_interval",
    "eval_steps": "train_cfg.val_interval",
    "dataloader_num_workers": "train_dataloader.num_workers",
    "dataloader_pin_memory": "train_dataloader.pin_memory",
    "dataloader_persistent_workers": "train_dataloader.persistent_workers",
    "dataloader_prefetch_factor": "train_dataloader.prefetch_factor",
    "dataloader_drop_last": "train_dataloader.drop_last",
    "remove_unused_columns": "(fixed: the pipeline already emits model inputs)",
    "resume_from_checkpoint": "resume (or --resume)",
    "label_smoothing_factor": "model.head.loss.label_smoothing",
    "log_level": "log_level",
}
# TrainingArguments' Hub fields -> HubCfg fields: hf_finetune.hub pushes (its allow-list and
# token scan), never the Trainer.
HUB_FIELDS = {"push_to_hub": "push", "hub_model_id": "model_id", "hub_private_repo": "private",
              "hub_strategy": "strategy", "hub_always_push": "always_push", "hub_token": "token"}


def _check_training_args(value):
    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    for key in value:
        if key in OWNED_FIELDS:
            return f"{key}: set by the recipe's {OWNED_FIELDS[key]}; set it there"
        if key not in known:
            return f"{shorten(key)}: " + unknown_message("transformers.TrainingArguments field", key, known)
    return None


@dataclass
class Config:
    model: Union[ModelCfg, HuggingFaceClassifierCfg] = knob(REQUIRED, "the classifier", types=MODEL_TYPES,
                                                            default_type="ImageClassifier")
    data_preprocessor: DataPreprocessorCfg = knob(DataPreprocessorCfg, "normalisation on the device")
    train_dataloader: Optional[DataloaderCfg] = knob(None, "training data")
    val_dataloader: Optional[DataloaderCfg] = knob(None, "validation data")
    test_dataloader: Optional[DataloaderCfg] = knob(None, "test data")
    val_evaluator: list[Union[AccuracyCfg, SingleLabelMetricCfg]] = knob(
        [{"type": "Accuracy"}], "validation metrics", types=EVALUATOR_TYPES, listify=True)
    test_evaluator: list[Union[AccuracyCfg, SingleLabelMetricCfg]] = knob(
        [{"type": "Accuracy"}], "test metrics", types=EVALUATOR_TYPES, listify=True)
    optim_wrapper: Optional[OptimWrapperCfg] = knob(None, "optimizer and its wrapper")
    param_scheduler: list[SchedulerCfg] = knob([], "LR schedule; several multiply",
                                               types=SCHEDULER_TYPES, listify=True)
    train_cfg: TrainCfg = knob(TrainCfg, "length of training, validation interval, total batch")
    val_cfg: LoopCfg = knob(LoopCfg, "mmcls key")
    test_cfg: LoopCfg = knob(LoopCfg, "mmcls key")
    auto_scale_lr: AutoScaleLRCfg = knob(AutoScaleLRCfg, "linear LR scaling by batch size")
    default_scope: Optional[str] = knob(None, "mmcls key (registries are not used)", compat=True)
    default_hooks: DefaultHooksCfg = knob(DefaultHooksCfg, "logging and checkpoints")
    env_cfg: EnvCfg = knob(EnvCfg, "runtime environment")
    visualizer: Optional[dict] = knob(None, "vis_backends -> Trainer report_to",
                                      check=lambda v: _check_visualizer(v))
    log_level: str = knob("info", "debug shows the Trainer's own log lines",
                          choices=LOG_LEVELS + tuple(l.upper() for l in LOG_LEVELS))
    load_from: Optional[str] = knob(None, "whole-model weights to start from")
    resume: bool = knob(False, "continue from the work dir's latest checkpoint")
    randomness: RandomnessCfg = knob(RandomnessCfg, "seeds")
    work_dir: Optional[str] = knob(None, "outputs (default: work_dirs/<recipe name>)")
    training_args: dict = knob({}, "other transformers.TrainingArguments fields",
                               check=_check_training_args)
    hub: HubCfg = knob(HubCfg, "pushing the result to a Hub")
    custom_hooks: list[Any] = knob([], "mmengine hooks: EMAHook, EarlyStoppingHook", types=HOOK_TYPES,
                                   listify=True)
    model_card: ModelCardCfg = knob(ModelCardCfg, "what the model card states")
    sync_bn: Optional[str] = knob(None, 'mmengine\'s sync_bn: "torch" turns BatchNorm into torch.nn.SyncBatchNorm '
                                  "when several processes train, so its statistics cover the whole batch; "
                                  "null: per device", choices=(None, "torch"))
    name: Optional[str] = knob(None, "the recipe's name (its file name)")

    def to_dict(self):
        """The recipe as JSON-ready data; secrets left out."""
        return to_data(self)

    # Derived values with a single owner.
    def dataloaders(self):
        """{split: DataloaderCfg} for the splits the recipe sets."""
        return {split: section for split, section in (
            ("train", self.train_dataloader), ("val", self.val_dataloader),
            ("test", self.test_dataloader)) if section is not None}

    def best_metric(self):
        """(metric name, rule) that picks the best checkpoint (save_best "auto": the head's
        main metric), or None without save_best; the rule is None when not inferable."""
        checkpoint = self.default_hooks.checkpoint
        name = checkpoint.save_best
        if name is None:
            return None
        if name == "auto":
            name = "multilabel/mAP" if self.model.multi_label else "accuracy/top1"
        return name, checkpoint.rule or infer_rule(name)

    def topk(self):
        """The k of the top-k accuracies reported: the head's (mmcls' heads declare theirs)
        and the evaluators', sorted."""
        ks = set()
        for topk in [self.model.topk] + [e.topk for e in self.val_evaluator + self.test_evaluator
                                              if isinstance(e, AccuracyCfg)]:
            ks.update(topk_list(topk))
        return sorted(ks)

    def single_label_metrics(self):
        """The distinct SingleLabelMetric options (thrs, items, average) of both evaluator
        lists: validation and test report the metrics of both."""
        options = []
        for evaluator in self.val_evaluator + self.test_evaluator:
            if evaluator.type == "SingleLabelMetric":
                entry = {"thrs": evaluator.thrs, "items": evaluator.items, "average": evaluator.average}
                if entry not in options:
                    options.append(entry)
        return options

    def multi_label_decision(self):
        """(thr, topk) that turn multi-label scores into predicted classes: the validation
        MultiLabelMetric's, else the head's thr; MULTI_LABEL_THR when neither is set."""
        evaluator = next((e for e in self.val_evaluator if e.type == "MultiLabelMetric"), None)
        thr = evaluator.thr if evaluator and evaluator.thr is not None else self.model.thr
        topk = evaluator.topk if evaluator else None
        topk = topk[0] if isinstance(topk, list) else topk
        return (MULTI_LABEL_THR if thr is None and topk is None else thr), topk


VIS_BACKENDS = {"LocalVisBackend": None, "TensorboardVisBackend": "tensorboard",
                "WandbVisBackend": "wandb", "MLflowVisBackend": "mlflow"}


def _check_visualizer(value):
    backends = value.get("vis_backends") or []
    for i, backend in enumerate(backends if isinstance(backends, list) else [backends]):
        name = backend.get("type") if isinstance(backend, dict) else backend
        if name not in VIS_BACKENDS:
            return f"vis_backends.{i}.type: " + unknown_message("visualizer backend", name, VIS_BACKENDS)
    return None


def report_to(cfg):
    """The Trainer integrations the recipe's visualizer asks for."""
    backends = (cfg.visualizer or {}).get("vis_backends") or []
    names = [b.get("type") if isinstance(b, dict) else b for b in
             (backends if isinstance(backends, list) else [backends])]
    return sorted({VIS_BACKENDS[n] for n in names if VIS_BACKENDS.get(n)}) or "none"


# --- cross-section rules ------------------------------------------------------------------------


def _check_config(cfg, error):
    model, pre = cfg.model, cfg.data_preprocessor
    key = lambda name: tuple(model.key(name).split("."))  # noqa: E731 (the dotted key as a path)
    if None not in (pre.num_classes, model.num_classes) and pre.num_classes != model.num_classes:
        raise error(("data_preprocessor", "num_classes"),
                    f"{pre.num_classes} differs from {model.key('num_classes')}={model.num_classes}")
    if isinstance(model, ModelCfg):
        _check_resnet(model, pre, error)
    elif cfg.load_from is not None:
        raise error(("load_from",), f"not used with {model.type}: its weights come from model.model_name "
                                    f"(a Hub id or a saved folder); set model.model_name instead")
    args = cfg.training_args  # transformers 5 names them activation_checkpointing*, the old names still work
    checkpointing = args.get("activation_checkpointing_kwargs") or args.get("gradient_checkpointing_kwargs") or {}
    with_cp = model.with_cp or args.get("activation_checkpointing") or args.get("gradient_checkpointing")
    if with_cp and model.frozen_stages >= 0 and checkpointing.get("use_reentrant"):
        # A reentrant checkpoint whose input needs no gradient (the frozen stem's output) passes
        # none back, so every block before the head would silently stop learning.
        raise error(("training_args", "gradient_checkpointing_kwargs", "use_reentrant"),
                    f"true with {model.key('frozen_stages')} >= 0 would train no backbone block "
                    "(a reentrant checkpoint of a frozen input gets no gradient); remove it or set false")
    for name in ("val_evaluator", "test_evaluator"):
        for i, evaluator in enumerate(getattr(cfg, name)):
            if (evaluator.type in MULTI_LABEL_METRICS) != model.multi_label:
                wanted = "MultiLabelMetric" if model.multi_label else "Accuracy"
                raise error((name, i, "type"), f"{evaluator.type} does not fit a "
                            f"{'multi' if model.multi_label else 'single'}-label head; use {wanted}")
    single_label = {}  # average -> (list, index, entry): the first SingleLabelMetric reporting its keys
    for name in ("val_evaluator", "test_evaluator"):
        for i, evaluator in enumerate(getattr(cfg, name)):
            if evaluator.type == "SingleLabelMetric":
                first = single_label.setdefault(evaluator.average, (name, i, evaluator))
                if first[2] != evaluator:
                    raise error((name, i), f"reports the same keys as {first[0]}.{first[1]} (average "
                                f"{json.dumps(evaluator.average)}) with other settings; validation and test "
                                f"report every evaluator's metrics: give both the same settings")
    for where, ks in [(key("topk"), model.topk)] + [
            ((name, i, "topk"), e.topk) for name in ("val_evaluator", "test_evaluator")
            for i, e in enumerate(getattr(cfg, name)) if isinstance(e, AccuracyCfg)]:
        ks = topk_list(ks)
        if model.num_classes is not None and max(ks) > model.num_classes and not model.multi_label:
            raise error(where, f"{ks} needs at least {max(ks)} classes but {model.key('num_classes')} "
                               f"is {model.num_classes}; use [1]")
    loss = model.loss
    if loss.type == "LabelSmoothLoss" and loss.label_smooth_val is None:
        raise error(key("loss") + ("label_smooth_val",), "required for LabelSmoothLoss")
    _check_batch_augments(model.train_cfg, model, error)
    if cfg.default_hooks.checkpoint.save_best is not None:
        _check_metric_name(cfg, ("default_hooks", "checkpoint", "save_best"),
                           cfg.default_hooks.checkpoint.save_best, error, auto=True)
    best = cfg.best_metric()
    if best and best[1] is None:
        raise error(("default_hooks", "checkpoint", "rule"), f"cannot infer it from save_best "
                                                             f"{best[0]!r}; set 'greater' or 'less'")
    _check_custom_hooks(cfg, best, error)
    train = cfg.train_cfg
    if train.type is not None and train.by_epoch != (train.type == "EpochBasedTrainLoop"):
        raise error(("train_cfg", "by_epoch"), f"{train.by_epoch} contradicts type {train.type}")
    if not train.by_epoch and train.max_iters is None:
        raise error(("train_cfg", "max_iters"), "required when train_cfg.by_epoch is false")
    if cfg.train_dataloader is not None:
        if train.total_batch_size is None and cfg.train_dataloader.batch_size is None:
            raise error(("train_dataloader", "batch_size"),
                        "missing (or set train_cfg.total_batch_size)")
        if cfg.optim_wrapper is None:
            raise error(("optim_wrapper",), "required to train")
    for i, sched in enumerate(cfg.param_scheduler):
        if sched.end is not None and sched.end <= sched.begin:
            raise error(("param_scheduler", i, "end"),
                        f"must be larger than begin ({sched.begin}), got {sched.end}")
    wrapper = cfg.optim_wrapper
    if wrapper is not None:
        if wrapper.dtype is not None and wrapper.type != "AmpOptimWrapper":
            raise error(("optim_wrapper", "dtype"), "only with type AmpOptimWrapper")
        decay = wrapper.constructor == "LearningRateDecayOptimWrapperConstructor"
        if decay != (wrapper.paramwise_cfg.layer_decay_rate is not None):
            raise error(("optim_wrapper", "paramwise_cfg", "layer_decay_rate"),
                        "set it together with constructor=LearningRateDecayOptimWrapperConstructor")
        lr_mults = [k for k, v in wrapper.paramwise_cfg.custom_keys.items() if v.lr_mult != 1.0]
        if decay and lr_mults:
            raise error(("optim_wrapper", "paramwise_cfg", "custom_keys", lr_mults[0], "lr_mult"),
                        "not used with layer-wise LR decay (the layer sets the LR); remove it")
    for split, section in cfg.dataloaders().items():
        ds = section.dataset
        if isinstance(ds, HFImageDatasetCfg) and ds.type == "HFImageDataset" and not (
                ds.hub_id or ds.data_root):
            raise error((f"{split}_dataloader", "dataset", "hub_id"),
                        'HFImageDataset needs a hub_id (e.g. "uoft-cs/cifar100") or a data_root')
        default = HFImageDatasetCfg.__dataclass_fields__["val_split"].default
        if split != "train" and getattr(ds, "val_split", default) != default:
            raise error((f"{split}_dataloader", "dataset", "val_split"),
                        "the training set is what is split: set train_dataloader.dataset.val_split")
        if is_streamed(ds) and getattr(ds, "val_split", default) != default:
            raise error((f"{split}_dataloader", "dataset", "val_split"),
                        "a streamed split is read whole, not split: give the validation images their own "
                        "split (a val/ folder, or the dataset's validation split)")
        if isinstance(ds, WebDatasetCfg) and not (ds.shards or ds.data_root):
            raise error((f"{split}_dataloader", "dataset", "shards"),
                        "WebDataset needs shards (a folder of .tar files, a glob or a list of URLs) or a data_root")
        if is_streamed(ds) and isinstance(ds.indices, list):
            raise error((f"{split}_dataloader", "dataset", "indices"),
                        "a streamed split has no random access: use an int (its first N images)")
        _check_stream_keys(ds, split, error)
    _check_load_best(cfg, error)


def _check_resnet(model, pre, error):
    """ImageClassifier's own rules; mean / std unset are mmcls' defaults (no normalisation)."""
    channels = stage_widths(RESNET_ARCH[model.backbone.depth][0])[-1]  # the last stage's
    if model.head.in_channels not in (None, channels):
        raise error(("model", "head", "in_channels"),
                    f"{model.head.in_channels} does not match the backbone's output ({channels} "
                    f"channels); remove it or set {channels}")
    if pre.mean is None:
        pre.mean = [0.0, 0.0, 0.0]
    if pre.std is None:
        pre.std = [1.0, 1.0, 1.0]


def _check_stream_keys(ds, split, error):
    """num_samples and shuffle_buffer shape a stream only: elsewhere they would be read and ignored."""
    where = (f"{split}_dataloader", "dataset")
    if not is_streamed(ds):
        if getattr(ds, "num_samples", None) is not None and isinstance(ds, HFImageDatasetCfg):
            raise error(where + ("num_samples",), "only a streamed split reads it (its images per epoch); set "
                                                  "streaming to true, or remove it (a split's size is its images)")
        if getattr(ds, "shuffle_buffer", None) not in (None, HFImageDatasetCfg.shuffle_buffer):
            raise error(where + ("shuffle_buffer",), "only a streamed split reads it; set streaming to true, or "
                                                     "remove it (an indexed split is shuffled whole)")
    elif split != "train" and ds.shuffle_buffer != HFImageDatasetCfg.shuffle_buffer:
        raise error(where + ("shuffle_buffer",), "an evaluation split is read in order, never shuffled; remove it")


def _check_load_best(cfg, error):
    """load_best_model_at_end picks the best of the saved checkpoints by their validation:
    every checkpoint must follow one (TrainingArguments' rule, said in recipe terms)."""
    if not cfg.training_args.get("load_best_model_at_end"):
        return
    where = ("training_args", "load_best_model_at_end")
    checkpoint, train = cfg.default_hooks.checkpoint, cfg.train_cfg
    if cfg.val_dataloader is None:
        raise error(where, "needs a val_dataloader: the best checkpoint is the best validation")
    if checkpoint.interval < 1:
        raise error(where, "needs checkpoints; default_hooks.checkpoint.interval is -1")
    ckpt_by_epoch = train.by_epoch if checkpoint.by_epoch is None else checkpoint.by_epoch
    if ckpt_by_epoch == train.by_epoch and checkpoint.interval % train.val_interval:
        raise error(where, f"needs a validation before every checkpoint: default_hooks.checkpoint.interval "
                           f"({checkpoint.interval}) must be a multiple of train_cfg.val_interval "
                           f"({train.val_interval})")


def _check_batch_augments(train, model, error):
    where = ("model", "train_cfg")
    if train.augments and model.multi_label:
        raise error(where + ("augments",), "Mixup / CutMix need a single-label head")
    if train.probs is None:
        return
    probs = train.probs if isinstance(train.probs, list) else [train.probs]
    if not train.augments:
        raise error(where + ("probs",), "set without augments; remove it or add augments")
    if len(probs) != len(train.augments):  # mmpretrain's RandomBatchAugment: one per augment
        raise error(where + ("probs",), f"expected {len(train.augments)} probabilities, one per "
                                        f"augment, got {len(probs)}")
    if sum(probs) > 1 + 1e-6:
        raise error(where + ("probs",), f"the probabilities sum to {sum(probs):g}; at most 1 is allowed")


def _check_metric_name(cfg, where, name, error, auto=False):
    """A best-checkpoint metric must be one the evaluations report: the Trainer would raise a
    KeyError at the first one. auto: "auto" (the head's main metric) is allowed too."""
    known = ["auto"] * auto + reported_names(cfg.topk(), cfg.model.multi_label, cfg.single_label_metrics())
    if metric_key(name) not in {metric_key(k) for k in known}:
        per_class = "; per-class values (average null) are lists, not one metric" if "_classwise" in name else ""
        raise error(where, f"{excerpt(name)} is not a metric the evaluators report{did_you_mean(name, known)}"
                           f"{per_class}; known: {', '.join(known)}")


def _check_custom_hooks(cfg, best, error):
    """best: (metric, rule) of the best checkpoint, or None."""
    for i, hook in enumerate(cfg.custom_hooks):
        where = ("custom_hooks", i)
        if hook.type == "EMAHook":
            if any(h.type == "EMAHook" for h in cfg.custom_hooks[:i]):
                raise error(where + ("type",), "only one EMAHook is allowed")
            if hook.begin_iter and hook.begin_epoch:
                raise error(where + ("begin_epoch",), "set begin_iter or begin_epoch, not both")
            continue
        # EarlyStoppingHook: transformers' EarlyStoppingCallback, which compares each
        # evaluation with the Trainer's best value of metric_for_best_model.
        _check_metric_name(cfg, where + ("monitor",), hook.monitor, error)
        rule = hook.rule or infer_rule(hook.monitor)
        if rule is None:
            raise error(where + ("rule",), f"cannot infer it from monitor {hook.monitor!r}; "
                                           f"set 'greater' or 'less'")
        if cfg.val_dataloader is None:
            raise error(where + ("type",), "EarlyStoppingHook watches the validations during "
                                           "training; set val_dataloader")
        if best is None:
            raise error(("default_hooks", "checkpoint", "save_best"),
                        f"null, but EarlyStoppingHook (custom_hooks.{i}) watches the best-checkpoint "
                        f"metric; set it to {hook.monitor!r}")
        if metric_key(hook.monitor) != metric_key(best[0]):
            raise error(where + ("monitor",),
                        f"{hook.monitor!r} differs from default_hooks.checkpoint.save_best "
                        f"({best[0]!r}); early stopping watches the best-checkpoint metric: set "
                        f"both to the same metric")
        if rule != best[1]:
            raise error(where + ("rule",), f"{rule!r} differs from the best checkpoint's rule "
                                           f"{best[1]!r} (default_hooks.checkpoint.rule)")


# --- parsing --------------------------------------------------------------------------------



class _Parser:
    def __init__(self, origins):
        self.origins = origins

    def error(self, path, message):
        source = "recipe"
        for n in range(len(path), -1, -1):
            if path[:n] in self.origins:
                source = show_path(self.origins[path[:n]])
                break
        key = ".".join(str(p) for p in path) or "(top level)"
        return RecipeError(f"{source}: {shorten(key)}: {message}")

    def section(self, cls, value, path):
        if not isinstance(value, dict):
            raise self.error(path, f"expected an object, got {describe(value)}")
        hints = typing.get_type_hints(cls)
        names = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("secret")}
        for key in value:
            if key not in names:
                hint = ""
                if "type" in names and value.get("type") is not None and \
                        not (path and isinstance(path[-1], int)):
                    # A base's section of another type merged into this one (list items never merge).
                    hint = (' (if a base file sets it for another type, write "_delete_": true '
                            'in your section to replace the base section)')
                raise self.error(path + (key,), unknown_message(
                    f"key for {value.get('type') or cls.__name__}", key, names) + hint)
        kwargs = {}
        for name, f in names.items():
            if name in value:
                kwargs[name] = self.value(value[name], hints[name], f.metadata, path + (name,))
            elif f.metadata.get("required"):
                raise self.error(path + (name,), f"required ({f.metadata.get('help')})")
            elif f.metadata.get("types") or f.metadata.get("listify"):
                # Defaults of typed or list sections are recipe data too: parse them.
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
                    else f.default
                if default is not None:
                    kwargs[name] = self.value(default, hints[name], f.metadata, path + (name,))
        return cls(**kwargs)

    def typed(self, types, value, path, default_type=None):
        if not isinstance(value, dict):
            raise self.error(path, f"expected an object with a 'type', got {describe(value)}")
        name = value.get("type", default_type)
        if name not in types:
            raise self.error(path + ("type",), unknown_message("type", name, types))
        return self.section(types[name], {"type": name, **value}, path)

    def value(self, value, hint, meta, path):
        if meta.get("listify") and isinstance(value, dict):
            value = [value]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is Union:
            if value is None and type(None) in args:
                return None
            options = [a for a in args if a is not type(None)]
            if len(options) == 1:
                return self.value(value, options[0], meta, path)
            for option in options:  # the option whose JSON shape matches
                if _shape(option) == _shape_of(value):
                    return self.value(value, option, meta, path)
            names = " or ".join(type_name(a) for a in args)
            raise self.error(path, f"expected {names}, got {describe(value)}")
        if origin is list:
            if not isinstance(value, list):
                raise self.error(path, f"expected a list, got {describe(value)}")
            item_meta = {k: v for k, v in meta.items() if k not in ("check", "listify")}
            result = [self.value(v, args[0], item_meta, path + (i,)) for i, v in enumerate(value)]
        elif origin is dict:
            if not isinstance(value, dict):
                raise self.error(path, f"expected an object, got {describe(value)}")
            result = {k: self.value(v, args[1], {}, path + (k,)) for k, v in value.items()}
        elif hint is Step:
            result = self.step(value, path)
        elif meta.get("types"):
            result = self.typed(meta["types"], value, path, meta.get("default_type"))
        elif dataclasses.is_dataclass(hint):
            result = self.section(hint, value, path)
        else:
            result = self.scalar(value, hint, path)
            self.bounds(result, meta, path)
        check = meta.get("check")
        message = check(result) if check else None
        if message:
            raise self.error(path, message)
        return result

    def built(self, builder, value, path):
        """builder(value, key), its RecipeError re-raised naming the file and the exact key."""
        key = ".".join(str(p) for p in path)
        try:
            return builder(value, key)
        except RecipeError as e:
            text = str(e)
            if text.startswith(key + "."):  # "key.argument: message": name the argument
                sub, _, text = text[len(key) + 1:].partition(": ")
                raise self.error(path + tuple(int(p) if p.isdigit() else p for p in sub.split(".")),
                                 text) from None
            raise self.error(path, text.removeprefix(key + ": ")) from None

    def scalar(self, value, hint, path):
        if hint is Any:
            return value
        if hint is dict:
            if not isinstance(value, dict):
                raise self.error(path, f"expected an object, got {describe(value)}")
            return value
        ok = {bool: isinstance(value, bool), str: isinstance(value, str),
              int: isinstance(value, int) and not isinstance(value, bool),
              float: isinstance(value, (int, float)) and not isinstance(value, bool)}[hint]
        if not ok:
            raise self.error(path, f"expected {type_name(hint)}, got {describe(value)}")
        if hint is float:
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise self.error(path, "expected a finite number")
        return value

    def bounds(self, value, meta, path):
        if "choices" in meta and value not in meta["choices"]:
            listing = ", ".join(json.dumps(c) for c in meta["choices"] if c is not None)
            raise self.error(path, f"{describe(value)} is not allowed; expected one of {listing}"
                             + did_you_mean(value, meta["choices"]))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        for key, ok, word in (("min", lambda b: value >= b, ">="), ("gt", lambda b: value > b, ">"),
                              ("max", lambda b: value <= b, "<="), ("lt", lambda b: value < b, "<")):
            if key in meta and not ok(meta[key]):
                raise self.error(path, f"{value} is out of range; expected {word} {meta[key]}")

    def step(self, value, path):
        from .data.transforms import PIPELINE_STEPS

        if not isinstance(value, dict):
            raise self.error(path, f"a pipeline step is an object, got {describe(value)}")
        name = value.get("type")
        if name not in PIPELINE_STEPS:
            raise self.error(path + ("type",), unknown_message("pipeline step", name, PIPELINE_STEPS))
        op = self.built(PIPELINE_STEPS[name].from_config, value, path)
        return Step(name, {k: v for k, v in value.items() if k != "type"}, op)


def _shape(hint):
    origin = typing.get_origin(hint)
    if origin is list:
        return "list"
    if origin is dict or hint is dict or dataclasses.is_dataclass(hint):
        return "object"
    if hint in (int, float):
        return "number"
    return {bool: "bool", str: "string", type(None): "null"}.get(hint, "any")


def _shape_of(value):
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {list: "list", dict: "object", str: "string", type(None): "null"}.get(type(value), "any")


def parse_config(recipe, origins=None, name=None):
    """A merged recipe dict -> Config, every key checked (see module docstring); its depth
    was bounded by recipe.check_size on every route here."""
    origins = dict(origins or {})
    recipe = dict(recipe)
    recipe.pop("_base_", None)
    if name and not recipe.get("name"):
        recipe["name"] = name
    token = _move_hub_fields(recipe, origins)
    parser = _Parser(origins)
    cfg = parser.section(Config, recipe, ())
    _check_config(cfg, parser.error)
    cfg.hub.token = token
    return cfg


def _move_hub_fields(recipe, origins):
    """training_args.push_to_hub & co. (the names Hugging Face users know) -> the hub section.
    Returns the token, which stays in memory only."""
    args = recipe.get("training_args")
    if isinstance(args, dict) and "hub_revision" in args:
        where = show_path(origins.get(("training_args", "hub_revision"), "recipe"))
        raise RecipeError(f"{where}: training_args.hub_revision: not supported; pushes go to the repo's "
                          "main branch: remove it")
    if not isinstance(args, dict) or not set(args) & set(HUB_FIELDS):
        return None
    args, hub = dict(args), dict(recipe.get("hub") or {})
    for field_name, hub_name in HUB_FIELDS.items():
        if field_name in args:
            hub[hub_name] = args.pop(field_name)
            origins.setdefault(("hub", hub_name), origins.get(("training_args", field_name), "recipe"))
    recipe["training_args"], recipe["hub"] = args, hub
    return hub.pop("token", None)


def load_config(path, cfg_options=None):
    """Load, merge and check a recipe file; `cfg_options` is a list of "key=value"."""
    recipe, origins = load_recipe(path, cfg_options)
    origins.setdefault((), os.path.abspath(path))  # a missing top-level key names the file
    return parse_config(recipe, origins, os.path.splitext(os.path.basename(path))[0])


def config_from_dict(recipe, name=None):
    """A recipe given as a dict (Python API, or a saved recipe.json) -> Config."""
    check_size(recipe, "recipe")
    return parse_config(recipe, {}, name)


def read_config(path):
    """The recipe.json a run wrote (or any recipe file without bases) -> Config."""
    try:
        with open(path, encoding="utf-8") as f:
            recipe = json.load(f)
    except (OSError, ValueError) as e:
        raise RecipeError(f"{path}: cannot read the saved recipe ({e})") from None
    check_size(recipe, path)
    return parse_config(recipe, {(): path}, None)


def apply_overrides(cfg, *, work_dir=None, data_root=None, auto_scale_lr=False,
                    push_to_hub=None, resume=False):
    """Command-line flags, applied once as overrides of the config."""
    if data_root is not None:
        if not os.path.exists(data_root):
            raise RecipeError(f"--data-root {data_root}: no such file or folder")
        for section in cfg.dataloaders().values():
            section.dataset.data_root = data_root
            if hasattr(section.dataset, "download"):
                section.dataset.download = False  # the folder given is the data: no fallback
    cfg.work_dir = work_dir or resolved_work_dir(cfg)  # recorded, so the saved recipe says where
    if auto_scale_lr:
        cfg.auto_scale_lr.enable = True
    if push_to_hub:
        cfg.hub.push, cfg.hub.model_id = True, push_to_hub
    if resume:
        cfg.resume = True
    return cfg


def resolved_work_dir(cfg):
    return cfg.work_dir or os.path.join("work_dirs", cfg.name or "run")


def to_data(value):
    if isinstance(value, Step):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return {f.name: to_data(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.metadata.get("secret") and f.compare}
    if isinstance(value, list):
        return [to_data(v) for v in value]
    if isinstance(value, dict):
        return {k: to_data(v) for k, v in value.items()}
    return value


def compat_keys():
    """Keys accepted so mmcls configs translate line by line, with no effect here."""
    found = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            inner = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
            if f.metadata.get("compat"):
                found.append(prefix + f.name)
            elif f.metadata.get("types"):  # typed sections (model) and list entries (custom_hooks)
                item = ".N." if typing.get_origin(hints[f.name]) is list else "."
                for entry in dict.fromkeys(f.metadata["types"].values()):
                    walk(entry, prefix + f.name + item)
            elif dataclasses.is_dataclass(inner[0]) and inner[0] is not Step:
                walk(inner[0], prefix + f.name + ".")

    walk(Config, "")
    return list(dict.fromkeys(found))


# --- messages ------------------------------------------------------------------------------


def shorten(text, limit=200):
    """A dotted key cut short: keys come from the recipe and can be megabytes."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def unknown_message(what, name, known):
    known = sorted(str(k) for k in known)
    listing = ", ".join(known) if len(known) <= 30 else f"{len(known)} known, see the docs"
    return f"unknown {what} {excerpt(name)}{did_you_mean(name, known)}; known: {listing}"


def type_name(hint):
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false",
             type(None): "null", dict: "an object", Any: "any value"}
    if hint in names:
        return names[hint]
    if typing.get_origin(hint) is list:
        return "a list"
    return "an object"


def describe(value):
    return f"{json_type(value)} {excerpt(value)}"
