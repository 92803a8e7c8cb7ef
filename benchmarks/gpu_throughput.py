"""Training images/s per GPU at 224 px, the share of step time spent waiting for data, and
the 8-GPU projection; a seconds-long dry run on the CPU.

One process, one device. The train input path is ours: generated CIFAR-10 (PNG bytes in
Arrow) -> the tutorial pipeline (RandomCrop 32 pad 4, RandomFlip, Resize) as the dataset's
batched transform -> build_dataloader (whole uint8 batches, workers, pinned memory) -> one
non-blocking copy -> the model normalises on the device. The step is a plain loop around our
model: bf16 autocast, channels_last, SGD (fused on CUDA), optionally torch.compile.

Measured over --steps steps after --warmup (the device is synchronised only at both ends):
- images/s end to end (loader included) and with the batch already on the device
  (the model alone: what the loader has to keep up with);
- data wait: time the loop spent blocked in the loader, as a share of the step time;
- the loader alone in this process on one core (images/s), hence how many workers per GPU
  keep it fed at 80% per-worker efficiency;
- the 8-GPU projection: 8 x the measured per-GPU figure (data-parallel steps are
  independent apart from the gradient all-reduce, which this single-GPU run does not see),
  and the CPU cores its loaders need.

Run:
    python benchmarks/gpu_throughput.py                      # CUDA if present: ResNet-50, 224 px, batch 128
    python benchmarks/gpu_throughput.py --compile --json out.json
    python benchmarks/gpu_throughput.py --dry-run            # CPU: ResNet-18, 32 px, 2 steps (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

GPUS_PROJECTED = 8
WORKER_EFFICIENCY = 0.8  # the loader-scaling goal: N workers >= 0.8 x N x one core
LOADER_BATCHES = 4  # timed batches of the one-core loader measurement


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="CPU smoke run: ResNet-18, 32 px, batch 8, 1 warm-up + 2 timed steps, no workers")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--depth", type=int, choices=(18, 34, 50, 101, 152))
    p.add_argument("--size", type=int, help="Resize scale (default 224)")
    p.add_argument("--batch", type=int, help="per-device batch (default 128)")
    p.add_argument("--frozen-stages", type=int, default=2, help="-1..4 (default 2, the tutorial's)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 10; compile needs them)")
    p.add_argument("--steps", type=int, help="timed steps (default 30)")
    p.add_argument("--num-workers", type=int, help="DataLoader workers (default 8 on CUDA)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (default off)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (default on CUDA)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--json", metavar="PATH", help="also write the report here")
    args = p.parse_args(argv)

    if args.device == "auto":
        args.device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible; use --dry-run (or --device cpu) on this machine")
    if args.device == "cpu" and not args.dry_run:
        print("no CUDA device: running the CPU dry run (--dry-run)", file=sys.stderr)
        args.dry_run = True
    defaults = (dict(depth=18, size=32, batch=8, warmup=1, steps=2, num_workers=0, bf16=False) if args.dry_run
                else dict(depth=50, size=224, batch=128, warmup=10, steps=30, num_workers=8, bf16=True))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.warmup < 1 or args.steps < 1 or args.batch < 1 or args.num_workers < 0:
        p.error("--warmup, --steps and --batch must be >= 1, --num-workers >= 0")
    return args


# --- data ----------------------------------------------------------------------------------


def tutorial_pipeline(size):
    return [{"type": "RandomCrop", "crop_size": 32, "padding": 4},
            {"type": "RandomFlip", "prob": 0.5, "direction": "horizontal"},
            {"type": "Resize", "scale": size},
            {"type": "PackClsInputs"}]


def train_dataset(num_images, size):
    """Generated CIFAR-10 as a recipe's train split is served (the batched pipeline; with workers,
    batches arrive in shared slots, data/ring.py)."""
    from hf_finetune.config import config_from_dict
    from hf_finetune.data import build_datasets

    return build_datasets(config_from_dict({
        "model": {"head": {"num_classes": 10}},
        "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.1}},
        "train_dataloader": {"batch_size": 16, "dataset": {
            "type": "SyntheticCIFAR10", "num_samples": num_images, "seed": 0,
            "pipeline": tutorial_pipeline(size)}},
    }))["train"]


def train_loader(dataset, args, num_workers):
    from hf_finetune.data.loader import build_dataloader

    return build_dataloader(dataset, args.batch, shuffle=True, drop_last=True, num_workers=num_workers,
                            pin_memory=args.device == "cuda", persistent_workers=num_workers > 0, seed=0)


def loader_one_core_rate(dataset, args, batches=LOADER_BATCHES):
    """images/s of the loader in this process, on one thread (the per-core figure)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        it = iter(train_loader(dataset, args, 0))
        next(it)  # first batch: imports, caches
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches * args.batch / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


# --- model and step ------------------------------------------------------------------------


