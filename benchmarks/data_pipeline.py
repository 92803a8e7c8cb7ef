"""Images/s of the CIFAR-10 train pipeline at 224 px, ours against the per-sample baseline.

Train pipeline: RandomCrop(32, padding=4) -> RandomFlip(0.5) -> Resize(224) -> PackClsInputs.

- ours: the real path. A synthetic CIFAR-like copy is written to disk in the
  official layout (tarball, as downloaded) and, separately, in the Hub's layout
  (save_to_disk with PNG images, like uoft-cs/cifar10); build_datasets turns
  each into a datasets.Dataset (Arrow, memory-mapped) with the batched uint8
  transform; build_dataloader fetches whole batches. Timed: Arrow read + image
  decode + transform + loader, until the batch is in the training loop's hands.
  Three sources: the local tarball (converted once into the Arrow cache), the
  CIFAR10 Hub path (the download is stood in by the Hub-layout copy; re-encoded
  once into the cache), and the Hub-layout copy read in place, which decodes PNG
  every batch (what any other Hub dataset through HFImageDataset does).
- baseline: what the transformers image-classification example does: the
  datasets Image feature decodes to PIL, a per-sample PIL pipeline, ToTensor-style
  float conversion and normalisation on the CPU, then the default batching
  (Dataset.__getitems__ splits the batch, collate_fn stacks it again).

Single process, one torch thread; then DataLoader workers = 2. Each row is the best
of --repeats timed passes.
Run: python benchmarks/data_pipeline.py [--num-images 8192] [--baseline-images 1024]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TRAIN_PIPELINE = [
    {"type": "RandomCrop", "crop_size": 32, "padding": 4},
    {"type": "RandomFlip", "prob": 0.5, "direction": "horizontal"},
    {"type": "Resize", "scale": 224},
    {"type": "PackClsInputs"},
]
MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1) / 255.0
STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1) / 255.0


def baseline_transform(example_batch):
    """transformers example style: per-sample PIL ops, then float tensor and normalisation."""
    from PIL import Image, ImageOps

    pixel_values = []
    for image in example_batch["img"]:
        image = ImageOps.expand(image.convert("RGB"), border=4, fill=0)
        top, left = random.randint(0, 8), random.randint(0, 8)
        image = image.crop((left, top, left + 32, top + 32))
        if random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = image.resize((224, 224), Image.Resampling.BILINEAR)
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        pixel_values.append((tensor - MEAN) / STD)
    example_batch["pixel_values"] = pixel_values
    return example_batch


def baseline_collate(examples):
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["label"] for e in examples])}


def time_loader(loader, max_images: int, clock=time.perf_counter) -> float:
    """Images per second of `clock` (wall by default) iterating loader for about max_images images.

    The clock starts when the first batch arrives, so worker start-up (paid once
    per run, or once per epoch without persistent workers) is not counted.
    """
    seen, start = 0, None
    for batch in loader:
        if start is None:
            start = clock()
            continue
        seen += batch["labels"].shape[0]
        if seen >= max_images:
            break
    return seen / (clock() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=8192, help="synthetic train images (ours runs them all)")
    parser.add_argument("--baseline-images", type=int, default=1024, help="images timed for the slow baseline")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9, help="side-by-side rounds for the workers scaling")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per row; the best is reported "
                        "(a shared machine's noise only ever slows a pass down)")
    parser.add_argument("--work-dir", default=None, help="where to write the data (default: a temporary folder)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="hf_finetune_bench_"))
    try:
        return run(args, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> int:
    os.environ["HF_DATASETS_CACHE"] = str(work / "cache")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the CIFAR copy writers
    from cifar_writers import write_cifar10_tarball, write_save_to_disk

    from hf_finetune.config import config_from_dict
    from hf_finetune.data import build_dataloader, build_datasets
    from hf_finetune.data.decode import decode_image
    from hf_finetune.data.transforms import build_pipeline

    datasets.disable_progress_bars()
    n, bs = args.num_images, args.batch_size
    t0 = time.perf_counter()
    write_cifar10_tarball(work / "tarball", n_train=n, n_test=bs, seed=0)
    write_save_to_disk(work / "hub_layout", n_train=n, n_test=bs, seed=0)
    print(f"wrote {n} synthetic 32x32 images twice under {work} ({time.perf_counter() - t0:.1f} s)")

    def recipe(root):
        return config_from_dict({
            "model": {"head": {"num_classes": 10}},
            "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.1}},
            "train_dataloader": {"batch_size": bs, "dataset": {
                "type": "CIFAR10", "data_root": str(root), "split": "train", "pipeline": TRAIN_PIPELINE}},
        })

    t0 = time.perf_counter()
    local = build_datasets(recipe(work / "tarball"))["train"]
    print(f"build_datasets, first run (converts the tarball to the Arrow cache): {time.perf_counter() - t0:.2f} s")
    t0 = time.perf_counter()
    local = build_datasets(recipe(work / "tarball"))["train"]
    print(f"build_datasets, second run (cache reused): {time.perf_counter() - t0:.2f} s")
    png_in_place = build_datasets(recipe(work / "hub_layout"))["train"]
    from hf_finetune.data import sources

    real_hub_loader = sources.load_hub_dataset
    sources.load_hub_dataset = lambda *args: datasets.load_from_disk(str(work / "hub_layout"))  # no network here
    try:
        t0 = time.perf_counter()
        hub = build_datasets(recipe(work / "no_local_copy"))["train"]
        print(f"build_datasets, CIFAR10 Hub path, first run (re-encodes the download): "
              f"{time.perf_counter() - t0:.2f} s")
    finally:
        sources.load_hub_dataset = real_hub_loader

    def best(measure, repeats=args.repeats):
        return max(measure() for _ in range(repeats))

    def ours(name, ds, workers, contiguous=False, shared_slots=True):
        loader = build_dataloader(ds, bs, shuffle=True, drop_last=True, num_workers=workers, seed=0,
                                  persistent_workers=workers > 0, shared_slots=shared_slots)
        if contiguous:
            rate = best(lambda: time_loader(({"pixel_values": b["pixel_values"].contiguous(), "labels": b["labels"]}
                                             for b in loader), n))
        else:
            rate = best(lambda: time_loader(loader, n))
        print(f"  {name:<58} workers={workers}: {rate:9.0f} images/s", flush=True)
        return rate

    print("\nstage breakdown, one thread, batches of", bs)
    raw = local.with_format(None).cast_column("img", datasets.Image(decode=False))
    raw_png = png_in_place.with_format(None).cast_column("img", datasets.Image(decode=False))
    idx = list(range(bs))
    for label, fn in [  # best of 3 x 20 batches
        ("Arrow fetch of a batch (no decode)", lambda: raw[idx]),
        ("+ decode, our cache (PPM)", lambda: [decode_image(x) for x in raw[idx]["img"]]),
        ("+ decode, Hub layout (PNG)", lambda: [decode_image(x) for x in raw_png[idx]["img"]]),
    ]:
        fn()
        rates = []
        for _ in range(3):
            start, reps = time.perf_counter(), 20
            for _ in range(reps):
                fn()
            rates.append(bs * reps / (time.perf_counter() - start))
        print(f"  {label:<58} {max(rates):9.0f} images/s")
    steps = build_pipeline(TRAIN_PIPELINE)
    batch = torch.randint(0, 256, (bs, 32, 32, 3), dtype=torch.uint8)
    for step in steps[:-1]:
        rates = []
        for _ in range(3):
            inputs = [batch.clone() for _ in range(20)]
            start = time.perf_counter()
            for x in inputs:
                out = step(x)
            rates.append(bs * len(inputs) / (time.perf_counter() - start))
        print(f"  {type(step).__name__ + ' alone':<58} {max(rates):9.0f} images/s")
        batch = out

    print("\nend to end (Arrow + decode + transform + loader), one thread")
    ours_local = ours("ours, local copy (tarball -> Arrow cache)", local, 0)
    ours_hub = ours("ours, CIFAR10 Hub path (download re-encoded once)", hub, 0)
    ours_png = ours("ours, PNG decoded every batch (Hub layout in place)", png_in_place, 0)
    ours("ours, local copy, pixel_values made NCHW-contiguous", local, 0, contiguous=True)

    base_ds = datasets.load_from_disk(str(work / "hub_layout"))["train"]
    base_ds.set_transform(baseline_transform)
    base_loader = torch.utils.data.DataLoader(base_ds, batch_size=bs, shuffle=True, collate_fn=baseline_collate)
    base = best(lambda: time_loader(base_loader, args.baseline_images), max(1, args.repeats - 1))
    print(f"  {'baseline, per-sample PIL + float normalise (Hub layout)':<58} workers=0: {base:9.0f} images/s")

    print(f"\nwith DataLoader workers = {args.workers} (each one thread)")
    ours_local_w = ours("ours, local copy (tarball -> Arrow cache)", local, args.workers)
    ours("ours, local copy, batches sent torch's usual way", local, args.workers, shared_slots=False)
    ours_png_w = ours("ours, PNG decoded every batch (Hub layout in place)", png_in_place, args.workers)
    base_loader = torch.utils.data.DataLoader(base_ds, batch_size=bs, shuffle=True, collate_fn=baseline_collate,
                                              num_workers=args.workers)
    base_w = best(lambda: time_loader(base_loader, args.baseline_images * args.workers), max(1, args.repeats - 1))
    print(f"  {'baseline, per-sample PIL + float normalise (Hub layout)':<58} workers={args.workers}: "
          f"{base_w:9.0f} images/s")

    # Scaling, side by side: this machine's speed drifts between passes, so each round times the
    # one-thread pass and both worker passes back to back, and the ratio is taken per round.
    print(f"\nworkers scaling, local copy, rounds of: one thread, {args.workers} workers with shared slots, "
          f"{args.workers} workers sending torch's usual way")
    loaders = [build_dataloader(local, bs, shuffle=True, drop_last=True, num_workers=workers, seed=0,
                                persistent_workers=workers > 0, shared_slots=shared)
               for workers, shared in ((0, True), (args.workers, True), (args.workers, False))]
    shared_ratios, plain_ratios = [], []
    for round_ in range(args.rounds):
        one, shared, plain = (time_loader(loader, n) for loader in loaders)
        shared_ratios.append(shared / (args.workers * one))
        plain_ratios.append(plain / (args.workers * one))
        print(f"  round {round_ + 1}: {one:7.0f} | {shared:7.0f} ({shared_ratios[-1]:.2f} of ideal) | "
              f"{plain:7.0f} ({plain_ratios[-1]:.2f})", flush=True)
    scaling, plain_scaling = statistics.median(shared_ratios), statistics.median(plain_ratios)

    print("\nsummary (images/s; ratio to the baseline in brackets)")
    print(f"  one thread: local copy {ours_local:.0f} ({ours_local / base:.1f}x), CIFAR10 Hub path {ours_hub:.0f} "
          f"({ours_hub / base:.1f}x), PNG every batch {ours_png:.0f} ({ours_png / base:.1f}x); baseline {base:.0f}")
    print(f"  workers={args.workers}: local copy {ours_local_w:.0f} ({ours_local_w / base_w:.1f}x), PNG every batch "
          f"{ours_png_w:.0f} ({ours_png_w / base_w:.1f}x); baseline {base_w:.0f}")
    print(f"  workers scaling, local copy: {args.workers} workers deliver {scaling:.2f} of the ideal "
          f"{args.workers} x one thread (median of {args.rounds} rounds; {plain_scaling:.2f} sent torch's usual way)"
          f"; goal >= 0.8 {'met' if scaling >= 0.8 else 'MISSED'}")
    for name, rate in (("local copy", ours_local), ("CIFAR10 Hub path", ours_hub), ("PNG every batch", ours_png)):
        print(f"  {name}: >= 10000 images/s per core {'met' if rate >= 10000 else 'MISSED'}, "
              f">= 20x baseline {'met' if rate >= 20 * base else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
