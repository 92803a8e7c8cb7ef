"""Trainer assembly: batch sizes and TrainingArguments from the recipe, then build_trainer.

Which key wins: the mmcls sections own their settings. A `training_args` field that one of
them already sets (see OWNED_FIELDS) is rejected with the key to use instead, so nothing is
silently overridden; every other TrainingArguments field passes through untouched.
"""

import logging
import math
import os
import random
from dataclasses import dataclass

import torch
from transformers import TrainingArguments, set_seed

from .errors import RecipeError, TrainingError
from .optim import optimizer_settings
from .trainer import EvalMetrics, FinetuneTrainer, topk_of

logger = logging.getLogger("hf_finetune")

# TrainingArguments fields derived from mmcls sections -> the recipe key to set instead.
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
# Hub settings are handled by hf_finetune.hub after training (the token never reaches the
# Trainer, so it is never written into training_args.bin).
HUB_FIELDS = ("push_to_hub", "hub_model_id", "hub_private_repo", "hub_strategy", "hub_token")



# --- batch size ---------------------------------------------------------------------------


@dataclass
class BatchPlan:
    world_size: int
    per_device: int
    accumulation: int
    total: int
    per_device_eval: int
    lr: float
    base_lr: float


def world_size():
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def plan_batches(recipe, num_processes=None):
    """Per-device batch from the recipe's total batch, so 1 or 8 processes optimise alike."""
    world = num_processes or world_size()
    accumulation = recipe.get("optim_wrapper", {}).get("accumulative_counts", 1)
    if accumulation < 1:
        raise RecipeError(f"optim_wrapper.accumulative_counts: must be >= 1, got {accumulation}")
    total = recipe.get("train_cfg", {}).get("total_batch_size")
    loader = recipe.get("train_dataloader", {})
    if total is not None:
        if total < 1 or total % (world * accumulation):
            raise RecipeError(
                f"train_cfg.total_batch_size: {total} is not divisible by {world} process(es) "
                f"x {accumulation} accumulation step(s); choose a multiple of "
                f"{world * accumulation}, or set it to null to use train_dataloader.batch_size "
                f"per device"
            )
        per_device = total // (world * accumulation)
        # The tutorial's one-GPU edit sets val batch = train batch; do the same.
        per_device_eval = per_device
    else:
        if "batch_size" not in loader:
            raise RecipeError("train_dataloader.batch_size: missing (or set train_cfg.total_batch_size)")
        per_device = loader["batch_size"]
        total = per_device * world * accumulation
        per_device_eval = recipe.get("val_dataloader", {}).get("batch_size", per_device)
    if per_device < 1:
        raise RecipeError(f"train_dataloader.batch_size: must be >= 1, got {per_device}")

    _, _, base_lr = optimizer_settings(recipe)
    lr = base_lr
    scale = recipe.get("auto_scale_lr") or {}
    if scale.get("enable"):
        base_batch = scale.get("base_batch_size")
        if not base_batch:
            raise RecipeError("auto_scale_lr.base_batch_size: required when auto_scale_lr is on")
        lr = base_lr * total / base_batch
    return BatchPlan(world, per_device, accumulation, total, per_device_eval, lr, base_lr)


def updates_per_epoch(num_samples, plan, drop_last=False):
    """Optimizer updates per epoch, counted the way Trainer and accelerate count them."""
    batches = num_samples // plan.per_device if drop_last else math.ceil(num_samples / plan.per_device)
    per_rank = math.ceil(batches / plan.world_size)
    return max(math.ceil(per_rank / plan.accumulation), 1)


# --- TrainingArguments -----------------------------------------------------------------------


def check_training_args(recipe):
    extra = dict(recipe.get("training_args") or {})
    for key in extra:
        if key in OWNED_FIELDS:
            raise RecipeError(
                f"training_args.{key}: set by the recipe's {OWNED_FIELDS[key]}; set it there"
            )
    return {k: v for k, v in extra.items() if k not in HUB_FIELDS}


def resolve_seed(recipe):
    seed = (recipe.get("randomness") or {}).get("seed")
    if seed is None:
        # mmengine draws a seed when none is set; record it so the run can be repeated.
        seed = random.SystemRandom().randrange(2**31)
        recipe.setdefault("randomness", {})["seed"] = seed
    return seed


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def log_level(recipe):
    """transformers' log level for the recipe's: INFO keeps our progress lines and the
    Trainer's warnings; DEBUG shows everything the Trainer says."""
    level = str(recipe.get("log_level") or "info").lower()
    if level not in LOG_LEVELS:
        raise RecipeError(f"log_level: unknown {recipe.get('log_level')!r}; known: "
                          f"{', '.join(l.upper() for l in LOG_LEVELS)}")
    logger.setLevel(level.upper())
    return "info" if level == "debug" else "warning" if level == "info" else level


