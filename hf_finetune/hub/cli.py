"""`hf-finetune push WORK_DIR REPO_ID` and `hf-finetune export WORK_DIR OUT_DIR` (dispatched from run.py)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from hf_finetune.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-finetune", description="Share a finished work dir.")
    commands = parser.add_subparsers(dest="command", required=True)

    push = commands.add_parser(
        "push",
        help="push a finished work dir to a Hub repo",
        description="Upload the final model, model card, figures and (by default) a native transformers "
        "export under native/ to REPO_ID. The Hub is HF_ENDPOINT (default https://huggingface.co).",
    )
    push.add_argument("work_dir", help="the training output folder")
    push.add_argument("repo_id", help="Hub repo, e.g. my-org/resnet50-cifar10")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument(
        "--token",
        help="Hub token (default: HF_TOKEN, then the token saved by `hf auth login`); prefer HF_TOKEN, "
        "command lines are visible to other users",
    )
    push.add_argument("--no-native", dest="include_native", action="store_false",
                      help="do not upload the native ResNetForImageClassification export (a Hub model's "
                      "work dir is already native: it has none)")
    push.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT)")

    export = commands.add_parser(
        "export",
        help="export a work dir as a standard transformers model",
        description="Write a plain transformers checkpoint (our ResNet as ResNetForImageClassification, a Hub "
        "model as itself) + image processor config that load without hf_finetune or remote code.",
    )
    export.add_argument("work_dir", help="the training output folder")
    export.add_argument("out_dir", help="folder to write the exported model to")
    export.add_argument("--format", choices=["transformers"], default="transformers",
                        help="export format (default: transformers)")
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exit_:  # --help, or a usage error argparse already printed
        return int(exit_.code or 0)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="[hf_finetune] %(message)s", level=logging.INFO)
    from huggingface_hub.utils import httpx  # the HTTP client huggingface_hub uses (httpx2 in 2.x)

    logging.getLogger(httpx.__name__).setLevel(logging.WARNING)  # one line per HTTP request is noise here
    try:
        if args.command == "push":
            from hf_finetune.hub.push import push_work_dir

            url = push_work_dir(args.work_dir, args.repo_id, token=args.token, private=args.private,
                                endpoint=args.endpoint, include_native=args.include_native)
            print(f"pushed {args.work_dir} to {args.repo_id}: {url}")
        else:
            from hf_finetune.hub.export import export_transformers
            from hf_finetune.hub.processor import read_json

            out_dir = export_transformers(args.work_dir, args.out_dir)
            (architecture,) = read_json(os.path.join(out_dir, "config.json"))["architectures"]
            print(f"exported {args.work_dir} to {out_dir} (transformers {architecture})")
        return 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
