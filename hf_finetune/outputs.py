"""What a run leaves in the work dir, and the check that a checkpoint belongs to this run."""

import dataclasses
import json
import logging
import os

from .config import resolved_work_dir
from .errors import UserError
from .workdir import disk_full_guard, dump_json, save_model_atomically

logger = logging.getLogger("hf_finetune")


def save_metrics(work_dir, split, metrics):
    """<split>_results.json, as Trainer.save_metrics names it; NaN/inf written as null."""
    dump_json(dict(sorted(metrics.items())), os.path.join(work_dir, f"{split}_results.json"))


def save_recipe(work_dir, cfg):
    """recipe.json: the merged recipe with the seed the run uses. Written when training starts
    too, so a run killed before its end leaves the seed it drew for --resume."""
    dump_json(cfg.to_dict(), os.path.join(work_dir, "recipe.json"))


def recorded_seed(checkpoint):
    """The seed of the run that wrote `checkpoint` (a checkpoint-N folder): its work dir's
    recipe.json records it. None, with a warning, when that file does not say."""
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "recipe.json")
    try:
        with open(path) as f:
            seed = json.load(f)["randomness"]["seed"]
    except (OSError, ValueError, KeyError, TypeError):
        seed = None
    if isinstance(seed, int) and not isinstance(seed, bool):
        return seed
    logger.warning("--resume: %s does not record the seed of the run that wrote %s; drawing a new one, so the "
                   "data order and augmentation differ from that run's (set randomness.seed to repeat a run)",
                   path, checkpoint)
    return None


def save_outputs(trainer, cfg, results, confusion=None):
    """Final weights, config, recipe, metrics, trainer state and the confusion matrix
    (evaluate_splits' {"split", "matrix"}, single-label only) in the work dir."""
    work_dir = resolved_work_dir(cfg)
    if not trainer.is_world_process_zero():
        return
    # Weights and config.json appear together (written aside, then renamed); every file is
    # complete or absent, and a full disk is one clear line.
    with disk_full_guard(work_dir):
        save_model_atomically(trainer.accelerator.unwrap_model(trainer.model), work_dir)
        save_recipe(work_dir, cfg)
        save_metrics(work_dir, "all", results)
        dump_json(dataclasses.asdict(trainer.state), os.path.join(work_dir, "trainer_state.json"))
        if confusion is not None:
            names = [trainer.model.config.id2label[i] for i in range(len(confusion["matrix"]))]
            dump_json({"split": confusion["split"], "labels": names, "matrix": confusion["matrix"]},
                      os.path.join(work_dir, "confusion_matrix.json"))
    try:
        from . import hub
        from .hub.card import write_environment

        hub.write_image_processor_config(work_dir, trainer.model.config, cfg)
        write_environment(work_dir, num_processes=trainer.args.world_size)
        hub.write_model_card(work_dir)
    except Exception as e:  # the card is a convenience: never lose a finished run over it
        logger.warning("could not write the model card: %s", e)


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