def build_model(args):
    from hf_finetune.models.configuration_finetune_resnet import FinetuneResNetConfig
    from hf_finetune.models.modeling_finetune_resnet import FinetuneResNetForImageClassification

    torch.manual_seed(0)
    config = FinetuneResNetConfig(depth=args.depth, frozen_stages=args.frozen_stages, num_labels=10)
    model = FinetuneResNetForImageClassification(config).to(args.device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


class TrainStep:
    """forward (autocast), backward, SGD step; no host sync."""

    def __init__(self, model, args):
        params = [p for p in model.parameters() if p.requires_grad]
        cuda = args.device == "cuda"
        self.optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4,
                                         **({"fused": True} if cuda else {}))
        self.forward = torch.compile(model) if args.compile else model
        self.device = args.device
        self.bf16 = args.bf16
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    def to_device(self, batch):
        pixels = batch["pixel_values"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        return pixels.contiguous(memory_format=self.memory_format), labels

    def __call__(self, pixels, labels):
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.forward(pixels, labels).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_end_to_end(step, loader, args):
    """(seconds per step, seconds per step blocked in the loader) over the timed steps."""
    it = iter(loader)
    for _ in range(args.warmup):
        step(*step.to_device(next(it)))
    sync(args.device)
    waited = 0.0
    start = time.perf_counter()
    for _ in range(args.steps):
        before = time.perf_counter()
        batch = next(it)
        waited += time.perf_counter() - before
        step(*step.to_device(batch))
    sync(args.device)
    elapsed = time.perf_counter() - start
    return elapsed / args.steps, waited / args.steps


def time_model_only(step, batch, args):
    """Seconds per step with one batch already on the device (no loader, no copy)."""
    pixels, labels = step.to_device(batch)
    for _ in range(2):
        step(pixels, labels)
    sync(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(pixels, labels)
    sync(args.device)
    return (time.perf_counter() - start) / args.steps


# --- report --------------------------------------------------------------------------------


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"


def build_report(args, step_s, wait_s, model_step_s, loader_rate):
    ips = args.batch / step_s
    model_ips = args.batch / model_step_s
    workers_per_gpu = math.ceil(model_ips / (WORKER_EFFICIENCY * loader_rate))
    return {
        "device": device_name(args.device),
        "dry_run": args.dry_run,
        "model": f"ResNet-{args.depth}",
        "frozen_stages": args.frozen_stages,
        "image_size": args.size,
        "batch_per_device": args.batch,
        "bf16": args.bf16,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "num_workers": args.num_workers,
        "timed_steps": args.steps,
        "step_time_s": step_s,
        "images_per_sec_per_device": ips,
        "data_wait_share": wait_s / step_s,
        "model_only_images_per_sec": model_ips,
        "loader_images_per_sec_one_core": loader_rate,
        "workers_per_device_needed": workers_per_gpu,
        "projection_gpus": GPUS_PROJECTED,
        "projected_images_per_sec": GPUS_PROJECTED * ips,
        "projected_loader_cores": GPUS_PROJECTED * workers_per_gpu,
    }


def print_report(r):
    print(f"{r['model']} frozen_stages={r['frozen_stages']} {r['image_size']} px, batch {r['batch_per_device']} "
          f"on {r['device']}; bf16={r['bf16']} channels_last={r['channels_last']} compile={r['compile']} "
          f"workers={r['num_workers']}{' (dry run)' if r['dry_run'] else ''}")
    print(f"  end to end      {r['images_per_sec_per_device']:10.1f} images/s per device "
          f"({r['step_time_s'] * 1000:.1f} ms/step, {100 * r['data_wait_share']:.1f}% waiting for data)")
    print(f"  model only      {r['model_only_images_per_sec']:10.1f} images/s (batch already on the device)")
    print(f"  loader, 1 core  {r['loader_images_per_sec_one_core']:10.1f} images/s -> "
          f"{r['workers_per_device_needed']} worker(s) per device to keep up")
    print(f"  {r['projection_gpus']} devices      {r['projected_images_per_sec']:10.1f} images/s projected "
          f"(x{r['projection_gpus']} the per-device figure; needs ~{r['projected_loader_cores']} loader cores)")


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    threads = torch.get_num_threads()
    if args.dry_run:
        torch.set_num_threads(1)  # a tiny model gains nothing from threads; on a busy CI machine they stall
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        report = measure(args)
    finally:
        torch.set_num_threads(threads)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def measure(args):
    dataset = train_dataset(max(args.warmup + args.steps, LOADER_BATCHES + 1) * args.batch, args.size)
    step = TrainStep(build_model(args), args)
    step_s, wait_s = time_end_to_end(step, train_loader(dataset, args, args.num_workers), args)
    model_step_s = time_model_only(step, next(iter(train_loader(dataset, args, 0))), args)
    return build_report(args, step_s, wait_s, model_step_s, loader_one_core_rate(dataset, args))


if __name__ == "__main__":
    main()