def make_training_args(recipe, plan):
    extra = check_training_args(recipe)
    train_cfg = recipe.get("train_cfg", {})
    hooks = recipe.get("default_hooks", {})
    loader = recipe.get("train_dataloader", {})
    wrapper = recipe.get("optim_wrapper", {})
    optimizer = wrapper.get("optimizer", {})
    cuda = torch.cuda.is_available()

    args = dict(
        output_dir=recipe["work_dir"],
        per_device_train_batch_size=plan.per_device,
        per_device_eval_batch_size=plan.per_device_eval,
        gradient_accumulation_steps=plan.accumulation,
        learning_rate=plan.lr,
        weight_decay=optimizer.get("weight_decay", 0.0),
        seed=resolve_seed(recipe),
        full_determinism=(recipe.get("randomness") or {}).get("deterministic", False),
        remove_unused_columns=False,
        logging_steps=hooks.get("logger", {}).get("interval", 100),
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss must be seen, not filtered out
        max_grad_norm=0.0,  # mmcls clips only when clip_grad is set
        report_to="none",
        disable_tqdm=False,
        dataloader_num_workers=loader.get("num_workers", 0),
        dataloader_pin_memory=loader.get("pin_memory", cuda),
        dataloader_persistent_workers=loader.get("persistent_workers", loader.get("num_workers", 0) > 0),
        dataloader_prefetch_factor=loader.get("prefetch_factor") if loader.get("num_workers", 0) > 0 else None,
        dataloader_drop_last=loader.get("drop_last", False),
        log_level=log_level(recipe),
    )

    clip = wrapper.get("clip_grad")
    if clip:
        if clip.get("norm_type", 2) != 2:
            raise RecipeError("optim_wrapper.clip_grad.norm_type: only 2 is supported")
        args["max_grad_norm"] = clip["max_norm"]

    if wrapper.get("type") == "AmpOptimWrapper":
        dtype = wrapper.get("dtype", "float16")
        if dtype in ("bfloat16", "bf16"):
            args["bf16"] = True
        elif dtype in ("float16", "fp16"):
            if not cuda:
                raise RecipeError("optim_wrapper.dtype: float16 mixed precision needs a GPU; "
                                  "use \"bfloat16\" on CPU")
            args["fp16"] = True
        else:
            raise RecipeError(f"optim_wrapper.dtype: unknown {dtype!r}; use float16 or bfloat16")

    # Length of training.
    if train_cfg.get("by_epoch", True):
        args["num_train_epochs"] = train_cfg.get("max_epochs", 1)
    else:
        if "max_iters" not in train_cfg:
            raise RecipeError("train_cfg.max_iters: required when train_cfg.by_epoch is false")
        args["max_steps"] = train_cfg["max_iters"]

    # Evaluation and checkpoints go by updates; set_intervals fills in the counts once the
    # dataset size (so the updates per epoch) is known.
    val_interval = train_cfg.get("val_interval", 1)
    evaluate = bool(val_interval and val_interval > 0 and recipe.get("val_dataloader"))
    args["eval_strategy"] = "steps" if evaluate else "no"
    args["eval_steps"] = 1
    checkpoint = hooks.get("checkpoint", {})
    interval = checkpoint.get("interval", 1)
    args["save_strategy"] = "steps" if interval and interval > 0 else "no"
    args["save_steps"] = 1
    keep = checkpoint.get("max_keep_ckpts", 3)
    args["save_total_limit"] = None if keep is None or keep < 0 else max(keep, 1)
    save_best = checkpoint.get("save_best", "auto")
    if save_best and evaluate:
        metric = "accuracy_top1" if save_best in ("auto", "accuracy/top1", "accuracy_top1") \
            else save_best.replace("/", "_")
        args["metric_for_best_model"] = metric
        args["greater_is_better"] = checkpoint.get("rule", "greater") != "less"

    if not has_accelerator():
        # No GPU: say so explicitly. With several processes, use_cpu is what makes them one
        # gloo job instead of N trainings that ignore each other; it also allows bf16 on CPU.
        args["use_cpu"] = True
        if world_size() > 1:
            args["ddp_backend"] = "gloo"

    if torch.cuda.is_available() and args["dataloader_pin_memory"]:
        # Pinned batches can be copied while the previous step still runs on the GPU.
        args["accelerator_config"] = {"non_blocking": True}

    args.update(extra)
    try:
        training_args = TrainingArguments(**args)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"training_args: {e}") from None
    check_distributed(training_args)
    return training_args


