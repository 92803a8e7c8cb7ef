"""Configuration of the fine-tuned ResNet classifier (mmcls ImageClassifier vocabulary).

Self-contained on purpose: this file is copied next to saved weights and imported with
``trust_remote_code=True`` where the hf_finetune package is not installed, so it may only
import torch / transformers.
"""

from transformers import PretrainedConfig, ResNetConfig

# mmcls ResNet.arch_settings: depth -> (block type, blocks per stage)
RESNET_ARCH = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
STYLES = ("pytorch", "caffe")
# mmpretrain loss names; the problem type (see `FinetuneResNetConfig`) says which targets they take.
LOSS_TYPES = ("CrossEntropyLoss", "LabelSmoothLoss", "FocalLoss", "AsymmetricLoss")
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
# ImageNet statistics on the 0-255 scale, RGB order (mmcls' ImageNet data_preprocessor).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
# transformers ResNetConfig keys that choose the architecture, at ResNetConfig's defaults (ResNet-50) ...
TRANSFORMERS_RESNET_ARCH_DEFAULTS = {
    "depths": [3, 4, 6, 3],
    "layer_type": "bottleneck",
    "hidden_sizes": [256, 512, 1024, 2048],
    "downsample_in_bottleneck": False,
}
# ... those whose value is the same in every ResNet we build ...
TRANSFORMERS_RESNET_FIXED = {"embedding_size": 64, "num_channels": 3, "hidden_act": "relu",
                             "downsample_in_first_stage": False}
# ... and those that say nothing about the classifier.
TRANSFORMERS_RESNET_BACKBONE_KEYS = ("stage_names", "out_features", "out_indices")
TRANSFORMERS_LOAD_HINT = "load such weights with load_from / init_cfg into a supported architecture"


def stage_widths(layer_type):
    """Output channels of the four stages (block expansion 1 for basic, 4 for bottleneck)."""
    expansion = 4 if layer_type == "bottleneck" else 1
    return [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]


def depth_from_transformers_keys(keys, depth=None):
    """(depth, style) of a transformers ResNetConfig's keys; ValueError naming the key we cannot build.

    Keys not given take ResNetConfig's defaults. An explicit `depth` must agree.
    """
    for key, value in TRANSFORMERS_RESNET_FIXED.items():
        if keys.get(key, value) != value:
            raise ValueError(f"{key}={keys[key]!r} cannot be built (ours is {value!r}); {TRANSFORMERS_LOAD_HINT}")
    values = {**TRANSFORMERS_RESNET_ARCH_DEFAULTS, **keys}
    depths, layer_type = list(values["depths"]), values["layer_type"]
    matches = [d for d, arch in RESNET_ARCH.items() if arch == (layer_type, tuple(depths))]
    if not matches:
        raise ValueError(f"depths={depths} with layer_type={layer_type!r} is not a ResNet depth we build "
                         f"({'/'.join(map(str, RESNET_ARCH))}); {TRANSFORMERS_LOAD_HINT}")
    mapped = matches[0]
    if list(values["hidden_sizes"]) != stage_widths(layer_type):
        raise ValueError(f"hidden_sizes={list(values['hidden_sizes'])} cannot be built (ResNet-{mapped} needs "
                         f"{stage_widths(layer_type)}); {TRANSFORMERS_LOAD_HINT}")
    if depth is not None and int(depth) != mapped:
        raise ValueError(f"depth={depth!r} contradicts depths={depths} (ResNet-{mapped}); give one of them")
    return mapped, "caffe" if values["downsample_in_bottleneck"] else "pytorch"


