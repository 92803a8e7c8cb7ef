"""Ours against mmpretrain 1.2 on the tutorial config, side by side in one run.

Both train the tutorial recipe on the same generated CIFAR-10 files from the same
"pretrained" checkpoint: ResNet-50, 224 px, batch 16, frozen_stages=2, SGD, CPU, 20
iterations (the first 320 training images, one epoch), then their usual end-of-training
evaluation. Each side is one whole command in its own process:

- mmpretrain: ../shared/anchor/run_anchor.sh (its tools/train.py); per-iteration time
  from its log (scalars.json `time`, window 1).
- ours: python -m hf_finetune.run recipes/cifar10.json --data-root ... --work-dir ...
  --cfg-options ...; per-iteration time between consecutive training log lines
  (logger interval 1; the Trainer's logs have no finer clock than images_per_sec,
  rounded to 0.1), checked against the number of log entries in trainer_state.json.

The first --warmup iterations are skipped; the median iteration is the headline (other
processes on the machine only ever add time). Whole-command wall time and CPU time
(user + sys of the command and its children) are reported too: on a shared machine the
CPU time is the steadier of the two. --ours-src runs ours from other checkouts instead
(e.g. one with and one without a patch, in the same run).

Needs the anchor: `bash ../shared/anchor/setup_anchor.sh` (ANCHOR_HOME picks its folder).

Run: python benchmarks/vs_mmpretrain.py [--rounds 1] [--ours-src /tmp/patched_copy]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ANCHOR_SCRIPTS = REPO.parent / "shared" / "anchor"
# One training log line per update (not eval_loss): mmengine-style lines, or the Trainer's
# dict lines of older checkouts (--ours-src).
TRAIN_LOG = re.compile(rb"\{'loss': |(?:Epoch|Iter)\(train\) \[")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--anchor-home", default=os.environ.get("ANCHOR_HOME",
                                                           str(Path.home() / ".cache" / "mmpretrain_anchor")),
                   help="the anchor's folder (setup_anchor.sh's ANCHOR_HOME)")
    p.add_argument("--anchor-scripts", default=str(ANCHOR_SCRIPTS), help="folder holding run_anchor.sh")
    p.add_argument("--iters", type=int, default=20, help="training iterations (batch 16, one epoch)")
    p.add_argument("--warmup", type=int, default=2, help="first iterations left out of the per-iteration time")
    p.add_argument("--rounds", type=int, default=1, help="repeats; the order of the sides alternates")
    p.add_argument("--ours-src", action="append", default=[], metavar="DIR",
                   help="run ours from this checkout (its hf_finetune/ and recipes/) instead of this one; "
                        "repeat to compare checkouts (e.g. with and without a patch) in the same run")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="extra options for ours")
    p.add_argument("--keep", metavar="DIR", help="keep the work dirs and logs here")
    args = p.parse_args(argv)
    if args.iters < args.warmup + 2 or args.warmup < 0 or args.rounds < 1:
        p.error("need --iters >= --warmup + 2, --warmup >= 0 and --rounds >= 1")
    return args


def run_command(cmd, *, cwd, env, log_path):
    """Run one whole command; (wall s, cpu s, [monotonic stamp of each training log line]).

    Output is read as it comes so every Trainer log line gets the time it was written.
    """
    stamps = []
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        pending = b""  # unmatched end of the output: a log line may span two reads
        while chunk := os.read(proc.stdout.fileno(), 65536):
            now = time.perf_counter()
            log.write(chunk)
            pending += chunk
            matches = list(TRAIN_LOG.finditer(pending))
            stamps += [now] * len(matches)
            pending = pending[matches[-1].end() if matches else 0:][-16:]
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"error: {' '.join(map(str, cmd[:3]))} ... exited with {code}; log: {log_path}")
    return wall, usage.ru_utime + usage.ru_stime, stamps


def run_mmpretrain(args, work):
    env = dict(os.environ, ANCHOR_HOME=args.anchor_home)
    cmd = ["bash", str(Path(args.anchor_scripts) / "run_anchor.sh"), str(work), "--cfg-options",
           "randomness.seed=0", f"train_dataloader.dataset.indices={16 * args.iters}", "log_processor.window_size=1"]
    wall, cpu, _ = run_command(cmd, cwd=args.anchor_home, env=env, log_path=work.with_suffix(".log"))
    scalars = sorted(work.glob("*/vis_data/scalars.json"))
    if not scalars:
        raise SystemExit(f"error: mmpretrain wrote no scalars.json under {work}")
    rows = [json.loads(line) for line in scalars[-1].read_text().splitlines() if line.strip()]
    iters = [row["time"] for row in rows if "loss" in row]
    return {"wall": wall, "cpu": cpu, "iters": iters}


def ours_command(args, src, work):
    data = Path(args.anchor_home) / "data" / "cifar10"
    checkpoint = Path(args.anchor_home) / "checkpoints" / "resnet50_random_in1k_layout.pth"
    return [sys.executable, "-m", "hf_finetune.run", str(Path(src) / "recipes" / "cifar10.json"),
            "--data-root", str(data), "--work-dir", str(work), "--cfg-options",
            f"model.backbone.init_cfg.checkpoint={checkpoint}",
            f"train_dataloader.dataset.indices={16 * args.iters}",
            "train_cfg.total_batch_size=16", "train_cfg.max_epochs=1",
            "default_hooks.logger.interval=1", "randomness.seed=0", *args.cfg_options]


def run_ours(args, src, work):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    wall, cpu, stamps = run_command(ours_command(args, src, work), cwd=src, env=env,
                                    log_path=work.with_suffix(".log"))
    state = json.loads((work / "trainer_state.json").read_text())
    logged = [e["step"] for e in state["log_history"] if "loss" in e]
    if logged != list(range(1, args.iters + 1)) or len(stamps) != args.iters:
        raise SystemExit(f"error: ours logged steps {logged} ({len(stamps)} log lines seen), expected 1..{args.iters}")
    # Iteration k lasts from log line k-1 to line k; iteration 1 has no start line (None).
    iters = [None] + [b - a for a, b in zip(stamps, stamps[1:])]
    return {"wall": wall, "cpu": cpu, "iters": iters}


def prepare_anchor(args):
    home = Path(args.anchor_home)
    python = home / "venv" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"error: no anchor in {home}: run `ANCHOR_HOME={home} bash "
                         f"{Path(args.anchor_scripts) / 'setup_anchor.sh'}` first (about a minute)")
    # The generated data and checkpoint are made once, outside the timed commands.
    if not (home / "data/cifar10/cifar-10-batches-py/test_batch").exists():
        subprocess.run([str(python), "make_synthetic_cifar10.py", "data/cifar10"], cwd=home, check=True)
    if not (home / "checkpoints/resnet50_random_in1k_layout.pth").exists():
        subprocess.run([str(python), "make_random_pretrained.py", "checkpoints/resnet50_random_in1k_layout.pth"],
                       cwd=home, check=True)


def summary(result, warmup):
    timed = [t for t in result["iters"][warmup:] if t is not None]
    return {"median": statistics.median(timed), "mean": statistics.fmean(timed), "wall": result["wall"],
            "cpu": result["cpu"]}


def main(argv=None):
    args = parse_args(argv)
    prepare_anchor(args)
    sources = [Path(src).resolve() for src in args.ours_src] or [REPO]
    sides = [("mmpretrain", None)] + [("ours" if src == REPO else f"ours@{src}", src) for src in sources]
    root = Path(args.keep or tempfile.mkdtemp(prefix="vs_mmpretrain_"))
    root.mkdir(parents=True, exist_ok=True)
    results = {name: [] for name, _ in sides}
    print(f"ResNet-50 224 px, batch 16, frozen_stages=2, CPU, {args.iters} iterations "
          f"(first {args.warmup} skipped), {args.rounds} round(s); logs in {root}", flush=True)
    try:
        for r in range(args.rounds):
            for name, src in (sides if r % 2 == 0 else sides[::-1]):
                work = root / f"{name.replace('@', '_').replace('/', '_')}_r{r + 1}"
                shutil.rmtree(work, ignore_errors=True)
                result = run_mmpretrain(args, work) if src is None else run_ours(args, src, work)
                results[name].append(summary(result, args.warmup))
                s = results[name][-1]
                print(f"  round {r + 1} {name}: median {s['median']:.3f} s/iter, mean {s['mean']:.3f}, "
                      f"command {s['wall']:.1f} s wall, {s['cpu']:.1f} s CPU", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    # Outside load only adds time: the best round of each side is its steadiest figure.
    best = {name: {key: min(s[key] for s in runs) for key in runs[0]} for name, runs in results.items()}
    ref = best["mmpretrain"]
    print(f"{'':24}{'s/iter':>9}{'mean':>9}{'wall s':>9}{'CPU s':>9}{'iter':>8}{'command':>9}{'CPU':>7}")
    for name, b in best.items():
        print(f"{name:24}{b['median']:9.3f}{b['mean']:9.3f}{b['wall']:9.1f}{b['cpu']:9.1f}"
              f"{b['median'] / ref['median']:8.2f}{b['wall'] / ref['wall']:9.2f}{b['cpu'] / ref['cpu']:7.2f}")
    for name, b in best.items():
        if name != "mmpretrain":
            print(f"ratio {name}/mmpretrain: per iteration {b['median'] / ref['median']:.2f}, "
                  f"whole command {b['wall'] / ref['wall']:.2f} (CPU {b['cpu'] / ref['cpu']:.2f}); goal <= 1.0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