def set_intervals(training_args, recipe, steps_per_epoch):
    """val_interval and checkpoint interval, in epochs (or iterations), as update counts."""
    train_cfg = recipe.get("train_cfg", {})
    checkpoint = recipe.get("default_hooks", {}).get("checkpoint", {})
    by_epoch = train_cfg.get("by_epoch", True)
    training_args.eval_steps = train_cfg.get("val_interval", 1) * (steps_per_epoch if by_epoch else 1)
    training_args.save_steps = checkpoint.get("interval", 1) * (
        steps_per_epoch if checkpoint.get("by_epoch", by_epoch) else 1)


def has_accelerator():
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return (torch.cuda.is_available() or bool(mps and mps.is_available())
            or bool(xpu and xpu.is_available()))


def check_distributed(training_args):
    """Every launcher sets WORLD_SIZE; the Trainer must see the same number of processes."""
    expected = world_size()
    if training_args.world_size != expected:
        raise TrainingError(
            f"launched {expected} processes but the Trainer runs {training_args.world_size} "
            f"(device {training_args.device}); each process would train alone. On a machine "
            f"without GPUs use `accelerate launch --multi_gpu --num_processes N` (gloo on CPU)."
        )


def build_trainer(recipe, datasets=None, model=None, callbacks=None):
    """A FinetuneTrainer wired from the recipe: data, model, optimizer, schedule, metrics."""
    from .data import build_datasets, label_names
    from .models import build_model

    plan = plan_batches(recipe)
    args = make_training_args(recipe, plan)  # also sets up the processes
    set_seed(args.seed)  # model initialisation and data order repeat per seed
    # One process downloads and converts first; the others then read its cache.
    with args.main_process_first(desc="preparing datasets and model"):
        if datasets is None:
            datasets = build_datasets(recipe)
        names = label_names(datasets)
        if model is None:
            model = build_model(recipe, id2label=dict(enumerate(names)))
    num_classes = model.config.num_labels
    if num_classes != len(names):
        raise RecipeError(
            f"model.head.num_classes: the recipe says {num_classes} classes but the dataset "
            f"has {len(names)} labels; set model.head.num_classes={len(names)}"
        )
    datasets["val"]._hf_finetune_section = "val_dataloader"
    datasets["test"]._hf_finetune_section = "test_dataloader"

    steps = updates_per_epoch(len(datasets["train"]), plan,
                              recipe.get("train_dataloader", {}).get("drop_last", False))
    set_intervals(args, recipe, steps)
    channels_last = (recipe.get("env_cfg") or {}).get("channels_last", torch.cuda.is_available())
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if (recipe.get("env_cfg") or {}).get("cudnn_benchmark"):
        torch.backends.cudnn.benchmark = True

    topk, rank_k = topk_of(recipe, num_classes)
    metrics = EvalMetrics(topk, num_classes)

    def ranked_classes(logits, labels):
        # Keep only the best k class indices per sample: less to gather across processes.
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits.topk(rank_k, dim=-1).indices

    trainer = FinetuneTrainer(
        model=model,
        args=args,
        train_dataset=datasets["train"],
        eval_dataset=datasets["val"],
        compute_metrics=metrics,
        preprocess_logits_for_metrics=ranked_classes,
        callbacks=callbacks,
        recipe=recipe,
        plan=plan,
    )
    trainer.metrics_fn = metrics
    hub_args = recipe.get("training_args") or {}
    if hub_args.get("push_to_hub") and hub_args.get("hub_strategy") in ("every_save", "checkpoint"):
        from . import hub

        trainer.add_callback(hub.PushOnSaveCallback(
            hub_repo_id(recipe), hub_args.get("hub_token"), bool(hub_args.get("hub_private_repo")),
            strategy=hub_args["hub_strategy"]))
    trainer.datasets = datasets
    log_plan(plan, args, steps, len(datasets["train"]))
    return trainer


def log_plan(plan, args, steps, num_train):
    if args.process_index != 0:
        return
    logger.info(
        "batch: %d total = %d per device x %d process(es) x %d accumulation; lr %.6g%s; "
        "%d training images, %d updates per epoch; seed %d",
        plan.total, plan.per_device, plan.world_size, plan.accumulation, plan.lr,
        f" (scaled from {plan.base_lr:.6g})" if plan.lr != plan.base_lr else "",
        num_train, steps, args.seed,
    )


def hub_repo_id(recipe):
    args = recipe.get("training_args") or {}
    return args.get("hub_model_id") or os.path.basename(os.path.normpath(recipe["work_dir"]))