class FinetuneResNetConfig(PretrainedConfig):
    """ResNet backbone + global average pooling + linear head, with the input normalisation.

    Also accepts the keys of a transformers `ResNetConfig` (depths, layer_type, hidden_sizes,
    embedding_size, ...) in place of `depth`, so a `microsoft/resnet-*` folder loads; widths
    we cannot build raise one ValueError naming the key.

    Args:
        depth: 18, 34, 50, 101 or 152; unset, the transformers ResNet keys give it, else 50 (mmcls
            resnet50, the tutorial's model).
        style: "pytorch" (stride on the 3x3 conv) or "caffe" (stride on the first 1x1 conv).
        frozen_stages: -1 nothing frozen; 0 the stem; k the stem and stages 1..k.
        norm_eval: keep every BatchNorm layer in eval mode during training.
        zero_init_residual: zero the last BatchNorm gamma of each residual block at init.
        with_cp: checkpoint each trainable residual block during training (mmcls name), trading
            compute for activation memory; `gradient_checkpointing_enable()` sets the same.
        problem_type: "single_label_classification", "multi_label_classification" (multi-hot
            float labels) or "regression"; unset, it is inferred from the first labels as
            transformers' ResNetForImageClassification does.
        loss_type: mmpretrain loss name: "CrossEntropyLoss", "LabelSmoothLoss" (softmax cross
            entropy with `label_smoothing`), "FocalLoss" or "AsymmetricLoss" (sigmoid losses).
        use_sigmoid: CrossEntropyLoss(use_sigmoid=True): binary cross entropy per class, summed
            over classes and averaged over the batch (mmpretrain's multi-label loss). Without it a
            multi-label problem uses transformers' BCEWithLogitsLoss (mean over every element).
        label_smoothing: softmax cross entropy smoothing (single-label only).
        loss_weight: factor applied to the loss.
        focal_gamma, focal_alpha: FocalLoss gamma and alpha.
        asymmetric_gamma_pos, asymmetric_gamma_neg, asymmetric_clip: AsymmetricLoss gamma_pos,
            gamma_neg and clip.
        mean, std: per-channel statistics on the 0-255 scale used for uint8 input.
        to_rgb: flip the channel order of uint8 input before normalising.
        model_cfg: the recipe's `model` section, kept for reference.
    """

    model_type = "finetune_resnet"

    def __init__(
        self,
        depth=None,
        style="pytorch",
        frozen_stages=-1,
        norm_eval=False,
        zero_init_residual=True,
        with_cp=False,
        loss_type="CrossEntropyLoss",
        use_sigmoid=False,
        label_smoothing=0.0,
        loss_weight=1.0,
        focal_gamma=2.0,
        focal_alpha=0.25,
        asymmetric_gamma_pos=0.0,
        asymmetric_gamma_neg=4.0,
        asymmetric_clip=0.05,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        to_rgb=False,
        model_cfg=None,
        **kwargs,
    ):
        resnet_keys = (*TRANSFORMERS_RESNET_ARCH_DEFAULTS, *TRANSFORMERS_RESNET_FIXED)
        transformers_keys = {key: kwargs.pop(key) for key in resnet_keys if key in kwargs}
        for key in TRANSFORMERS_RESNET_BACKBONE_KEYS:
            kwargs.pop(key, None)
        if transformers_keys:
            depth, mapped_style = depth_from_transformers_keys(transformers_keys, depth)
            style = mapped_style if "downsample_in_bottleneck" in transformers_keys else style
        if depth is None:
            depth = 50  # every PretrainedConfig builds from its defaults: mmcls resnet50
        if depth not in RESNET_ARCH:
            raise ValueError(f"depth={depth!r} is not supported; expected one of {sorted(RESNET_ARCH)}")
        if style not in STYLES:
            raise ValueError(f"style={style!r} is not supported; expected one of {list(STYLES)}")
        if not -1 <= int(frozen_stages) <= len(RESNET_ARCH[depth][1]):
            raise ValueError(f"frozen_stages={frozen_stages!r} is out of range; expected -1..4")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={loss_type!r} is not supported; expected one of {list(LOSS_TYPES)}")
        if kwargs.get("problem_type") not in (None, *PROBLEM_TYPES):
            raise ValueError(f"problem_type={kwargs['problem_type']!r} is not supported; expected one of "
                             f"{list(PROBLEM_TYPES)} or None (inferred from the labels)")
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values each, got mean={mean} std={std}")

        self.depth = int(depth)
        self.style = style
        self.frozen_stages = int(frozen_stages)
        self.norm_eval = bool(norm_eval)
        self.zero_init_residual = bool(zero_init_residual)
        self.with_cp = bool(with_cp)
        self.loss_type = loss_type
        self.use_sigmoid = bool(use_sigmoid)
        self.label_smoothing = float(label_smoothing)
        self.loss_weight = float(loss_weight)
        self.focal_gamma = float(focal_gamma)
        self.focal_alpha = float(focal_alpha)
        self.asymmetric_gamma_pos = float(asymmetric_gamma_pos)
        self.asymmetric_gamma_neg = float(asymmetric_gamma_neg)
        self.asymmetric_clip = float(asymmetric_clip)
        self.mean = mean
        self.std = std
        self.to_rgb = bool(to_rgb)
        self.model_cfg = dict(model_cfg) if model_cfg else {}
        super().__init__(**kwargs)

    @property
    def hidden_sizes(self):
        """Output channels of the four stages, as ResNetConfig.hidden_sizes."""
        return stage_widths(RESNET_ARCH[self.depth][0])

    @property
    def feature_channels(self):
        return self.hidden_sizes[-1]

    def backbone_config(self):
        """The transformers ResNetConfig with the same architecture (also used by the native export)."""
        layer_type, depths = RESNET_ARCH[self.depth]
        return ResNetConfig(
            num_channels=3,
            embedding_size=64,
            hidden_sizes=self.hidden_sizes,
            depths=list(depths),
            layer_type=layer_type,
            hidden_act="relu",
            downsample_in_first_stage=False,
            # mmcls style='caffe' puts the stride on the first 1x1 conv of a bottleneck.
            downsample_in_bottleneck=self.style == "caffe",
        )


__all__ = ["FinetuneResNetConfig"]
