"""The jobs the entry point runs, top to bottom: train (resume, evaluate, save, push) and
evaluate-only, and what they leave in the work dir."""

import json
import logging
import os

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import resolved_work_dir, to_data
from .errors import TrainingError, UserError
from .training import build_trainer, hub_repo_id, process_state

logger = logging.getLogger("hf_finetune")

# What a complete Trainer checkpoint holds (trainer_state.json is written last).
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


def ensure_writable(work_dir):
    try:
        os.makedirs(work_dir, exist_ok=True)
        probe = os.path.join(work_dir, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"work dir {work_dir}: not writable ({e.strerror}); choose another "
                        f"with --work-dir") from None


def complete_checkpoints(work_dir):
    """checkpoint-N folders that were written to the end, oldest first."""
    if not os.path.isdir(work_dir):
        return []
    found = []
    for name in os.listdir(work_dir):
        path = os.path.join(work_dir, name)
        if not (name.startswith(PREFIX_CHECKPOINT_DIR + "-") and os.path.isdir(path)):
            continue
        try:
            step = int(name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if is_complete_checkpoint(path):
            found.append((step, path))
        else:
            logger.warning("ignoring %s: incomplete (interrupted while saving)", path)
    return [path for _, path in sorted(found)]


def is_complete_checkpoint(path):
    if not all(os.path.isfile(os.path.join(path, f)) for f in CHECKPOINT_FILES):
        return False
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("model.safetensors", "pytorch_model.bin")):
        return False
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def resolve_resume(work_dir, resume):
    """The checkpoint folder to resume from, or None to start fresh."""
    if resume in (None, False):
        return None
    if resume in (True, "auto"):
        checkpoints = complete_checkpoints(work_dir)
        if not checkpoints:
            logger.warning("--resume: no complete checkpoint in %s; starting from scratch", work_dir)
            return None
        return checkpoints[-1]
    if not os.path.isdir(resume) or not is_complete_checkpoint(resume):
        raise UserError(
            f"--resume {resume}: not a complete checkpoint folder (expected a "
            f"{PREFIX_CHECKPOINT_DIR}-N folder with {', '.join(CHECKPOINT_FILES)})"
        )
    return resume


