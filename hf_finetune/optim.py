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

import math

import torch
from torch import nn

from .errors import RecipeError

OPTIMIZERS = {"SGD": torch.optim.SGD, "AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
               nn.modules.instancenorm._InstanceNorm)


def optimizer_settings(recipe):
    """(optimizer class, kwargs without lr, base lr) from optim_wrapper.optimizer."""
    cfg = dict(recipe.get("optim_wrapper", {}).get("optimizer") or {})
    name = cfg.pop("type", None)
    if name not in OPTIMIZERS:
        raise RecipeError(
            f"optim_wrapper.optimizer.type: unknown optimizer {name!r}; known: "
            f"{', '.join(OPTIMIZERS)}"
        )
    if "lr" not in cfg:
        raise RecipeError("optim_wrapper.optimizer.lr: missing; set the learning rate")
    lr = cfg.pop("lr")
    if lr <= 0:
        raise RecipeError(f"optim_wrapper.optimizer.lr: must be > 0, got {lr}")
    if "betas" in cfg:
        cfg["betas"] = tuple(cfg["betas"])
    return OPTIMIZERS[name], cfg, lr


def param_groups(model, base_lr, weight_decay, paramwise_cfg=None):
    """Trainable parameters grouped by their (lr, weight decay) after paramwise rules."""
    paramwise_cfg = paramwise_cfg or {}
    custom_keys = paramwise_cfg.get("custom_keys") or {}
    if not isinstance(custom_keys, dict):
        raise RecipeError("optim_wrapper.paramwise_cfg.custom_keys: expected an object "
                          "{name substring: {lr_mult, decay_mult}}")
    for key, value in custom_keys.items():
        unknown = set(value) - {"lr_mult", "decay_mult"} if isinstance(value, dict) else None
        if unknown is None or unknown:
            raise RecipeError(
                f"optim_wrapper.paramwise_cfg.custom_keys.{key}: expected an object with "
                f"lr_mult and/or decay_mult, got {value!r}"
            )
    # mmengine tries the longest key first (alphabetical among equal lengths).
    ordered_keys = sorted(sorted(custom_keys), key=len, reverse=True)
    norm_mult = paramwise_cfg.get("norm_decay_mult")
    bias_mult = paramwise_cfg.get("bias_decay_mult")

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
            lr_mult = custom_keys[matched].get("lr_mult", 1.0)
            decay_mult = custom_keys[matched].get("decay_mult", 1.0)
        else:
            module, short_name = module_of[name]
            if isinstance(module, NORM_LAYERS) and norm_mult is not None:
                decay_mult = norm_mult
            elif short_name == "bias" and bias_mult is not None:
                decay_mult = bias_mult
        key = (base_lr * lr_mult, weight_decay * decay_mult)
        groups.setdefault(key, []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()]


def build_optimizer(model, recipe, lr=None):
    """The recipe's optimizer over `model`'s trainable parameters; `lr` overrides the base LR
    (the batch-size-scaled one)."""
    cls, kwargs, base_lr = optimizer_settings(recipe)
    lr = base_lr if lr is None else lr
    weight_decay = kwargs.pop("weight_decay", 0.0)
    paramwise_cfg = recipe.get("optim_wrapper", {}).get("paramwise_cfg")
    groups = param_groups(model, lr, weight_decay, paramwise_cfg)
    if not groups:
        raise RecipeError(
            "model.backbone.frozen_stages: every parameter is frozen, nothing to train"
        )
    try:
        return cls(groups, lr=lr, weight_decay=weight_decay, **kwargs)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"optim_wrapper.optimizer: {e}") from None


# --- learning-rate schedule ------------------------------------------------------------------

INF = float("inf")


def _constant_factor(cfg, t, length):
    return cfg.get("factor", 1.0 / 3) if t < length - 1 else 1.0


def _linear_factor(cfg, t, length):
    start, end = cfg.get("start_factor", 1.0 / 3), cfg.get("end_factor", 1.0)
    total = length - 1
    if total <= 0:
        return start
    return start + (end - start) * min(t, total) / total


def _multistep_factor(cfg, t, length):
    return cfg.get("gamma", 0.1) ** sum(1 for m in cfg["milestones"] if m <= t)


def _step_factor(cfg, t, length):
    return cfg.get("gamma", 0.1) ** (t // cfg["step_size"])


def _cosine_factor(cfg, t, length, base_lr):
    t_max = cfg.get("T_max", length)
    if "eta_min_ratio" in cfg:
        eta_min = base_lr * cfg["eta_min_ratio"]
    else:
        eta_min = cfg.get("eta_min", 0.0)
    lr = eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * t / t_max)) / 2
    return lr / base_lr


SCHEDULE_FACTORS = {
    "MultiStepLR": _multistep_factor,
    "StepLR": _step_factor,
    "CosineAnnealingLR": _cosine_factor,
    "LinearLR": _linear_factor,
    "ConstantLR": _constant_factor,
}
REQUIRED = {"MultiStepLR": ("milestones",), "StepLR": ("step_size",)}


def scheduler_configs(recipe):
    schedulers = recipe.get("param_scheduler") or []
    return [schedulers] if isinstance(schedulers, dict) else list(schedulers)


class Schedule:
    """One `param_scheduler` entry, expressed in optimizer updates."""

    def __init__(self, cfg, index, updates_per_epoch, max_updates):
        where = f"param_scheduler.{index}" if index is not None else "param_scheduler"
        self.name = cfg.get("type")
        if self.name not in SCHEDULE_FACTORS:
            raise RecipeError(f"{where}.type: unknown scheduler {self.name!r}; known: "
                              f"{', '.join(SCHEDULE_FACTORS)}")
        for key in REQUIRED.get(self.name, ()):
            if key not in cfg:
                raise RecipeError(f"{where}.{key}: required by {self.name}")
        self.cfg = dict(cfg)
        by_epoch = cfg.get("by_epoch", True)
        # Epoch schedulers step once per epoch (mmengine) unless converted to per-update.
        self.unit = updates_per_epoch if by_epoch else 1
        self.smooth = by_epoch and cfg.get("convert_to_iter_based", False)
        self.begin = cfg.get("begin", 0)
        self.end = cfg.get("end", INF)
        if self.end <= self.begin:
            raise RecipeError(f"{where}.end: must be larger than begin ({self.begin}), "
                              f"got {self.end}")
        if self.smooth:
            # Counted in updates from here on: scale every epoch quantity.
            for key in ("T_max", "step_size"):
                if key in self.cfg:
                    self.cfg[key] *= updates_per_epoch
            if "milestones" in self.cfg:
                self.cfg["milestones"] = [m * updates_per_epoch for m in self.cfg["milestones"]]
            self.begin *= updates_per_epoch
            self.end = self.end * updates_per_epoch if self.end != INF else INF
            self.unit = 1
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


def lr_factor_fn(recipe, updates_per_epoch, max_updates, base_lr):
    """factor(update) for one parameter group whose initial LR is base_lr."""
    configs = scheduler_configs(recipe)
    single = isinstance(recipe.get("param_scheduler"), dict)
    schedules = [
        Schedule(cfg, None if single else i, updates_per_epoch, max_updates)
        for i, cfg in enumerate(configs)
    ]

    def factor(update):
        value = 1.0
        for schedule in schedules:
            value *= schedule.factor(update, base_lr)
        return value

    return factor


def build_lr_scheduler(optimizer, recipe, updates_per_epoch, max_updates):
    lambdas = [
        lr_factor_fn(recipe, updates_per_epoch, max_updates, group["lr"])
        for group in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
