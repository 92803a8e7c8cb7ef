"""Trainer assembly: the batch plan, TrainingArguments from the config, then build_trainer.

Which key wins: the mmcls sections own their settings; `training_args` fields that one of
them sets are refused by the config (config.OWNED_FIELDS), every other field passes through.
"""

import dataclasses
import logging
import math
import os
import random
from dataclasses import dataclass

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, get_int_from_env
from transformers import TrainingArguments, set_seed

from . import logs
from .config import Step, report_to, resolved_work_dir, to_data
from .devices import accelerator
from .errors import RecipeError, TrainingError
from .metrics import metric_key
from .trainer import FinetuneTrainer, topk_of

logger = logging.getLogger("hf_finetune")


def process_state():
    """accelerate's view of this process (rank, world size); on a machine without GPUs the
    processes form one gloo (CPU) group, as TrainingArguments(use_cpu=True) sets up too."""
    cpu = accelerator() is None
    return PartialState(cpu=cpu, **({"backend": "gloo"} if cpu and _launched_processes() > 1 else {}))


def _launched_processes():
    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"], 1)


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


def plan_batches(cfg, world_size):
    """Per-device batch from the recipe's total batch, so 1 or 8 processes optimise alike."""
    accumulation = cfg.optim_wrapper.accumulative_counts
    total = cfg.train_cfg.total_batch_size
    if total is not None:
        if total % (world_size * accumulation):
            raise RecipeError(
                f"train_cfg.total_batch_size: {total} is not divisible by {world_size} process(es) "
                f"x {accumulation} accumulation step(s); choose a multiple of "
                f"{world_size * accumulation}, or set it to null to use train_dataloader.batch_size "
                f"per device"
            )
        per_device = total // (world_size * accumulation)
        per_device_eval = per_device  # the tutorial's one-GPU edit sets val batch = train batch
    else:
        per_device = cfg.train_dataloader.batch_size
        total = per_device * world_size * accumulation
        per_device_eval = (cfg.val_dataloader.batch_size if cfg.val_dataloader else None) or per_device
    base_lr = cfg.optim_wrapper.optimizer.lr
    lr = base_lr
    if cfg.auto_scale_lr.enable:
        lr = base_lr * total / cfg.auto_scale_lr.base_batch_size
    return BatchPlan(world_size, per_device, accumulation, total, per_device_eval, lr, base_lr)


def updates_per_epoch(num_samples, plan, drop_last=False, streamed=False):
    """Optimizer updates per epoch, counted the way Trainer and accelerate count them.
    streamed: a streamed split, whose epoch is this many whole updates of full batches."""
    batches = num_samples // plan.per_device if drop_last else math.ceil(num_samples / plan.per_device)
    if not drop_last and not streamed and plan.per_device > 1 and num_samples % plan.per_device == 1:
        batches -= 1  # the loader drops a last batch of one image (see EpochSeededBatchSampler)
    per_rank = math.ceil(batches / plan.world_size)
    return max(math.ceil(per_rank / plan.accumulation), 1)


# --- TrainingArguments -----------------------------------------------------------------------


# report_to name -> (transformers' availability check, what to install)
INTEGRATIONS = {"tensorboard": ("is_tensorboard_available", '"hf_finetune[tensorboard]"'),
                "wandb": ("is_wandb_available", "wandb"), "mlflow": ("is_mlflow_available", "mlflow")}


def check_integrations(report_to):
    """One line instead of the Trainer's traceback when a logging integration is not installed."""
    from transformers import integrations

    for name in [report_to] if isinstance(report_to, str) else report_to:
        check, package = INTEGRATIONS.get(name, (None, None))
        if check and not getattr(integrations, check)():
            raise RecipeError(f"visualizer / training_args.report_to: {name} is not installed; "
                              f"pip install {package}")


