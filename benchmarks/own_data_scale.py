"""Own image folders at scale: ours (the folder indexed by path) against datasets.load_dataset("imagefolder").

On generated JPEG folders of --sizes photos (~500x375, 10 class folders), each measurement in a fresh
subprocess with a fresh HF_DATASETS_CACHE:

- time to the first training batch, from the moment the training stack is imported (torch, datasets,
  transformers' Trainer: both training scripts import it; that import time is reported apart):
  ours = build_datasets on the folder (index, stratified val_split 0.15) + build_dataloader + first batch;
  theirs = load_dataset("imagefolder") + train_test_split(0.15) + the transformers example's per-sample
  transforms (RandomResizedCrop 224, flip, normalise; Pillow, as benchmarks/imagefolder_pipeline.py) +
  a torch DataLoader's first batch. Both: batch 64, no workers.
- peak RSS of the child (resource.getrusage ru_maxrss);
- cache bytes: everything the run left in its HF_DATASETS_CACHE, against the folder's bytes.

And the index alone on --index-files small files (100 class folders), pinned to one core (taskset -c 0):
first build and reuse.

Goals (issue 21): RSS at the largest size within 100 MB of the smallest; cache <= 5% of the folder;
first batch no slower than load_dataset("imagefolder"); the 100k-file index in <= 10 s on one core.

Generation is fast: a few photo-like images encoded once, each file one of them with its own JPEG comment
segment (different bytes, same pixels). It needs disk: about 0.8 GB at 20k photos; everything is written
under --work (default: a temporary folder in /tmp) and deleted at the end.

Run: python benchmarks/own_data_scale.py [--sizes 2000 20000] [--index-files 100000] [--json report.json]
     python benchmarks/own_data_scale.py --quick      # seconds: tiny folders, the same code path (tests)
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # a child's clock starts before its imports

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NUM_CLASSES = 10
GOALS = {"rss_growth_mb": 100.0, "cache_fraction": 0.05, "index_s": 10.0}


def _jpeg_with_comment(data: bytes, text: str) -> bytes:
    """The same JPEG with a COM segment after SOI: other bytes, same pixels."""
    comment = text.encode()
    return data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]


def _encoded_photos(count: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    import io

    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(HERE))
    from imagefolder_pipeline import photo_like

    rng = np.random.default_rng(seed)
    photos = []
    for k in range(count):
        width, height = size if k % 2 == 0 else size[::-1]  # landscape and portrait
        buffer = io.BytesIO()
        Image.fromarray(photo_like(rng, width, height)).save(buffer, format="JPEG", quality=90)
        photos.append(buffer.getvalue())
    return photos


def write_folder(root: Path, n: int, size: tuple[int, int], classes: int = NUM_CLASSES, distinct: int = 16) -> int:
    """root/class<k>/<i>.jpg, n files; -> their total bytes."""
    photos = _encoded_photos(distinct, size)
    for k in range(classes):
        (root / f"class{k:03d}").mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(n):
        data = _jpeg_with_comment(photos[i % distinct], f"hf_finetune benchmark {i}")
        (root / f"class{i % classes:03d}" / f"{i:06d}.jpg").write_bytes(data)
        total += len(data)
    return total


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ------------------------------------------------------------------ children (fresh processes)


def child_ours(folder: str, batch: int, start: float) -> dict:
    from hf_finetune.config import config_from_dict
    from hf_finetune.data import build_dataloader, build_datasets

    pipeline = [{"type": "RandomResizedCrop", "scale": 224, "backend": "pillow"},
                {"type": "RandomFlip", "prob": 0.5, "direction": "horizontal"}, {"type": "PackClsInputs"}]
    cfg = config_from_dict({
        "model": {"head": {"num_classes": None, "topk": [1]}},
        "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.1}},
        "train_dataloader": {"batch_size": batch, "dataset": {"type": "HFImageDataset", "data_root": folder,
                                                              "split": "train", "pipeline": pipeline}},
        "val_dataloader": {"batch_size": batch, "dataset": {"type": "HFImageDataset", "data_root": folder,
                                                            "split": "val", "pipeline": pipeline}},
    })
    dd = build_datasets(cfg)
    ready = time.perf_counter() - start
    first = next(iter(build_dataloader(dd["train"], batch, shuffle=True, seed=0, num_workers=0)))
    return {"ready_s": ready, "images": len(dd["train"]), "batch_shape": list(first["pixel_values"].shape)}


def child_theirs(folder: str, batch: int, cache: str, start: float) -> dict:
    import datasets
    import torch

    sys.path.insert(0, str(HERE))
    from imagefolder_pipeline import baseline_collate, baseline_transform

    train = datasets.load_dataset("imagefolder", data_dir=folder, split="train", cache_dir=cache)
    train = train.train_test_split(test_size=0.15, seed=0)["train"]  # the example's train_val_split
    train = train.rename_column("image", "img")
    train.set_transform(baseline_transform)
    ready = time.perf_counter() - start
    loader = torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True, collate_fn=baseline_collate)
    first = next(iter(loader))
    return {"ready_s": ready, "images": len(train), "batch_shape": list(first["pixel_values"].shape)}


def child_index(folder: str) -> dict:
    from hf_finetune.data import sources

    start = time.perf_counter()
    index = sources._index_imagefolder(Path(folder))
    first = time.perf_counter() - start
    start = time.perf_counter()
    sources._index_imagefolder(Path(folder))
    return {"index_s": first, "reuse_s": time.perf_counter() - start, "files": sum(map(len, index.values()))}


def run_child(kind: str, folder: Path, cache: Path, batch: int, one_core: bool = False) -> dict:
    """The script itself in a fresh process; -> its figures, with peak RSS and the cache's bytes."""
    cache.mkdir(parents=True)
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--folder", str(folder),
               "--batch-size", str(batch), "--cache", str(cache)]
    if one_core and shutil.which("taskset"):
        command = ["taskset", "-c", "0"] + command
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["cache_bytes"] = folder_bytes(cache)
    result["pinned_to_one_core"] = bool(one_core and shutil.which("taskset"))
    return result


