"""Per-iteration time of Hub models (HuggingFaceClassifier recipes) through our Trainer path next
to a bare transformers training loop: same model, same optimizer, same batches.

Models, random weights from their configs (no download), saved to a temp folder with their
image processor as a Hub repo would be:
  ViT-S/16    ViTConfig(hidden 384, 12 layers, 6 heads, MLP 1536, patch 16)
  ConvNeXt-T  ConvNextConfig(depths 3-3-9-3, widths 96-192-384-768)

- ours: recipes/cifar10.json with the model section replaced by
  {"type": "HuggingFaceClassifier", "model_name": <folder>, "pretrained": false} and AdamW ->
  build_datasets -> build_trainer -> Trainer.train. Timed: Arrow read + decode + batched uint8
  transform + DataLoader + Trainer step + uint8 -> float normalisation on the device + model.
- bare: AutoModelForImageClassification.from_config of the same folder (same seed), the very
  uint8 batches our pipeline produces (built before the clock starts), and per step only
  (x.float() - mean) / std, model(pixel_values, labels).loss.backward(), AdamW step, LR
  scheduler step, zero_grad.

As in train_throughput.py (whose timing code this reuses), one bare step runs right after each
step of ours inside the same Trainer run, so load from other processes hits both alike; the
first --warmup steps are not timed. The ratio ours/bare (images/s) is the cost of everything
around the model; the target is >= 0.95, as for our ResNet.

Run:   python benchmarks/hub_models.py                  # both models, 224 px, batch 16, CPU
       python benchmarks/hub_models.py --models vit --steps 8
       python benchmarks/hub_models.py --dry-run        # tiny models, 32 px, 2 steps (seconds)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "cifar10.json"
MODELS = ("vit", "convnext")
NAMES = {"vit": "ViT-S/16", "convnext": "ConvNeXt-T"}
OPTIMIZER = {"type": "AdamW", "lr": 5e-4, "weight_decay": 0.05}  # a fine-tuning optimizer for both


def _throughput_module():
    """benchmarks/train_throughput.py (not a package): its step clock, batches and summaries."""
    spec = importlib.util.spec_from_file_location("train_throughput", HERE / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tt = _throughput_module()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny models of the same families at 32 px, batch 4, 1 + 2 steps: checks the script")
    p.add_argument("--size", type=int, help="input size; default 224 (32 with --dry-run)")
    p.add_argument("--batch", type=int, help="batch size; default 16 (4 with --dry-run)")
    p.add_argument("--warmup", type=int, help="untimed steps first; default 2 (1 with --dry-run)")
    p.add_argument("--steps", type=int, help="timed steps; default 6 (2 with --dry-run)")
    p.add_argument("--rounds", type=int, default=1, help="repeats per model, pooled (default 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--json", metavar="PATH", help="also write the report here")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        p.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    defaults = dict(size=32, batch=4, warmup=1, steps=2) if args.dry_run else dict(size=224, batch=16, warmup=2,
                                                                                   steps=6)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup, --steps and --rounds must be >= 1")
    # What train_throughput's clock and batches read.
    args.device, args.sync_debug = "cpu", False
    return args


# --- the models ----------------------------------------------------------------------------


def model_config(kind: str, size: int, dry_run: bool):
    """(config, image processor) of the model; dry run: the same family, tiny."""
    from transformers import ConvNextConfig, ConvNextImageProcessorPil, ViTConfig, ViTImageProcessorPil

    if kind == "vit":
        dims = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    patch_size=8) if dry_run else \
            dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=16)
        processor = ViTImageProcessorPil(size={"height": size, "width": size})
        return ViTConfig(image_size=size, **dims), processor
    dims = dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64]) if dry_run else \
        dict(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768])
    return ConvNextConfig(**dims), ConvNextImageProcessorPil(size={"shortest_edge": size}, crop_pct=1.0)


def save_model_folder(kind: str, args, root: str) -> str:
    """A folder as a Hub repo holds a model: config.json, weights, preprocessor_config.json."""
    from transformers import AutoModelForImageClassification

    folder = os.path.join(root, kind)
    config, processor = model_config(kind, args.size, args.dry_run)
    torch.manual_seed(0)
    AutoModelForImageClassification.from_config(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def normalisation(folder: str) -> tuple[list[float], list[float]]:
    """The image processor's mean / std on the 0-255 scale (what the recipe gives both loops)."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(folder)
    return [255 * m for m in processor.image_mean], [255 * s for s in processor.image_std]


