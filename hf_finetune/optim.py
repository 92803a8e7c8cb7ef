"""Optimizer and learning-rate schedule from the recipe, with mmcls/mmengine semantics.

* `build_optimizer`: `optim_wrapper.optimizer` (SGD, AdamW, Adam) over the trainable
  parameters only, with `paramwise_cfg` (custom_keys lr_mult/decay_mult, norm_decay_mult,
  bias_decay_mult) as mmengine's DefaultOptimWrapperConstructor applies them, and
  `layer_decay_rate` as mmpretrain's LearningRateDecayOptimWrapperConstructor (see
  `resnet_layer_depth`).
* `build_lr_scheduler`: `param_scheduler` (one or a list) as one per-update LambdaLR. Each
  scheduler acts on [begin, end) and holds its last value after `end`; several multiply.
  `by_epoch: true` schedulers change the LR at epoch boundaries only, exactly where mmengine
  steps them (milestones [15] -> the LR drops for the first update of epoch 15), unless
  `convert_to_iter_based: true` asks for a smooth per-update curve. `by_epoch: false` counts
  optimizer updates.
"""

import dataclasses
import math

import torch
from torch import nn

from .errors import RecipeError

OPTIMIZERS = {"SGD": torch.optim.SGD, "AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
               nn.modules.instancenorm._InstanceNorm)


# mmpretrain's table: (blocks of stage 2, blocks of stage 3) -> blocks per layer in them.
# ResNet-18 (2, 2) is not in mmpretrain's table; one block per layer gives it the same
# 8 layers as ResNet-50.
BLOCKS_PER_LAYER = {(4, 6): (2, 3), (4, 23): (2, 3), (8, 36): (4, 4), (24, 36): (4, 4),
                    (30, 48): (5, 6), (2, 2): (1, 1)}
STAGES_PREFIX = "backbone.encoder.stages."


def resnet_layer_depth(model):
    """(layer_id(parameter name), number of layers) of the ResNet classifier: mmpretrain's
    ResNet.get_layer_depth (no library has it for transformers' ResNet).

    Layers, from the input: the stem is layer 0, stage 1 is layer 1, stages 2 and 3 are split
    into groups of blocks (ResNet-50: 2 blocks of stage 2 per layer, 3 of stage 3), stage 4 is
    one layer and the head comes last: ResNet-50 has 8 layers. With layer decay a parameter of
    layer i trains at base_lr * layer_decay_rate ** (num_layers - 1 - i), the head at base_lr.
    """
    blocks = [len(stage.layers) for stage in model.backbone.encoder.stages]
    per_layer2, per_layer3 = BLOCKS_PER_LAYER[blocks[1], blocks[2]]  # the config allows these depths
    layers2, layers3 = math.ceil(blocks[1] / per_layer2), math.ceil(blocks[2] / per_layer3)
    stage4 = 2 + layers2 + layers3

    def layer_id(name):
        if not name.startswith("backbone."):
            return stage4 + 1  # head (and anything after the backbone)
        if not name.startswith(STAGES_PREFIX):
            return 0  # stem
        stage, _, block = name[len(STAGES_PREFIX):].split(".")[:3]
        stage, block = int(stage) + 1, int(block)
        if stage == 1:
            return 1
        if stage == 2:
            return 2 + block // per_layer2
        if stage == 3:
            return 2 + layers2 + block // per_layer3
        return stage4

    return layer_id, stage4 + 2


def layer_depth(model):
    """(layer_id, number of layers): our ResNet's (mmpretrain's table), or a Hub model's per
    family (models.hub_classifier.FAMILIES: embeddings 0, each stage or block, then the head)."""
    from .models import FinetuneResNetForImageClassification
    from .models.hub_classifier import layer_map

    if isinstance(model, FinetuneResNetForImageClassification):
        return resnet_layer_depth(model)
    layers = layer_map(model)
    if layers is None:
        raise RecipeError(f"optim_wrapper.paramwise_cfg.layer_decay_rate: {model.config.model_type!r} models have "
                          f"no layers defined for layer-wise LR decay; remove it (and the constructor)")
    return layers


def param_groups(model, base_lr, weight_decay, paramwise_cfg):
    """Trainable parameters grouped by their (layer, lr, weight decay) after paramwise rules.

    Weight decay: custom_keys first (the longest key that is a substring of the name), then
    norm layers (norm_decay_mult), then biases (bias_decay_mult). With layer_decay_rate (the
    config refuses lr_mult then) each group also has its "layer_id"."""
    custom_keys = paramwise_cfg.custom_keys
    # mmengine tries the longest key first (alphabetical among equal lengths).
    ordered_keys = sorted(sorted(custom_keys), key=len, reverse=True)
    norm_mult = paramwise_cfg.norm_decay_mult
    bias_mult = paramwise_cfg.bias_decay_mult

    module_of = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            module_of[full] = (module, param_name)

    decay_rate = paramwise_cfg.layer_decay_rate
    layer_of, num_layers = layer_depth(model) if decay_rate is not None else (None, None)

    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen stages never reach the optimizer
        lr_mult, decay_mult = 1.0, 1.0
        matched = next((k for k in ordered_keys if k in name), None)
        if matched is not None:
            lr_mult = custom_keys[matched].lr_mult
            decay_mult = custom_keys[matched].decay_mult
        else:
            module, short_name = module_of[name]
            if isinstance(module, NORM_LAYERS) and norm_mult is not None:
                decay_mult = norm_mult
            elif short_name == "bias" and bias_mult is not None:
                decay_mult = bias_mult
        group = {"lr": base_lr * lr_mult, "weight_decay": weight_decay * decay_mult}
        if layer_of is not None:
            group["layer_id"] = layer_of(name)
            group["lr"] *= decay_rate ** (num_layers - 1 - group["layer_id"])
        groups.setdefault(tuple(group.values()), dict(group, params=[]))["params"].append(param)
    return list(groups.values())


