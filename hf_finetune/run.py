"""Entry point: `accelerate launch hf_finetune/run.py RECIPE` (also `hf-finetune RECIPE`).

Reads top to bottom, like transformers' run_image_classification.py: config -> datasets and
labels -> model -> TrainingArguments and Trainer -> train (or resume) -> evaluate -> save ->
push. Flags follow mmcls `tools/train.py` and are applied once, as overrides of the config.
More subcommands share the entry point: `hf-finetune predict MODEL IMAGES...`,
`hf-finetune push WORK_DIR REPO_ID` and `hf-finetune export WORK_DIR OUT_DIR`.
"""

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading

if __name__ == "__main__" and not __package__:
    # Run as a file (`python hf_finetune/run.py`, `accelerate launch hf_finetune/run.py`):
    # make the package importable and hand over to the module.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from hf_finetune.run import main

    sys.exit(main())

from hf_finetune.config import apply_overrides, load_config, read_config, resolved_work_dir
from hf_finetune.errors import RecipeError, UserError

logger = logging.getLogger("hf_finetune")

SUBCOMMANDS = ("predict", "push", "export")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="hf-finetune",
        description="Fine-tune an image classifier from a JSON recipe "
        "(also: `hf-finetune predict MODEL IMAGES...`, `hf-finetune push WORK_DIR REPO_ID`, "
        "`hf-finetune export WORK_DIR OUT_DIR`).",
    )
    parser.add_argument("recipe", help="recipe JSON file, e.g. recipes/cifar10.json")
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override recipe keys after merging, e.g. optim_wrapper.optimizer.lr=0.02 "
        "train_dataloader.dataset.pipeline.0.padding=2 (VALUE is JSON when it parses)",
    )
    parser.add_argument("--work-dir", help="output folder (default: work_dirs/<recipe name>)")
    parser.add_argument(
        "--data-root", help="dataset folder for every split (a local CIFAR-10 copy, etc.)"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="CHECKPOINT",
        help="resume training: from CHECKPOINT, or the latest checkpoint in the work dir",
    )
    parser.add_argument(
        "--eval-only",
        nargs="?",
        const="auto",
        metavar="CHECKPOINT",
        help="evaluate on the test split and exit: CHECKPOINT (a checkpoint or saved model "
        "folder), or the work dir's final model",
    )
    parser.add_argument(
        "--auto-scale-lr",
        action="store_true",
        help="scale the LR by total batch / auto_scale_lr.base_batch_size (as mmcls)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in a work dir that holds another run's checkpoints, deleting them",
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="push the result to a Hub repo")
    parser.add_argument(
        "--print-recipe",
        action="store_true",
        help="print the fully merged recipe as JSON and exit (and, on stderr, the images of each split "
        "read from a local image folder)",
    )
    return parser


def train(cfg, resume=None, overwrite=False):
    """The main job, top to bottom."""
    from hf_finetune.data import build_datasets, label_names
    from hf_finetune.data.build import split_counts
    from hf_finetune.data.runtime import SKIPPED_IMAGES_FILE
    from hf_finetune.hub.card import write_data_splits
    from hf_finetune.models import build_model
    from hf_finetune.outputs import check_resume_compatible, recorded_seed, save_outputs, save_recipe
    from hf_finetune.training import (build_trainer, evaluate_splits, hub_repo_id, process_state, report_skipped,
                                      resolve_seed, with_model_preprocessing)
    from transformers import set_seed
    from hf_finetune.workdir import (WorkDirLock, check_fresh_start, disk_full_guard,
                                     remove_interrupted_saves, resume_checkpoint)

    work_dir = resolved_work_dir(cfg)
    resume = resume or cfg.resume
    state = process_state()
    with WorkDirLock(work_dir, is_main=state.is_main_process):  # one run per work dir
        with state.main_process_first():  # the main process cleans first
            if state.is_main_process:
                remove_interrupted_saves(work_dir)
            check_fresh_start(work_dir, resume=resume, overwrite=overwrite)
            checkpoint = resume_checkpoint(work_dir, resume)
            if state.is_main_process and not checkpoint:  # a fresh run lists only its own skipped images
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(work_dir, SKIPPED_IMAGES_FILE))

        # One seed for every rank: the recipe's, the resumed run's, or one drawn now and
        # recorded at once, so a run killed later resumes with it.
        cfg = resolve_seed(cfg, state, recorded_seed(checkpoint)
                           if checkpoint and cfg.randomness.seed is None else None)
        cfg = with_model_preprocessing(cfg)  # the model's mean / std, recorded in recipe.json
        if state.is_main_process:
            with disk_full_guard(work_dir):
                save_recipe(work_dir, cfg)

        with state.main_process_first():  # the main process downloads and converts first
            # Datasets and their labels.
            datasets = build_datasets(cfg)
            id2label = dict(enumerate(label_names(datasets)))
            if state.is_main_process:
                with disk_full_guard(work_dir):  # the card states each split's size
                    write_data_splits(work_dir, {split: split_counts(ds) for split, ds in datasets.items()})

            # The model: backbone weights from init_cfg, then whole-model weights from load_from;
            # the recipe's seed makes its initialisation repeatable.
            set_seed(cfg.randomness.seed)
            model = build_model(cfg.model, cfg.data_preprocessor, id2label, load_from=cfg.load_from)

        # TrainingArguments and the Trainer.
        trainer = build_trainer(cfg, datasets, model)

        # Train, or continue from a checkpoint.
        if checkpoint:
            check_resume_compatible(checkpoint, trainer.model)
            logger.info("resuming from %s", checkpoint)
        with disk_full_guard(work_dir):
            train_result = trainer.train(resume_from_checkpoint=checkpoint)  # raises on a NaN loss

        # Evaluate each distinct split once, then save.
        evaluated, confusion = evaluate_splits(trainer, cfg, datasets)
        results = {**train_result.metrics, **evaluated}
        save_outputs(trainer, cfg, results, confusion)

    if trainer.is_world_process_zero():
        report_skipped(work_dir)
        logger.info("done: %s", headline(results))
        if cfg.hub.push:
            from hf_finetune import hub

            hub.push_work_dir(work_dir, hub_repo_id(cfg), token=cfg.hub.token, private=cfg.hub.private)
    return results