def resolve_seed(cfg, state, recorded=None):
    """cfg with a seed: the recipe's, or, as mmengine does when none is set, one drawn by the
    main process and sent to the others (its sync_random_seed), so every rank trains with it
    and the saved recipe records it. recorded: the seed of the run being resumed (outputs.
    recorded_seed), used instead of drawing one, as mmengine restores it from its checkpoint,
    so data order and augmentation continue that run's. Call it once per run, on every process."""
    if cfg.randomness.seed is not None:
        return cfg
    seed = broadcast_object_list([random.SystemRandom().randrange(2**31) if recorded is None else recorded])[0]
    return dataclasses.replace(cfg, randomness=dataclasses.replace(cfg.randomness, seed=seed))


def transformers_log_level(cfg):
    """INFO keeps our progress lines and the Trainer's warnings; DEBUG shows all it says."""
    level = cfg.log_level.lower()
    logger.setLevel(level.upper())
    return "info" if level == "debug" else "warning" if level == "info" else level


def build_training_args(cfg, plan, steps_per_epoch=1, validate=True):
    """TrainingArguments from the config; evaluation and checkpoint intervals in updates.
    validate: whether a val split is there to evaluate during training."""
    train, hooks = cfg.train_cfg, cfg.default_hooks
    loader, wrapper = cfg.train_dataloader, cfg.optim_wrapper
    cuda = torch.cuda.is_available()
    evaluate = validate and cfg.val_dataloader is not None
    checkpoint = hooks.checkpoint
    ckpt_by_epoch = train.by_epoch if checkpoint.by_epoch is None else checkpoint.by_epoch
    pin_memory = cuda if loader.pin_memory is None else loader.pin_memory
    args = dict(
        output_dir=resolved_work_dir(cfg),
        per_device_train_batch_size=plan.per_device,
        per_device_eval_batch_size=plan.per_device_eval,
        gradient_accumulation_steps=plan.accumulation,
        learning_rate=plan.lr,
        weight_decay=wrapper.optimizer.weight_decay,
        seed=cfg.randomness.seed,
        full_determinism=cfg.randomness.deterministic,
        remove_unused_columns=False,
        logging_steps=hooks.logger.interval,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss must be seen, not filtered out
        max_grad_norm=wrapper.clip_grad.max_norm if wrapper.clip_grad else 0.0,  # mmcls clips only when asked
        report_to=report_to(cfg),
        disable_tqdm=logs.progress_bars_disabled(),
        restore_callback_states_from_checkpoint=True,  # early-stopping counters on resume
        dataloader_num_workers=loader.num_workers,
        dataloader_pin_memory=pin_memory,
        dataloader_persistent_workers=loader.keep_workers(),
        dataloader_prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
        dataloader_drop_last=loader.drop_last,
        log_level=transformers_log_level(cfg),
        eval_strategy="steps" if evaluate else "no",
        eval_steps=train.val_interval * (steps_per_epoch if train.by_epoch else 1),
        save_strategy="steps" if checkpoint.interval > 0 else "no",
        save_steps=max(checkpoint.interval, 1) * (steps_per_epoch if ckpt_by_epoch else 1),
        save_total_limit=None if checkpoint.max_keep_ckpts < 0 else checkpoint.max_keep_ckpts,
    )
    if cfg.model.with_cp:
        # The Trainer calls model.gradient_checkpointing_enable(); transformers 5 renames the field.
        renamed = "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
        args["activation_checkpointing" if renamed else "gradient_checkpointing"] = True
    if train.by_epoch:
        args["num_train_epochs"] = train.max_epochs
    else:
        args["max_steps"] = train.max_iters
    best = cfg.best_metric() if evaluate else None
    if best:
        args["metric_for_best_model"], args["greater_is_better"] = metric_key(best[0]), best[1] == "greater"
    if wrapper.type == "AmpOptimWrapper":
        if wrapper.dtype in ("bfloat16", "bf16"):
            args["bf16"] = True
        elif not cuda:
            raise RecipeError("optim_wrapper.dtype: float16 mixed precision needs a GPU; "
                              "use \"bfloat16\" on CPU")
        else:
            args["fp16"] = True
    if accelerator() is None:
        # No GPU: with several processes, use_cpu is what makes them one gloo job instead of
        # N trainings that ignore each other; it also allows bf16 on CPU.
        args["use_cpu"] = True
        if _launched_processes() > 1:
            args["ddp_backend"] = "gloo"
    if cuda and pin_memory:
        # Pinned batches can be copied while the previous step still runs on the GPU.
        args["accelerator_config"] = {"non_blocking": True}
    args.update(cfg.training_args)
    if not evaluate:  # --eval-only: no validation, so no best checkpoint to pick
        args.pop("load_best_model_at_end", None)
    check_integrations(args["report_to"])
    try:
        training_args = TrainingArguments(**args)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"training_args: {e}") from None
    if training_args.world_size != _launched_processes():
        raise TrainingError(
            f"launched {_launched_processes()} processes but the Trainer runs "
            f"{training_args.world_size} (device {training_args.device}); each process would "
            f"train alone. On a machine without GPUs use `accelerate launch --multi_gpu "
            f"--num_processes N` (gloo on CPU)."
        )
    return training_args


