"""Layer-wise learning-rate decay for the ResNet classifier: mmpretrain's
LearningRateDecayOptimWrapperConstructor with its ResNet.get_layer_depth.

Layers, from the input: the stem is layer 0, stage 1 is layer 1, stages 2 and 3 are split
into groups of blocks (ResNet-50: 2 blocks of stage 2 per layer, 3 of stage 3), stage 4 is
one layer and the head comes last. ResNet-50 thus has 8 layers: stem, stage 1, stage 2
(x2), stage 3 (x2), stage 4, head. A parameter of layer i gets

    lr = base_lr * layer_decay_rate ** (num_layers - 1 - i)

so the head trains at base_lr and each layer below it at `layer_decay_rate` times the
next one. Weight decay follows paramwise_cfg as mmpretrain applies it with layer decay:
custom_keys (decay_mult only), then norm layers (norm_decay_mult), then biases
(bias_decay_mult), then any other 1-d parameter (flat_decay_mult). Frozen parameters are
left out.
"""

import math
import numbers

from .errors import RecipeError
from .optim import NORM_LAYERS

# mmpretrain's table: (blocks of stage 2, blocks of stage 3) -> blocks per layer in them.
# ResNet-18 (2, 2) is not in mmpretrain's table; one block per layer gives it the same
# 8 layers as ResNet-50.
BLOCKS_PER_LAYER = {(4, 6): (2, 3), (4, 23): (2, 3), (8, 36): (4, 4), (24, 36): (4, 4),
                    (30, 48): (5, 6), (2, 2): (1, 1)}
STAGES_PREFIX = "backbone.encoder.stages."


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class ResNetLayerDepth:
    """layer_id(param_name) for the ResNet classifier, and num_layers (the head included)."""

    def __init__(self, stage_blocks, key="optim_wrapper.paramwise_cfg.layer_decay_rate"):
        blocks = tuple(stage_blocks[1:3])
        if len(stage_blocks) != 4 or blocks not in BLOCKS_PER_LAYER:
            raise RecipeError(f"{key}: layer decay supports ResNet-18/34/50/101/152 stages, "
                              f"got blocks per stage {tuple(stage_blocks)}")
        self.per_layer2, self.per_layer3 = BLOCKS_PER_LAYER[blocks]
        self.layers2 = math.ceil(stage_blocks[1] / self.per_layer2)
        self.layers3 = math.ceil(stage_blocks[2] / self.per_layer3)
        self.stage4 = 2 + self.layers2 + self.layers3
        self.num_layers = self.stage4 + 2  # + the head

    def __call__(self, param_name):
        if not param_name.startswith("backbone."):
            return self.num_layers - 1  # head (and anything after the backbone)
        if not param_name.startswith(STAGES_PREFIX):
            return 0  # stem
        stage, _, block = param_name[len(STAGES_PREFIX):].split(".")[:3]
        stage, block = int(stage) + 1, int(block)
        if stage == 1:
            return 1
        if stage == 2:
            return 2 + block // self.per_layer2
        if stage == 3:
            return 2 + self.layers2 + block // self.per_layer3
        return self.stage4


def _decay_mults(custom_keys, key):
    """custom_keys -> {name substring: decay_mult}; lr_mult has no meaning with layer decay."""
    custom_keys = custom_keys or {}
    if not isinstance(custom_keys, dict):
        raise RecipeError(f"{key}.custom_keys: expected an object {{name substring: "
                          f"{{decay_mult}}}}, got {custom_keys!r}")
    mults = {}
    for name, value in custom_keys.items():
        if (not isinstance(value, dict) or set(value) - {"decay_mult"}
                or not _is_number(value.get("decay_mult", 1.0))):
            raise RecipeError(f"{key}.custom_keys.{name}: with layer_decay_rate only "
                              f"decay_mult is accepted (the layer sets the LR), got {value!r}")
        mults[name] = float(value.get("decay_mult", 1.0))
    return mults


def layer_decay_param_groups(model, base_lr, weight_decay, layer_decay_rate, *, custom_keys=None,
                             norm_decay_mult=None, bias_decay_mult=None, flat_decay_mult=None,
                             key="optim_wrapper.paramwise_cfg"):
    """Optimizer parameter groups, one per (layer, weight decay), each with "lr",
    "weight_decay" and "layer_id"; trainable parameters only."""
    if not _is_number(layer_decay_rate) or layer_decay_rate <= 0:
        raise RecipeError(f"{key}.layer_decay_rate: expected a number > 0, got {layer_decay_rate!r}")
    for name, mult in (("norm_decay_mult", norm_decay_mult), ("bias_decay_mult", bias_decay_mult),
                       ("flat_decay_mult", flat_decay_mult)):
        if mult is not None and (not _is_number(mult) or mult < 0):
            raise RecipeError(f"{key}.{name}: expected a number >= 0, got {mult!r}")
    decay_mults = _decay_mults(custom_keys, key)
    # mmengine's order: the longest key first, alphabetical among equal lengths.
    ordered_keys = sorted(sorted(decay_mults), key=len, reverse=True)
    stages = model.backbone.encoder.stages
    depth = ResNetLayerDepth([len(stage.layers) for stage in stages], f"{key}.layer_decay_rate")

    groups = {}
    for module_name, module in model.named_modules():
        for short_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue  # frozen stages never reach the optimizer
            name = f"{module_name}.{short_name}" if module_name else short_name
            custom = next((k for k in ordered_keys if k in name), None)
            if custom is not None:
                mult = decay_mults[custom]
            elif isinstance(module, NORM_LAYERS) and norm_decay_mult is not None:
                mult = norm_decay_mult
            elif short_name == "bias" and bias_decay_mult is not None:
                mult = bias_decay_mult
            elif param.ndim == 1 and flat_decay_mult is not None:
                mult = flat_decay_mult
            else:
                mult = 1.0
            layer_id = depth(name)
            group = groups.setdefault((layer_id, weight_decay * mult), {
                "params": [],
                "lr": base_lr * layer_decay_rate ** (depth.num_layers - 1 - layer_id),
                "weight_decay": weight_decay * mult,
                "layer_id": layer_id,
            })
            group["params"].append(param)
    if not groups:
        raise RecipeError("model.backbone.frozen_stages: every parameter is frozen, nothing to train")
    return list(groups.values())