def evaluate_only(cfg, source="auto"):
    """`--eval-only`: the test-split metrics of a saved model, checkpoint or weights file."""
    from hf_finetune.data import build_datasets, label_names
    from hf_finetune.models import build_model, load_saved_model
    from hf_finetune.outputs import save_metrics
    from hf_finetune.training import build_trainer, process_state, report_skipped, with_model_preprocessing
    from hf_finetune.workdir import eval_source

    work_dir = resolved_work_dir(cfg)
    if source in (None, "auto"):
        source = eval_source(work_dir)
    elif not os.path.exists(source):
        raise UserError(f"--eval-only {source}: no such file or folder")
    with process_state().main_process_first():
        datasets = build_datasets(cfg, splits=("test",))
    if os.path.isdir(source):
        cfg = with_model_preprocessing(cfg)
        model = load_saved_model(source, key=f"--eval-only {source}", preprocessor_cfg=cfg.data_preprocessor)
        logger.info("evaluating the model saved in %s%s", source, _step_of(source))
    else:
        model = build_model(cfg.model, cfg.data_preprocessor, dict(enumerate(label_names(datasets))),
                            load_from=source, load_key="--eval-only")
    trainer = build_trainer(cfg, datasets, model)
    metrics = trainer.evaluate(datasets["test"], metric_key_prefix="test")
    if trainer.is_world_process_zero():
        save_metrics(work_dir, "test", metrics)
        report_skipped(work_dir)
        logger.info("test: %s", headline(metrics))
    return metrics


def headline(metrics):
    """The quality figures of a metrics dict (accuracy, mAP, F1 ...), for the last log line."""
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                     if isinstance(v, float) and ("accuracy" in k or "multilabel" in k))


def _step_of(folder):
    """Which update the weights saved in `folder` are from, for the log line."""
    try:
        with open(os.path.join(folder, "trainer_state.json")) as f:
            state = json.load(f)
        step, best = state["global_step"], state.get("best_global_step")
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    recipe = os.path.join(folder, "recipe.json")  # a work dir's, not a checkpoint's
    try:
        load_best = os.path.isfile(recipe) and read_config(recipe).training_args.get("load_best_model_at_end")
    except UserError:  # an unreadable recipe.json: only this line loses the detail
        load_best = False
    if load_best and best not in (None, step):
        return f" (the best checkpoint, update {best}, loaded when training ended after update {step})"
    return f" (after update {step})"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or `kill`), handled like Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _report(error):
    """One line on stderr; a recipe error is identical on every rank, so rank 0 says it."""
    from accelerate.utils import get_int_from_env

    from hf_finetune.devices import process_rank

    rank = process_rank()
    world = get_int_from_env(["WORLD_SIZE"], 1)
    if isinstance(error, RecipeError) and rank != 0:
        return
    prefix = f"[rank {rank}] " if world > 1 else ""
    print(f"{prefix}error: {error}", file=sys.stderr, flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        if argv[0] == "predict":
            from hf_finetune import predict

            return predict.main(argv[1:])
        from hf_finetune import hub

        return hub.main(argv)

    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    logging.basicConfig(format="[hf_finetune] %(message)s", level=logging.INFO)
    try:
        cfg = load_config(args.recipe, args.cfg_options)
        cfg = apply_overrides(cfg, work_dir=args.work_dir, data_root=args.data_root,
                              auto_scale_lr=args.auto_scale_lr, push_to_hub=args.push_to_hub,
                              resume=bool(args.resume))
        if args.print_recipe:
            from hf_finetune.data.build import preview_counts

            counts = preview_counts(cfg)  # before printing: a broken folder is one error line
            print(json.dumps(cfg.to_dict(), indent=2))
            for line in counts:
                print(f"# {line}", file=sys.stderr)
        elif args.eval_only:
            evaluate_only(cfg, args.eval_only)
        else:
            train(cfg, resume=args.resume, overwrite=args.overwrite)
        return 0
    except UserError as error:
        _report(error)
        return error.exit_code
    except KeyboardInterrupt as stop:
        print("interrupted; checkpoints already written are intact; to continue, run the same "
              "command with --resume", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