def child_main(args) -> int:
    if args.child == "index":
        result = child_index(args.folder)
    else:
        import datasets  # noqa: F401
        import torch
        from transformers import Trainer  # noqa: F401

        torch.set_num_threads(1)
        start = time.perf_counter()
        result = child_ours(args.folder, args.batch_size, start) if args.child == "ours" else \
            child_theirs(args.folder, args.batch_size, args.cache, start)
        result["first_batch_s"] = time.perf_counter() - start
        result["stack_import_s"] = start - T0
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))
    return 0


# ------------------------------------------------------------------ the parent


def measure(args, work: Path) -> dict:
    size = (64, 48) if args.quick else (500, 375)
    report = {"quick": args.quick, "photo_size": list(size), "batch_size": args.batch_size, "sizes": {},
              "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "cpu_count": os.cpu_count()}
    for n in args.sizes:
        folder = work / f"photos_{n}"
        start = time.perf_counter()
        written = write_folder(folder, n, size)
        entry = {"folder_bytes": written, "generate_s": time.perf_counter() - start}
        for kind in ("ours", "theirs"):
            entry[kind] = run_child(kind, folder, work / f"cache_{kind}_{n}", args.batch_size)
            entry[kind]["cache_fraction"] = entry[kind]["cache_bytes"] / written
        report["sizes"][str(n)] = entry
        shutil.rmtree(folder, ignore_errors=True)
    folder = work / "small_files"
    write_folder(folder, args.index_files, (32, 32), classes=100, distinct=1)
    report["index"] = run_child("index", folder, work / "cache_index", args.batch_size, one_core=True)
    shutil.rmtree(folder, ignore_errors=True)
    report["goals"] = goals(report)
    return report


def goals(report: dict) -> dict:
    sizes = report["sizes"]
    small, large = sizes[min(sizes, key=int)], sizes[max(sizes, key=int)]
    growth = large["ours"]["max_rss_mb"] - small["ours"]["max_rss_mb"]
    cache = max(entry["ours"]["cache_fraction"] for entry in sizes.values())
    slower = max(entry["ours"]["first_batch_s"] / entry["theirs"]["first_batch_s"] for entry in sizes.values())
    index_s = report["index"]["index_s"]
    return {
        "rss_growth_mb": {"value": growth, "goal": f"<= {GOALS['rss_growth_mb']}",
                          "met": growth <= GOALS["rss_growth_mb"]},
        "cache_fraction": {"value": cache, "goal": f"<= {GOALS['cache_fraction']}",
                           "met": cache <= GOALS["cache_fraction"]},
        "first_batch_ours_over_theirs": {"value": slower, "goal": "<= 1", "met": slower <= 1.0},
        "index_s": {"value": index_s, "files": report["index"]["files"], "goal": f"<= {GOALS['index_s']} (100k files)",
                    "met": index_s <= GOALS["index_s"]},
    }


def print_report(report: dict) -> None:
    print(f"own image folders ({report['photo_size'][0]}x{report['photo_size'][1]} JPEGs, batch "
          f"{report['batch_size']}, load average {report['load']}, {report['cpu_count']} cores)")
    print(f"{'images':>8} {'folder MB':>10} | {'first batch s':>15} | {'peak RSS MB':>15} | "
          f"{'cache MB (% folder)':>27}")
    print(f"{'':>8} {'':>10} | {'ours':>7} {'theirs':>7} | {'ours':>7} {'theirs':>7} | {'ours':>13} {'theirs':>13}")
    for n, entry in report["sizes"].items():
        ours, theirs = entry["ours"], entry["theirs"]
        print(f"{int(n):>8} {entry['folder_bytes'] / 2**20:>10.1f} | {ours['first_batch_s']:>7.2f} "
              f"{theirs['first_batch_s']:>7.2f} | {ours['max_rss_mb']:>7.0f} {theirs['max_rss_mb']:>7.0f} | "
              f"{ours['cache_bytes'] / 2**20:>6.2f} ({100 * ours['cache_fraction']:.2f}%) "
              f"{theirs['cache_bytes'] / 2**20:>6.2f} ({100 * theirs['cache_fraction']:.2f}%)")
    index = report["index"]
    imports = [e[k]["stack_import_s"] for e in report["sizes"].values() for k in ("ours", "theirs")]
    print(f"(first batch: after importing torch, datasets and transformers' Trainer, {min(imports):.1f} to "
          f"{max(imports):.1f} s, which both pay)")
    print(f"index of {index['files']} files on one core: {index['index_s']:.2f} s, reused in {index['reuse_s']:.2f} s")
    for name, goal in report["goals"].items():
        print(f"goal {name}: {goal['value']:.3g} ({goal['goal']}): {'met' if goal['met'] else 'NOT met'}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000], help="photos per folder")
    parser.add_argument("--index-files", type=int, default=100_000, help="small files for the index timing")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--work", help="where folders and caches go (default: a new folder in /tmp), deleted after")
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--quick", action="store_true", help="tiny folders (40 and 80 64x48 photos, 500 files "
                                                            "indexed, batch 8): checks the code path in seconds")
    parser.add_argument("--child", choices=("ours", "theirs", "index"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.index_files, args.batch_size = [40, 80], 500, 8
    return args


def main(argv=None) -> dict | int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    work = Path(tempfile.mkdtemp(prefix="hf_finetune_own_data_", dir=args.work))
    try:
        report = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