def build_optimizer(model, wrapper_cfg, lr=None):
    """optim_wrapper.optimizer over `model`'s trainable parameters; `lr` overrides the base
    LR (the batch-size-scaled one)."""
    cfg = wrapper_cfg.optimizer
    lr = cfg.lr if lr is None else lr
    # The config sets layer_decay_rate exactly with LearningRateDecayOptimWrapperConstructor.
    groups = param_groups(model, lr, cfg.weight_decay, wrapper_cfg.paramwise_cfg)
    if not groups:
        raise RecipeError("model.backbone.frozen_stages: every parameter is frozen, nothing to train")
    kwargs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
              if f.name not in ("type", "lr", "weight_decay")}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return OPTIMIZERS[cfg.type](groups, lr=lr, weight_decay=cfg.weight_decay, **kwargs)


# --- learning-rate schedule ------------------------------------------------------------------

INF = float("inf")


def _constant_factor(cfg, t, length):
    return cfg.factor if t < length - 1 else 1.0


def _linear_factor(cfg, t, length):
    start, end = cfg.start_factor, cfg.end_factor
    total = length - 1
    if total <= 0:
        return start
    return start + (end - start) * min(t, total) / total


def _multistep_factor(cfg, t, length):
    return cfg.gamma ** sum(1 for m in cfg.milestones if m <= t)


def _step_factor(cfg, t, length):
    return cfg.gamma ** (t // cfg.step_size)


def _cosine_factor(cfg, t, length, base_lr):
    t_max = cfg.T_max or length
    eta_min = base_lr * cfg.eta_min_ratio if cfg.eta_min_ratio is not None else cfg.eta_min
    lr = eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * t / t_max)) / 2
    return lr / base_lr


SCHEDULE_FACTORS = {
    "MultiStepLR": _multistep_factor,
    "StepLR": _step_factor,
    "CosineAnnealingLR": _cosine_factor,
    "LinearLR": _linear_factor,
    "ConstantLR": _constant_factor,
}
class Schedule:
    """One `param_scheduler` entry, expressed in optimizer updates."""

    def __init__(self, cfg, updates_per_epoch, max_updates):
        self.name = cfg.type
        # Epoch schedulers step once per epoch (mmengine) unless converted to per-update.
        self.unit = updates_per_epoch if cfg.by_epoch else 1
        self.begin = cfg.begin
        self.end = INF if cfg.end is None else cfg.end
        if cfg.by_epoch and cfg.convert_to_iter_based:
            # Counted in updates from here on: scale every epoch quantity.
            scaled = {key: getattr(cfg, key) * updates_per_epoch for key in ("T_max", "step_size")
                      if getattr(cfg, key, None)}
            if hasattr(cfg, "milestones"):
                scaled["milestones"] = [m * updates_per_epoch for m in cfg.milestones]
            cfg = dataclasses.replace(cfg, **scaled)
            self.begin *= updates_per_epoch
            self.end = self.end * updates_per_epoch if self.end != INF else INF
            self.unit = 1
        self.cfg = cfg
        # Length of the active range in this scheduler's own steps; an open end lasts
        # until training stops.
        total_steps = math.ceil(max_updates / self.unit)
        self.length = (self.end if self.end != INF else max(total_steps, self.begin + 1)) \
            - self.begin

    def factor(self, update, base_lr):
        step = update // self.unit
        if step < self.begin:
            return 1.0
        t = min(step - self.begin, self.length - 1)  # hold the last value after `end`
        fn = SCHEDULE_FACTORS[self.name]
        if self.name == "CosineAnnealingLR":
            return fn(self.cfg, t, self.length, base_lr)
        return fn(self.cfg, t, self.length)


def lr_factor_fn(schedulers, updates_per_epoch, max_updates, base_lr):
    """factor(update) for one parameter group whose initial LR is base_lr."""
    schedules = [Schedule(cfg, updates_per_epoch, max_updates) for cfg in schedulers]

    def factor(update):
        value = 1.0
        for schedule in schedules:
            value *= schedule.factor(update, base_lr)
        return value

    return factor


def build_lr_scheduler(optimizer, schedulers, updates_per_epoch, max_updates):
    """`param_scheduler` (typed entries) as one per-update LambdaLR."""
    lambdas = [lr_factor_fn(schedulers, updates_per_epoch, max_updates, group["lr"])
               for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
