"""Optimizer and learning-rate schedule from the recipe, with mmcls/mmengine semantics.

* `build_optimizer`: `optim_wrapper.optimizer` (SGD, AdamW, Adam) over the trainable
  parameters only, with `paramwise_cfg` (custom_keys lr_mult/decay_mult, norm_decay_mult,
  bias_decay_mult) as mmengine's DefaultOptimWrapperConstructor applies them.
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


def param_groups(model, base_lr, weight_decay, paramwise_cfg):
    """Trainable parameters grouped by their (lr, weight decay) after paramwise rules."""
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
        key = (base_lr * lr_mult, weight_decay * decay_mult)
        groups.setdefault(key, []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()]


def build_optimizer(model, wrapper_cfg, lr=None):
    """optim_wrapper.optimizer over `model`'s trainable parameters; `lr` overrides the base
    LR (the batch-size-scaled one)."""
    cfg, paramwise = wrapper_cfg.optimizer, wrapper_cfg.paramwise_cfg
    lr = cfg.lr if lr is None else lr
    if wrapper_cfg.constructor == "LearningRateDecayOptimWrapperConstructor":
        from .layer_decay import layer_decay_param_groups

        groups = layer_decay_param_groups(
            model, lr, cfg.weight_decay, paramwise.layer_decay_rate,
            custom_keys={k: {"decay_mult": v.decay_mult} for k, v in paramwise.custom_keys.items()},
            norm_decay_mult=paramwise.norm_decay_mult, bias_decay_mult=paramwise.bias_decay_mult)
    else:
        groups = param_groups(model, lr, cfg.weight_decay, paramwise)
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
