"""Images/s of the train pipeline reading WebDataset tar shards, against the same JPEGs from an image folder.

Both sides run our real path with the ImageNet-style train pipeline at 224 px (RandomResizedCrop(224)
-> RandomFlip(0.5) -> PackClsInputs) on the same generated photo-like JPEGs (~500x375):

- shards: a WebDataset split (type "WebDataset": datasets' webdataset loader, streamed, shuffle buffer
  of 1000) through build_stream_loader, as training reads it;
- folder: the image folder through build_datasets (HFImageDataset with data_root) and build_dataloader.

One process, DataLoader workers=0, one torch thread. Figures are images per CPU-second of this
process (time.process_time), best of --repeats passes of about --num-images images, the two sides
interleaved; the ratio shards / folder is what reading tar shards instead of files costs or saves.
Run: python benchmarks/streaming_shards.py [--num-images 512] [--shards 8] [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data_pipeline import time_loader  # noqa: E402  (this folder)
from imagefolder_pipeline import CLASSES, write_jpeg_folder  # noqa: E402

PIPELINE = [{"type": "RandomResizedCrop", "scale": 224}, {"type": "RandomFlip", "prob": 0.5},
            {"type": "PackClsInputs"}]


def write_shards(folder: Path, out: Path, shards: int) -> list[str]:
    """The image folder's JPEGs as WebDataset shards: <key>.jpg + <key>.cls (the class index)."""
    files = sorted(folder.glob("*/*.jpg"))
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"train-{k:04d}.tar" for k in range(shards)]
    tars = [tarfile.open(p, "w") for p in paths]
    try:
        for i, path in enumerate(files):
            tar = tars[i % shards]
            for name, data in ((f"{path.stem}.jpg", path.read_bytes()),
                               (f"{path.stem}.cls", str(CLASSES.index(path.parent.name)).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    finally:
        for tar in tars:
            tar.close()
    return [str(p) for p in paths]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=512, help="JPEGs generated and timed per pass")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="passes per figure; the best is reported")
    parser.add_argument("--quick", action="store_true", help="a small, fast run (64 images, batch 16, 1 pass)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_images, args.batch_size, args.shards, args.repeats = 64, 16, 2, 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="hf_finetune_bench_shards_"))
    try:
        report = run(args, work)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def run(args, work: Path) -> dict:
    os.environ["HF_DATASETS_CACHE"] = str(work / "cache")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    from hf_finetune.config import config_from_dict
    from hf_finetune.data import build_dataloader, build_datasets, build_stream_loader

    datasets.disable_progress_bars()
    total = args.num_images + 2 * args.batch_size  # the first batch of a pass is not timed
    write_jpeg_folder(work / "photos", total)
    shards = write_shards(work / "photos" / "train", work / "shards", args.shards)

    def dataset(**keys):
        return {"model": {"head": {"num_classes": len(CLASSES)}},
                "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.1}},
                "train_dataloader": {"batch_size": args.batch_size, "dataset": {"pipeline": PIPELINE, **keys}}}

    folder_split = build_datasets(config_from_dict(dataset(
        type="HFImageDataset", data_root=str(work / "photos"), split="train")))["train"]
    shard_split = build_datasets(config_from_dict(dataset(
        type="WebDataset", shards=shards, classes=list(CLASSES), num_samples=total)))["train"]
    folder_loader = build_dataloader(folder_split, args.batch_size, shuffle=True, drop_last=True, seed=0)
    shard_loader = build_stream_loader(shard_split, args.batch_size, epoch_batches=total // args.batch_size,
                                       shuffle=True, seed=0)

    shard_rates, folder_rates = [], []
    for _ in range(args.repeats):
        shard_rates.append(time_loader(shard_loader, args.num_images, time.process_time))
        folder_rates.append(time_loader(folder_loader, args.num_images, time.process_time))
    report = {"images": total, "shards": args.shards, "batch_size": args.batch_size,
              "shards_images_per_sec": round(max(shard_rates), 1),
              "folder_images_per_sec": round(max(folder_rates), 1)}
    report["ratio_shards_to_folder"] = round(report["shards_images_per_sec"] / report["folder_images_per_sec"], 3)
    print(f"one process, workers=0, torch threads=1, batch {args.batch_size}, 224 px, {total} JPEGs; "
          f"images per CPU-second")
    print(f"  shards ({args.shards} WebDataset .tar, streamed): {report['shards_images_per_sec']:7.0f} images/s")
    print(f"  folder (image folder, indexed):          {report['folder_images_per_sec']:7.0f} images/s")
    print(f"  ratio shards / folder: {report['ratio_shards_to_folder']:.2f}x")
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
