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
LOSS_TYPES = ("CrossEntropyLoss", "LabelSmoothLoss")
# ImageNet statistics on the 0-255 scale, RGB order (mmcls' ImageNet data_preprocessor).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


class FinetuneResNetConfig(PretrainedConfig):
    """ResNet backbone + global average pooling + linear head, with the input normalisation.

    Args:
        depth: 18, 34, 50, 101 or 152.
        style: "pytorch" (stride on the 3x3 conv) or "caffe" (stride on the first 1x1 conv).
        frozen_stages: -1 nothing frozen; 0 the stem; k the stem and stages 1..k.
        norm_eval: keep every BatchNorm layer in eval mode during training.
        zero_init_residual: zero the last BatchNorm gamma of each residual block at init.
        loss_type: "CrossEntropyLoss" or "LabelSmoothLoss" (both are label-smoothed cross entropy).
        label_smoothing: smoothing value in [0, 1).
        loss_weight: factor applied to the loss.
        mean, std: per-channel statistics on the 0-255 scale used for uint8 input.
        to_rgb: flip the channel order of uint8 input before normalising.
        model_cfg: the recipe's `model` section, kept for reference.
    """

    model_type = "finetune_resnet"

    def __init__(
        self,
        depth=50,
        style="pytorch",
        frozen_stages=-1,
        norm_eval=False,
        zero_init_residual=True,
        loss_type="CrossEntropyLoss",
        label_smoothing=0.0,
        loss_weight=1.0,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        to_rgb=False,
        model_cfg=None,
        **kwargs,
    ):
        if depth not in RESNET_ARCH:
            raise ValueError(f"depth={depth!r} is not supported; expected one of {sorted(RESNET_ARCH)}")
        if style not in STYLES:
            raise ValueError(f"style={style!r} is not supported; expected one of {list(STYLES)}")
        if not -1 <= int(frozen_stages) <= len(RESNET_ARCH[depth][1]):
            raise ValueError(f"frozen_stages={frozen_stages!r} is out of range; expected -1..4")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={loss_type!r} is not supported; expected one of {list(LOSS_TYPES)}")
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 1)")
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values each, got mean={mean} std={std}")
        if min(std) <= 0:
            raise ValueError(f"std values must be positive, got {std}")

        self.depth = int(depth)
        self.style = style
        self.frozen_stages = int(frozen_stages)
        self.norm_eval = bool(norm_eval)
        self.zero_init_residual = bool(zero_init_residual)
        self.loss_type = loss_type
        self.label_smoothing = float(label_smoothing)
        self.loss_weight = float(loss_weight)
        self.mean = mean
        self.std = std
        self.to_rgb = bool(to_rgb)
        self.model_cfg = dict(model_cfg) if model_cfg else {}
        super().__init__(**kwargs)

    @property
    def hidden_sizes(self):
        """Output channels of the four stages (block expansion 1 for basic, 4 for bottleneck)."""
        layer_type, _ = RESNET_ARCH[self.depth]
        expansion = 4 if layer_type == "bottleneck" else 1
        return [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]

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
