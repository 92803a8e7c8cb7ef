"""Entry point: `accelerate launch hf_finetune/run.py RECIPE` (also `hf-finetune RECIPE`).

Flags follow mmcls `tools/train.py`. Two more subcommands share the entry point:
`hf-finetune push WORK_DIR REPO_ID` and `hf-finetune export WORK_DIR OUT_DIR`.
"""

import argparse
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

from hf_finetune.errors import RecipeError, UserError

logger = logging.getLogger("hf_finetune")

HUB_COMMANDS = ("push", "export")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="hf-finetune",
        description="Fine-tune an image classifier from a JSON recipe "
        "(also: `hf-finetune push WORK_DIR REPO_ID`, `hf-finetune export WORK_DIR OUT_DIR`).",
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
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="push the result to a Hub repo")
    parser.add_argument(
        "--print-recipe",
        action="store_true",
        help="print the fully merged recipe as JSON and exit",
    )
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or `kill`), handled like Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _report(error):
    """One line on stderr; a recipe error is identical on every rank, so rank 0 says it."""
    from accelerate.utils import get_int_from_env

    rank = get_int_from_env(["RANK", "LOCAL_RANK"], 0)
    world = get_int_from_env(["WORLD_SIZE"], 1)
    if isinstance(error, RecipeError) and rank != 0:
        return
    prefix = f"[rank {rank}] " if world > 1 else ""
    print(f"{prefix}error: {error}", file=sys.stderr, flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in HUB_COMMANDS:
        from hf_finetune import hub

        return hub.main(argv)

    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    logging.basicConfig(format="[hf_finetune] %(message)s", level=logging.INFO)
    try:
        from hf_finetune.config import apply_overrides, load_config

        cfg = load_config(args.recipe, args.cfg_options)
        cfg = apply_overrides(cfg, work_dir=args.work_dir, data_root=args.data_root,
                              auto_scale_lr=args.auto_scale_lr, push_to_hub=args.push_to_hub,
                              resume=bool(args.resume))
        if args.print_recipe:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0

        from hf_finetune import runs

        if args.eval_only:
            runs.evaluate_only(cfg, checkpoint=args.eval_only)
        else:
            runs.train(cfg, resume=args.resume)
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
