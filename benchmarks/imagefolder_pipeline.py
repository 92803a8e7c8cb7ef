"""Images/s of the ImageNet-style train pipeline on a folder of mixed-size JPEGs, ours against the baseline.

Train pipeline at 224 px: RandomResizedCrop(224) -> RandomFlip(0.5) [-> RandAugment with --randaugment]
-> PackClsInputs.

- ours: the real path. build_datasets reads the image folder (JPEG bytes kept as they
  are in the Arrow cache) with the batched transform; build_dataloader fetches whole
  batches. Per image only the crop is decoded and converted (at 1/2, 1/4 or 1/8 JPEG
  scale when the crop is at least twice the output), then resized straight into the
  uint8 batch.
- baseline: the transformers image-classification example's train transforms
  (RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize) written with
  Pillow / numpy: the datasets Image feature decodes each whole image to PIL, per-sample
  crop + resize, float conversion and normalisation on the CPU, then the default
  batching of a torch DataLoader. Same Arrow data, same run.

One process, DataLoader workers=0, one torch thread. Figures are images per CPU-second
of this process (time.process_time: with one thread, images/s per core, and robust to
other load on the machine), best of --repeats passes over --num-images images, ours and
the baseline passes interleaved.
Run: python benchmarks/imagefolder_pipeline.py [--num-images 512] [--randaugment]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from data_pipeline import time_loader  # this folder is on sys.path when run as a script

SIZES = [(500, 375), (375, 500), (500, 333), (480, 360)]  # (width, height), photo-like mix
CLASSES = ("cat", "dog", "bird", "fish")
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def photo_like(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth colour fields, a few flat rectangles and sensor-like noise: JPEG sizes like real photos."""
    x, y = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.005, 0.04), rng.uniform(0.005, 0.04), rng.uniform(0, 6.3)
        channels.append(128 + 90 * np.outer(np.cos(fy * y), np.sin(fx * x + phase)))
    image = np.stack(channels, -1)
    for _ in range(6):
        top, left = int(rng.integers(0, height - 20)), int(rng.integers(0, width - 20))
        h, w = rng.integers(20, 120, 2)
        image[top:top + h, left:left + w] = rng.uniform(0, 255, 3)
    image += rng.integers(-8, 9, image.shape, dtype=np.int8)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_jpeg_folder(root: Path, n: int, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / "train" / CLASSES[i % len(CLASSES)]
        folder.mkdir(parents=True, exist_ok=True)
        width, height = SIZES[i % len(SIZES)]
        Image.fromarray(photo_like(rng, width, height)).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def random_resized_crop_box(width: int, height: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params with Python's random module: (left, top, w, h)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return random.randint(0, width - w), random.randint(0, height - h), w, h
    in_ratio = width / height
    w, h = (width, int(round(width / ratio[0]))) if in_ratio < ratio[0] else \
        (int(round(height * ratio[1])), height) if in_ratio > ratio[1] else (width, height)
    return (width - w) // 2, (height - h) // 2, w, h


def baseline_transform(example_batch):
    """transformers example style, per sample: RandomResizedCrop, flip, ToTensor, Normalize."""
    from PIL import Image

    pixel_values = []
    for image in example_batch["img"]:
        image = image.convert("RGB")
        left, top, w, h = random_resized_crop_box(*image.size)
        image = image.resize((224, 224), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        if random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = (np.asarray(image, dtype=np.float32) / 255.0 - MEAN) / STD
        pixel_values.append(torch.from_numpy(array.transpose(2, 0, 1).copy()))
    example_batch["pixel_values"] = pixel_values
    return example_batch


def baseline_collate(examples):
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["label"] for e in examples])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=512, help="JPEGs generated and timed per pass")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="passes per figure; the best is reported")
    parser.add_argument("--randaugment", action="store_true",
                        help="add RandAugment (timm_increasing, 2 ops, level 9, std 0.5) to ours; the baseline has none")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="hf_finetune_bench_jpeg_"))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> int:
    os.environ["HF_DATASETS_CACHE"] = str(work / "cache")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    from hf_finetune.config import config_from_dict
    from hf_finetune.data import build_dataloader, build_datasets

    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    write_jpeg_folder(work / "photos", args.num_images + args.batch_size)
    print(f"wrote {args.num_images + args.batch_size} JPEGs ({', '.join(f'{w}x{h}' for w, h in SIZES)}) "
          f"in {time.perf_counter() - t0:.1f} s")

    pipeline = [{"type": "RandomResizedCrop", "scale": 224}, {"type": "RandomFlip", "prob": 0.5}]
    if args.randaugment:
        pipeline.append({"type": "RandAugment", "policies": "timm_increasing", "num_policies": 2,
                         "magnitude_level": 9, "magnitude_std": 0.5})
    pipeline.append({"type": "PackClsInputs"})
    recipe = config_from_dict({
        "model": {"head": {"num_classes": None}},  # from the class folders
        "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.1}},
        "train_dataloader": {"batch_size": args.batch_size, "dataset": {
            "type": "HFImageDataset", "data_root": str(work / "photos"), "split": "train", "pipeline": pipeline}},
    })
    ours_ds = build_datasets(recipe)["train"]
    ours_loader = build_dataloader(ours_ds, args.batch_size, shuffle=True, drop_last=True, num_workers=0, seed=0)

    base_ds = ours_ds.with_format(None).cast_column("img", datasets.Image())
    base_ds.set_transform(baseline_transform)
    base_loader = torch.utils.data.DataLoader(base_ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                              collate_fn=baseline_collate)

    ours, base = [], []
    for _ in range(args.repeats):
        ours.append(time_loader(ours_loader, args.num_images, time.process_time))
        base.append(time_loader(base_loader, args.num_images, time.process_time))
    ours, base = max(ours), max(base)
    steps = " -> ".join(step["type"] for step in pipeline)
    print(f"one process, workers=0, torch threads=1, batch {args.batch_size}, 224 px; images per CPU-second")
    print(f"  ours     ({steps}): {ours:7.0f} images/s")
    print(f"  baseline (per-sample PIL + float, transformers example): {base:7.0f} images/s")
    print(f"  ratio ours / baseline: {ours / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