# --- the Trainer ------------------------------------------------------------------------------


def evaluation_metrics(cfg, num_classes):
    """(compute_metrics, preprocess_logits_for_metrics) for the head: top-k accuracy and the
    SingleLabelMetric evaluators, or mmpretrain's multi-label metrics."""
    from .metrics import MultiLabelMetrics, SingleLabelMetrics, multilabel_scores, ranked_classes

    if cfg.model.multi_label:
        thr, topk = cfg.multi_label_decision()
        return MultiLabelMetrics(thr=thr, topk=topk), multilabel_scores
    topk, rank_k = topk_of(cfg, num_classes)
    return SingleLabelMetrics(topk, num_classes, cfg.single_label_metrics()), ranked_classes(rank_k)


def build_trainer(cfg, datasets=None, model=None, callbacks=None):
    """A FinetuneTrainer wired from the config; datasets and model are built when not given."""
    from .data import StreamingSplit, build_datasets, label_names
    from .models import build_model

    state = process_state()
    cfg = resolve_seed(cfg, state)
    cfg = with_model_preprocessing(cfg)
    plan = plan_batches(cfg, state.num_processes)
    set_seed(cfg.randomness.seed)  # model initialisation and data order repeat per seed
    # One process downloads and converts first; the others then read its cache.
    with state.main_process_first():
        if datasets is None:
            datasets = build_datasets(cfg)
        names = label_names(datasets)
        if model is None:
            model = build_model(cfg.model, cfg.data_preprocessor, dict(enumerate(names)),
                                load_from=cfg.load_from)
    # Every process records the images on_corrupt="skip" leaves out, in one file of the work dir.
    from .data.build import batch_transform
    from .data.runtime import SKIPPED_IMAGES_FILE

    for split in datasets.values():
        transform = batch_transform(split)
        if transform is not None:
            transform.skip_log = os.path.join(resolved_work_dir(cfg), SKIPPED_IMAGES_FILE)
    if model.config.num_labels != len(names):
        raise RecipeError(
            f"{cfg.model.key('num_classes')}: the model has {model.config.num_labels} classes but the "
            f"dataset has {len(names)} labels; set {cfg.model.key('num_classes')}={len(names)}")
    steps = updates_per_epoch(len(datasets["train"]), plan, cfg.train_dataloader.drop_last,
                              streamed=isinstance(datasets["train"], StreamingSplit)) if "train" in datasets else 1
    args = build_training_args(cfg, plan, steps, validate="val" in datasets)
    loss_fn = None
    if cfg.model.type != "ImageClassifier":
        from .models.hub_classifier import loss_function

        check_hub_model(model, args, datasets)
        loss_fn = loss_function(cfg.model, model.config.num_labels)
    model = sync_batchnorm(model, cfg.sync_bn, state.num_processes, accelerator())
    if cfg.env_cfg.channels_last and convolutional(model):
        model = model.to(memory_format=torch.channels_last)
    if cfg.env_cfg.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True

    metrics, scores = evaluation_metrics(cfg, model.config.num_labels)

    # mmengine's custom_hooks run as Trainer callbacks.
    from .hooks import build_custom_hooks

    callbacks = list(callbacks or []) + build_custom_hooks(cfg.custom_hooks)
    batch_augments = None
    if cfg.model.train_cfg.augments:
        from .augments import BatchAugments

        batch_augments = BatchAugments(cfg.model.train_cfg, model.config.num_labels, seed=args.seed,
                                       rank=args.process_index)
    trainer = FinetuneTrainer(
        model=model,
        args=args,
        train_dataset=datasets.get("train"),
        eval_dataset=datasets.get("val"),
        compute_metrics=metrics,
        preprocess_logits_for_metrics=scores,
        callbacks=callbacks,
        cfg=cfg,
        plan=plan,
        loaders=cfg.dataloaders(),
        updates_per_epoch=steps,
        batch_augments=batch_augments,
        loss_fn=loss_fn,
    )
    logs.install(trainer, resolved_work_dir(cfg), dict_lines=cfg.log_level.lower() == "debug")
    if cfg.hub.push and cfg.hub.strategy != "end":
        from . import hub

        trainer.add_callback(hub.PushOnSaveCallback(hub_repo_id(cfg), cfg.hub.token, cfg.hub.private,
                                                    strategy=cfg.hub.strategy, always_push=cfg.hub.always_push))
    if "train" in datasets:
        log_plan(plan, args, steps, len(datasets["train"]))
    return trainer