def check_resume_compatible(checkpoint, model):
    """Refuse a checkpoint of another architecture or recipe before the Trainer trips on it."""
    try:
        with open(os.path.join(checkpoint, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        raise UserError(f"--resume {checkpoint}: config.json missing or unreadable") from None
    ours = model.config.to_dict()
    for key in ("model_type", "depth", "num_labels", "frozen_stages", "style"):
        a, b = saved.get(key), ours.get(key)
        if key == "num_labels":
            a = len(saved.get("id2label") or {}) or a
            b = len(ours.get("id2label") or {}) or b
        if a != b:
            raise UserError(
                f"--resume {checkpoint}: it was trained with {key}={a!r}, this recipe has "
                f"{key}={b!r}; resume with the recipe that wrote it, or start a new work dir"
            )


def train(cfg, resume=None):
    """The main job: data, model, Trainer, train, evaluate each split once, save, push."""
    from .data import build_datasets, label_names
    from .models import build_model

    work_dir = resolved_work_dir(cfg)
    ensure_writable(work_dir)
    with process_state().main_process_first():  # one process downloads, the others reuse
        datasets = build_datasets(cfg)
        id2label = dict(enumerate(label_names(datasets)))
        model = build_model(cfg.model, cfg.data_preprocessor, id2label, load_from=cfg.load_from)
    trainer = build_trainer(cfg, datasets, model)

    checkpoint = resolve_resume(work_dir, resume or cfg.resume)
    if checkpoint:
        check_resume_compatible(checkpoint, trainer.model)
        logger.info("resuming from %s", checkpoint)
    try:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
    except OSError as e:
        raise TrainingError(f"writing to {work_dir} failed: {e}") from None
    trainer.loss_guard.check()

    results = dict(train_result.metrics)
    results.update(evaluate_splits(trainer, cfg, datasets))
    save_outputs(trainer, cfg, results)
    if trainer.is_world_process_zero():
        logger.info("done: %s", ", ".join(f"{k}={v:.4f}" for k, v in results.items()
                                             if "accuracy" in k))
        if cfg.hub.push:
            from . import hub

            hub.push_work_dir(work_dir, hub_repo_id(cfg), token=cfg.hub.token, private=cfg.hub.private)
    return results


def evaluate_splits(trainer, cfg, datasets):
    """val and test metrics of the final model, each distinct split evaluated once: the
    validation that ran at the last update is reused, and a test split that is the val split
    (CIFAR-10's case) reuses the val numbers."""
    results = {}
    if "val" in datasets:
        val = last_validation(trainer) or trainer.evaluate()
        results.update(val)
    if "test" in datasets:
        if "val" in datasets and same_data(cfg.val_dataloader, cfg.test_dataloader):
            results.update({"test_" + k.removeprefix("eval_"): v for k, v in val.items()})
        else:
            results.update(trainer.evaluate(datasets["test"], metric_key_prefix="test"))
    return results


def last_validation(trainer):
    """The metrics of a validation at the final update, from the Trainer's log history."""
    step = trainer.state.global_step
    for entry in reversed(trainer.state.log_history):
        if entry.get("step") == step and "eval_loss" in entry:
            return {k: v for k, v in entry.items() if k.startswith("eval_")}
    return None


def same_data(a, b):
    return to_data(a.dataset) == to_data(b.dataset)


def save_outputs(trainer, cfg, results):
    """Final weights, config, recipe, metrics and trainer state in the work dir."""
    work_dir = resolved_work_dir(cfg)
    trainer.save_model(work_dir)
    if not trainer.is_world_process_zero():
        return
    with open(os.path.join(work_dir, "recipe.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    trainer.save_metrics("all", results, combined=False)
    trainer.state.save_to_json(os.path.join(work_dir, "trainer_state.json"))
    matrix = trainer.compute_metrics.matrix
    if matrix is not None:
        names = [trainer.model.config.id2label[i] for i in range(len(matrix))]
        with open(os.path.join(work_dir, "confusion_matrix.json"), "w") as f:
            json.dump({"labels": names, "matrix": matrix}, f)
    try:
        from . import hub

        hub.write_image_processor_config(work_dir, trainer.model.config, cfg)
        hub.write_model_card(work_dir)
    except Exception as e:  # the card is a convenience: never lose a finished run over it
        logger.warning("could not write the model card: %s", e)


def evaluate_only(cfg, checkpoint="auto"):
    """`--eval-only`: top-1/top-5 of a saved model (or checkpoint) on the test split."""
    from .data import build_datasets
    from .models import FinetuneResNetForImageClassification, build_model

    work_dir = resolved_work_dir(cfg)
    source = checkpoint
    if checkpoint in (None, "auto"):
        if os.path.isfile(os.path.join(work_dir, "config.json")):
            source = work_dir
        else:
            found = complete_checkpoints(work_dir)
            if not found:
                raise UserError(f"--eval-only: no trained model in {work_dir}; pass a checkpoint "
                                f"folder or weights file: --eval-only PATH")
            source = found[-1]
    with process_state().main_process_first():
        datasets = build_datasets(cfg, splits=("test",))
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise UserError(f"--eval-only {source}: no config.json there (not a saved model)")
        model = FinetuneResNetForImageClassification.from_pretrained(source)
    elif os.path.isfile(source):
        from .data import label_names

        model = build_model(cfg.model, cfg.data_preprocessor, dict(enumerate(label_names(datasets))),
                            load_from=source, load_key="--eval-only")
    else:
        raise UserError(f"--eval-only {source}: no such file or folder")
    logger.info("evaluating %s", source)
    ensure_writable(work_dir)
    trainer = build_trainer(cfg, datasets, model)
    metrics = trainer.evaluate(datasets["test"], metric_key_prefix="test")
    if trainer.is_world_process_zero():
        trainer.save_metrics("test", metrics, combined=False)
        logger.info("test: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "accuracy" in k))
    return metrics