def build_recipe(folder: str, args, work_dir: str):
    from hf_finetune import load_config

    mean, std = normalisation(folder)
    recipe = Path(folder) / "recipe.json"  # beside the model, outside the work dir
    recipe.write_text(json.dumps({
        "_base_": [str(RECIPE)],
        "model": {"_delete_": True, "type": "HuggingFaceClassifier", "model_name": folder, "pretrained": False},
        "data_preprocessor": {"mean": mean, "std": std},
        "optim_wrapper": {"optimizer": {"_delete_": True, **OPTIMIZER}},
    }))
    total_iters = args.warmup + args.steps
    return load_config(str(recipe), cfg_options=[
        f"work_dir={work_dir}",
        "train_dataloader.dataset.type=SyntheticCIFAR10",
        f"train_dataloader.dataset.num_samples={total_iters * args.batch}",
        "train_dataloader.dataset.seed=0",
        f"train_dataloader.dataset.pipeline.2.scale={args.size}",  # the recipe's Resize
        "train_dataloader.num_workers=0",
        "train_dataloader.drop_last=true",
        f"train_cfg.total_batch_size={args.batch}",
        "train_cfg.by_epoch=false",
        f"train_cfg.max_iters={total_iters}",
        "val_dataloader=null",
        "test_dataloader=null",
        "default_hooks.checkpoint.interval=-1",
        "default_hooks.logger.interval=1000000",
        "randomness.seed=0",
        "env_cfg.channels_last=false",  # the bare loop's layout (as train_throughput.py on the CPU)
        "log_level=warning",
    ])


# --- bare ----------------------------------------------------------------------------------


class BareLoop:
    """Plain transformers + torch: the same config and seed, normalise, forward, backward, AdamW."""

    def __init__(self, folder, recipe, id2label):
        from transformers import AutoConfig, AutoModelForImageClassification

        config = AutoConfig.from_pretrained(folder, id2label=id2label, label2id={v: k for k, v in id2label.items()})
        torch.manual_seed(0)
        self.model = AutoModelForImageClassification.from_config(config).train()
        pre = recipe.data_preprocessor
        self.mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.std).view(1, 3, 1, 1)
        cfg = recipe.optim_wrapper.optimizer
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr,
                                           weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=[10**6], gamma=0.1)

    def step(self, pixels, labels):
        loss = self.model(pixel_values=(pixels.float() - self.mean) / self.std, labels=labels).loss
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


# --- main ----------------------------------------------------------------------------------


def measure(kind: str, args, root: str) -> dict:
    from hf_finetune import build_datasets
    from hf_finetune.data import label_names

    folder = save_model_folder(kind, args, root)
    work_dir = os.path.join(root, f"{kind}_run")
    recipe = build_recipe(folder, args, work_dir)
    datasets = build_datasets(recipe)
    id2label = dict(enumerate(label_names(datasets)))
    batches = tt.prepare_batches(datasets["train"], args)
    ours, bare = [], []
    for _ in range(args.rounds):
        o, b = tt.run_ours(recipe, datasets, args, BareLoop(folder, recipe, id2label), batches)
        ours += o["durations"]
        bare += b["durations"]
    ours, bare = tt.summarise(ours, args.batch), tt.summarise(bare, args.batch)
    return {"model": NAMES[kind] + (" (dry run: tiny)" if args.dry_run else ""), "image_size": args.size,
            "batch": args.batch, "timed_steps": len(ours["durations"]),
            "ours_s_per_iter": ours["mean"], "bare_s_per_iter": bare["mean"],
            "ours_median_s": ours["median"], "bare_median_s": bare["median"],
            "ratio": ours["ips"] / bare["ips"]}


def print_report(report: dict) -> None:
    print(f"{'model':28}{'ours s/iter':>12}{'bare s/iter':>12}{'ratio':>8}{'median ratio':>14}")
    for r in report["models"]:
        print(f"{r['model']:28}{r['ours_s_per_iter']:12.3f}{r['bare_s_per_iter']:12.3f}{r['ratio']:8.3f}"
              f"{r['bare_median_s'] / r['ours_median_s']:14.3f}")
    print(f"ratio = ours/bare images/s over {report['models'][0]['timed_steps']} interleaved steps; target >= 0.95; "
          f"{report['threads']} torch threads, {report['image_size']} px, batch {report['batch']}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    logging.getLogger("hf_finetune").setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="hub_models_") as root:
            warnings.simplefilter("ignore")
            results = [measure(kind, args, root) for kind in args.models]
    finally:
        torch.set_num_threads(threads)
    report = {"dry_run": args.dry_run, "image_size": args.size, "batch": args.batch, "threads": args.threads,
              "models": results}
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