def with_model_preprocessing(cfg):
    """cfg with what a Hub model's image processor says where the recipe leaves it unset: the
    data_preprocessor mean / std (null), and the model's size for every pipeline that fixes
    no size (a Resize before PackClsInputs). The saved recipe and image processor record it."""
    from .data.transforms import PIPELINE_STEPS
    from .hub.processor import pipeline_geometry

    if cfg.model.type == "ImageClassifier":
        return cfg
    pre = cfg.data_preprocessor
    sizeless = {split: section for split, section in cfg.dataloaders().items()
                if pipeline_geometry(section.dataset.pipeline) is None}
    if pre.mean is not None and pre.std is not None and not sizeless:
        return cfg
    from .models import model_preprocessing

    pre, size = model_preprocessing(cfg.model, pre)
    cfg = dataclasses.replace(cfg, data_preprocessor=pre)
    if size is None:
        return cfg
    for split, section in sizeless.items():
        key = f"{split}_dataloader.dataset.pipeline"
        resize = Step("Resize", {"scale": list(size)},
                      PIPELINE_STEPS["Resize"].from_config({"type": "Resize", "scale": list(size)}, key))
        steps = section.dataset.pipeline
        dataset = dataclasses.replace(section.dataset, pipeline=steps[:-1] + [resize] + steps[-1:])
        cfg = dataclasses.replace(cfg, **{f"{split}_dataloader": dataclasses.replace(section, dataset=dataset)})
    return cfg


def check_hub_model(model, args, datasets):
    """Before training: gradient checkpointing is supported, each split's image size runs, and
    the test size (the exported image processor's) is the model's own where its family needs that."""
    from .data import StreamingSplit
    from .data.build import batch_transform
    from .models.hub_classifier import check_input_size, fit_position_embeddings

    if args.gradient_checkpointing and not model.supports_gradient_checkpointing:
        raise RecipeError(f"training_args.gradient_checkpointing: {type(model).__name__} has no gradient "
                          f"checkpointing in transformers; remove it")
    transforms = {split: batch_transform(dataset) for split, dataset in datasets.items()}
    fixed = {split: fixed_output_size(t.steps) for split, t in transforms.items() if t is not None}
    size = fixed.get("test") or fixed.get("val")
    if size and size[0] == size[1] and fit_position_embeddings(model, size[0]):
        logger.info("%s: position embeddings resized to the %dx%d images of the test pipeline", type(model).__name__,
                    *size)
    seen = set()
    for split, dataset in datasets.items():
        if fixed.get(split):
            height, width = fixed[split]
        elif isinstance(dataset, StreamingSplit) or len(dataset) == 0:
            continue  # a stream is not read before training: its first batch finds out
        else:
            height, width = dataset[:1]["pixel_values"].shape[-2:]
        if (height, width) not in seen:
            seen.add((height, width))
            check_input_size(model, int(height), int(width), f"{split}_dataloader.dataset.pipeline")


def fixed_output_size(steps) -> tuple[int, int] | None:
    """The (height, width) a pipeline makes of any input (two unlike inputs give the same), else None."""
    sizes = set()
    for size in ((97, 131), (389, 211)):
        for step in steps:
            size = tuple(step.output_size(size))
        sizes.add(size)
    return sizes.pop() if len(sizes) == 1 else None


def convolutional(model):
    """Whether channels_last helps: a convolutional network, not a transformer whose only
    convolution is its patch embedding (ViT, Swin ...)."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1


def sync_batchnorm(model, sync_bn, num_processes, device):
    """mmengine's sync_bn: with several processes, BatchNorm layers normalise with the statistics
    of the whole batch (torch.nn.SyncBatchNorm) instead of each device's share. Frozen layers
    keep their parameters and stay in eval mode (the model's train() re-applies it)."""
    if sync_bn is None or num_processes < 2:
        return model
    if device not in ("cuda", "xpu"):  # SyncBatchNorm refuses other devices when it trains
        raise RecipeError(f'sync_bn: "{sync_bn}" needs GPUs (torch.nn.SyncBatchNorm does not run on '
                          f'{device or "the CPU"}); set it to null')
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def evaluate_splits(trainer, cfg, datasets):
    """val and test metrics of the weights training ends with (the ones saved), and for a
    single-label model the confusion matrix of the test split (else val): (results, confusion),
    confusion = {"split", "matrix"} or None.

    Each split is evaluated at most once after training: the validation the Trainer ran at the
    last update is reused unless an older best checkpoint was loaded since, and a test split
    that is the val split (CIFAR-10's case) reuses the val numbers."""
    from .metrics import CONFUSION_KEY

    reloaded = best_reloaded(trainer)
    if reloaded:
        logger.info("the final weights are the best checkpoint, %s (%s %.4f): evaluating them",
                    trainer.state.best_model_checkpoint, trainer.args.metric_for_best_model, trainer.state.best_metric)
    results = {}
    if "val" in datasets:
        val = None if reloaded else trainer.evaluation_at_last_update("eval")
        # A point of the validation curve only for the weights of the last update.
        results.update(val or final_evaluation(trainer, datasets["val"], "eval", log=not reloaded))
    if "test" in datasets:
        if "val" in datasets and same_data(cfg.val_dataloader, cfg.test_dataloader):
            results.update({"test_" + k.removeprefix("eval_"): v for k, v in results.items()})
        else:
            results.update(final_evaluation(trainer, datasets["test"], "test"))
    split = "test" if "test" in datasets else "val"
    matrices = {prefix: results.pop(f"{prefix}_{CONFUSION_KEY}", None) for prefix in ("eval", "test")}
    matrix = matrices["test" if split == "test" else "eval"]
    return results, (None if matrix is None else {"split": split, "matrix": matrix})


def final_evaluation(trainer, dataset, prefix, log=True):
    """Trainer.evaluate; log=False evaluates without a log-history entry (Trainer.predict)."""
    if log:
        return trainer.evaluate(dataset, metric_key_prefix=prefix)
    return dict(trainer.predict(dataset, metric_key_prefix=prefix).metrics)


def best_reloaded(trainer):
    """Whether the Trainer ended by loading a best checkpoint older than the last update
    (load_best_model_at_end)."""
    state = trainer.state
    return bool(trainer.args.load_best_model_at_end and state.best_model_checkpoint is not None
                and state.best_global_step != state.global_step)


def same_data(a, b):
    return to_data(a.dataset) == to_data(b.dataset)


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


def hub_repo_id(cfg):
    return cfg.hub.model_id or os.path.basename(os.path.normpath(resolved_work_dir(cfg)))


def report_skipped(work_dir):
    """One log line, when on_corrupt="skip" left images out: how many, and the file naming them."""
    from .data.runtime import SKIPPED_IMAGES_FILE, skipped_images

    path = os.path.join(work_dir, SKIPPED_IMAGES_FILE)
    skipped = skipped_images(path)
    if skipped:
        logger.warning("%d undecodable image(s) left out (on_corrupt='skip'): listed in %s", len(skipped), path)
