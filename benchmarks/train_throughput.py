"""Training images/s of our full path next to a bare PyTorch loop, same model, batch and data.

- ours: recipes/cifar10.json (load_config + cfg_options) -> build_datasets ->
  build_trainer -> Trainer.train. Timed: Arrow read + image decode + batched uint8
  transform + DataLoader + Trainer step + model (uint8 normalised inside the model).
- bare: the same model config and seed; the batches are the very uint8 tensors our
  pipeline produces, decoded and transformed before the clock starts; per step only
  model(pixel_values, labels).loss.backward(), SGD step over the trainable parameters,
  LR scheduler step, zero_grad.

Both skip --warmup steps and time the next --steps (steady state). A step of ours is
timed from one Trainer `on_step_end` to the next (a TrainerCallback), so it includes
fetching its batch. On the CPU the two are interleaved by default: one bare step runs
right after each step of ours, inside the same Trainer run, so load from other
processes hits both alike (separate runs on a shared 2-core machine differ by +-10%
between runs). --no-interleave (always on CUDA, where interleaving would need a sync
per step) runs them one after the other instead, the order alternating per round. The
measurement is repeated --rounds times: interleaved rounds are pooled, separate runs
compare the best round of each side. The ratio ours/bare is the cost of everything
around the model (target >= 0.95).

Synthetic CIFAR-10 data (SyntheticCIFAR10, 32x32 PNG), no pretrained download.

Modes:
  CPU (default): 32 px, batch 32, ResNet-50, frozen_stages from the recipe (2).
  --device cuda: 224 px, bf16 autocast, channels_last, 8 workers, batch 128.
  --tutorial:    the mmcls tutorial point on this CPU: ResNet-50 at 224, batch 16,
                 frozen_stages 2; reports s/iteration (mmpretrain 1.2: about 2.0 s/iter
                 on a 2-core machine).

Run: python benchmarks/train_throughput.py [--tutorial] [--no-interleave] [--device cuda]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "cifar10.json"
MMPRETRAIN_TUTORIAL_S_PER_ITER = 2.0  # mmpretrain 1.2, tutorial config, 2-core CPU


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--tutorial", action="store_true",
                   help="ResNet-50 at 224 px, batch 16, frozen_stages 2, on the CPU; s/iteration")
    p.add_argument("--size", type=int, help="input size (Resize scale); default 32 on CPU, 224 on CUDA")
    p.add_argument("--batch", type=int, help="total batch size; default 32 on CPU, 128 on CUDA")
    p.add_argument("--depth", type=int, default=50, choices=(18, 34, 50, 101, 152))
    p.add_argument("--frozen-stages", type=int, help="default: the recipe's (2)")
    p.add_argument("--warmup", type=int, help="untimed steps first; default 3 (2 with --tutorial)")
    p.add_argument("--steps", type=int, help="timed steps; default 20 (5 with --tutorial)")
    p.add_argument("--num-workers", type=int, help="DataLoader workers; default 0 on CPU, 8 on CUDA")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--rounds", type=int, default=2,
                   help="repeats (default 2): interleaved ones are pooled; separate runs alternate "
                        "their order and the best of each side is reported")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction,
                   help="one bare step after each step of ours, in one run (default on CPU: robust to "
                        "outside load); --no-interleave: separate runs")
    p.add_argument("--sync-debug", action="store_true",
                   help="CUDA: list the synchronising operations in ours' timed steps")
    p.add_argument("--recipe", default=str(RECIPE))
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="applied last to our recipe (e.g. to try a training_args setting)")
    args = p.parse_args(argv)

    if args.tutorial:
        if args.device != "cpu":
            p.error("--tutorial is the CPU reference point; drop --device cuda")
        defaults = dict(size=224, batch=16, warmup=2, steps=5, num_workers=0)
    elif args.device == "cuda":
        defaults = dict(size=224, batch=128, warmup=3, steps=20, num_workers=8)
    else:
        defaults = dict(size=32, batch=32, warmup=3, steps=20, num_workers=0)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup, --steps and --rounds must be >= 1")
    if args.interleave is None:
        args.interleave = args.device == "cpu"
    if args.interleave and args.device == "cuda":
        p.error("--interleave is for CPUs: on a GPU it would need a sync per step")
    if args.sync_debug and args.device != "cuda":
        p.error("--sync-debug needs --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"error: --device cuda: no CUDA device visible (torch {torch.__version__}, "
              f"torch.cuda.is_available() is False); run this on a GPU machine or use --device cpu",
              file=sys.stderr)
        sys.exit(2)
    return args


# --- the recipe ----------------------------------------------------------------------------


def build_recipe(args, work_dir):
    from hf_finetune import load_config

    base = load_config(args.recipe)
    pipeline = base.train_dataloader.dataset.pipeline
    resize = [i for i, step in enumerate(pipeline) if step.type == "Resize"]
    if not resize:
        raise SystemExit(f"error: {args.recipe}: the train pipeline has no Resize step to set --size on")
    total_iters = args.warmup + args.steps
    cuda = args.device == "cuda"
    options = [
        f"work_dir={work_dir}",
        "model.backbone.init_cfg=null",  # no download; speed does not depend on the weights
        f"model.backbone.depth={args.depth}",
        "train_dataloader.dataset.type=SyntheticCIFAR10",
        f"train_dataloader.dataset.num_samples={total_iters * args.batch}",
        "train_dataloader.dataset.seed=0",
        f"train_dataloader.dataset.pipeline.{resize[0]}.scale={args.size}",
        f"train_dataloader.num_workers={args.num_workers}",
        "train_dataloader.drop_last=true",
        f"train_cfg.total_batch_size={args.batch}",
        "train_cfg.by_epoch=false",
        f"train_cfg.max_iters={total_iters}",
        "val_dataloader=null",  # no evaluation
        "test_dataloader=null",
        "default_hooks.checkpoint.interval=-1",  # no checkpoints
        "default_hooks.logger.interval=1000000",  # a log line syncs and formats: keep it out
        "randomness.seed=0",
        f"env_cfg.channels_last={'true' if cuda else 'false'}",
        "log_level=warning",
    ]
    if args.depth < 50:
        options.append("model.head.in_channels=512")
    if args.frozen_stages is not None:
        options.append(f"model.backbone.frozen_stages={args.frozen_stages}")
    if cuda:
        options += ["training_args.bf16=true", "env_cfg.cudnn_benchmark=true"]
    return load_config(args.recipe, cfg_options=options + args.cfg_options)


# --- timing --------------------------------------------------------------------------------


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def durations_of(stamps, warmup):
    """Seconds of each timed step from the end-of-step stamps of every step."""
    timed = stamps[warmup - 1:]  # the last warm-up step's stamp starts the clock
    return [b - a for a, b in zip(timed, timed[1:])]


def summarise(durations, batch):
    """images/s (the throughput) and mean / median / fastest step seconds.

    Outside load only ever adds time to a step, so the median and the fastest step are
    the steadier numbers on a shared CPU.
    """
    total = sum(durations)
    return {"ips": len(durations) * batch / total, "mean": total / len(durations),
            "median": statistics.median(durations), "min": min(durations), "durations": list(durations)}


# --- bare ----------------------------------------------------------------------------------


def prepare_batches(dataset, args):
    """The uint8 batches our pipeline produces (decoded, cropped, flipped, resized), built now."""
    n = args.warmup + args.steps
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    batches = []
    for i in range(n):
        batch = dataset[order[i * args.batch:(i + 1) * args.batch]]
        pixels, labels = batch["pixel_values"], batch["labels"]
        if args.device == "cuda":
            # Already in device memory, in the layout the channels_last model wants.
            pixels = pixels.to("cuda").contiguous(memory_format=torch.channels_last)
            labels = labels.to("cuda")
        batches.append((pixels, labels))
    return batches


class BareLoop:
    """The same model config and seed, plain torch: forward, backward, SGD, scheduler."""

    def __init__(self, recipe, args, id2label):
        from hf_finetune.models import build_model

        self.cuda = args.device == "cuda"
        torch.manual_seed(0)
        model = build_model(recipe.model, recipe.data_preprocessor, id2label).to(args.device)
        if self.cuda:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.train()
        cfg = recipe.optim_wrapper.optimizer
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=[10**6], gamma=0.1)

    def step(self, pixels, labels):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
            loss = self.model(pixels, labels).loss
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def run_bare(recipe, batches, args, id2label):
    loop = BareLoop(recipe, args, id2label)
    stamps = []
    for step, (pixels, labels) in enumerate(batches, start=1):
        loop.step(pixels, labels)
        if step in (args.warmup, len(batches)):
            sync(args.device)
        stamps.append(time.perf_counter())
    return summarise(durations_of(stamps, args.warmup), args.batch)


# --- ours ----------------------------------------------------------------------------------


def make_step_clock(args, bare=None, batches=None):
    """A TrainerCallback stamping perf_counter at the end of every optimizer step of ours.

    On CUDA it synchronises only at the two steps that bound the timed window, so the
    Trainer's asynchronous queue is not disturbed in between. With `bare`, it runs one
    bare step after each step of ours and times the two apart.
    """
    from transformers import TrainerCallback

    total = args.warmup + args.steps

    class StepClock(TrainerCallback):
        def __init__(self):
            self.stamps, self.ours, self.bare = [], [], []
            self.threads = None

        def on_step_end(self, _args, state, control, **kwargs):
            if args.sync_debug and state.global_step == total:
                torch.cuda.set_sync_debug_mode(0)
            if state.global_step in (args.warmup, total):
                sync(args.device)
            if args.sync_debug and state.global_step == args.warmup:
                torch.cuda.set_sync_debug_mode("warn")  # our own syncs are outside the window
            now = time.perf_counter()
            self.threads = torch.get_num_threads()  # the Trainer must not have changed it
            if bare is None:
                self.stamps.append(now)
                return
            if self.stamps:
                self.ours.append(now - self.stamps[-1])
            bare.step(*batches[state.global_step - 1])
            after = time.perf_counter()
            self.bare.append(after - now)
            self.stamps.append(after)

    return StepClock()


def report_syncs(caught, steps):
    """Where ours synchronised with the GPU in the timed steps (each one stalls the queue)."""
    where = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            key = f"{w.filename}:{w.lineno}"
            where[key] = where.get(key, 0) + 1
    print(f"synchronising operations in {steps} timed steps of ours: {sum(where.values())}")
    for key, count in sorted(where.items(), key=lambda kv: -kv[1]):
        print(f"  {count:5d}  {key}")


def run_ours(recipe, datasets, args, bare=None, batches=None):
    """Ours (and, with `bare`, the bare loop interleaved); returns (ours, bare or None)."""
    from hf_finetune import build_trainer

    total = args.warmup + args.steps
    clock = make_step_clock(args, bare, batches)
    trainer = build_trainer(recipe, datasets=datasets, callbacks=[clock])
    if args.sync_debug:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        report_syncs(caught, args.steps)
    else:
        trainer.train()
    if trainer.state.global_step != total or len(clock.stamps) != total:
        raise SystemExit(f"error: ours ran {trainer.state.global_step} steps ({len(clock.stamps)} stamped), "
                         f"expected {total}")
    if clock.threads != args.threads:
        print(f"warning: torch threads changed to {clock.threads} inside the Trainer (asked {args.threads})")
    if bare is None:
        return summarise(durations_of(clock.stamps, args.warmup), args.batch), None
    # ours[k] is step k + 2 (step 1 has no preceding stamp); bare[k] is step k + 1.
    return (summarise(clock.ours[args.warmup - 1:], args.batch),
            summarise(clock.bare[args.warmup:], args.batch))


# --- main ----------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # as env_cfg.cudnn_benchmark does for ours
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger("hf_finetune").setLevel(logging.WARNING)

    from hf_finetune import build_datasets
    from hf_finetune.data import label_names

    with tempfile.TemporaryDirectory(prefix="train_throughput_") as work_dir:
        recipe = build_recipe(args, work_dir)
        frozen = recipe.model.backbone.frozen_stages
        print(f"ResNet-{args.depth} frozen_stages={frozen}, {args.size} px, batch {args.batch}, "
              f"device {args.device}{' bf16 channels_last' if args.device == 'cuda' else ''}, "
              f"workers {args.num_workers}, torch threads {torch.get_num_threads()}; "
              f"{args.warmup} warm-up + {args.steps} timed steps, {args.rounds} round(s)"
              f"{', interleaved' if args.interleave else ''}")

        datasets = build_datasets(recipe)
        id2label = dict(enumerate(label_names(datasets)))
        batches = prepare_batches(datasets["train"], args)

        rounds = []
        for i in range(args.rounds):
            if args.interleave:
                ours, bare = run_ours(recipe, datasets, args, BareLoop(recipe, args, id2label), batches)
            elif i % 2 == 0:
                bare = run_bare(recipe, batches, args, id2label)
                ours, _ = run_ours(recipe, datasets, args)
            else:
                ours, _ = run_ours(recipe, datasets, args)
                bare = run_bare(recipe, batches, args, id2label)
            rounds.append((ours, bare))

    print(f"{'':9}{'images/s':>10}{'s/iter':>9}{'median':>9}{'fastest':>9}{'ratio':>8}")
    for i, (ours, bare) in enumerate(rounds, start=1):
        for name, r in (("ours", ours), ("bare", bare)):
            ratio = f"{ours['ips'] / bare['ips']:8.3f}" if name == "ours" else ""
            print(f"{name} r{i:<3}{r['ips']:10.1f}{r['mean']:9.3f}{r['median']:9.3f}{r['min']:9.3f}{ratio}")
    if args.interleave:
        # Paired steps: pool every round.
        ours = summarise([d for o, _ in rounds for d in o["durations"]], args.batch)
        bare = summarise([d for _, b in rounds for d in b["durations"]], args.batch)
        label = "all rounds"
    else:
        ours = max((o for o, _ in rounds), key=lambda r: r["ips"])
        bare = max((b for _, b in rounds), key=lambda r: r["ips"])
        label = "best rounds"
    print(f"{label}: ours {ours['ips']:.1f} images/s, bare {bare['ips']:.1f} images/s, "
          f"ratio ours/bare {ours['ips'] / bare['ips']:.3f} (median steps {bare['median'] / ours['median']:.3f}, "
          f"fastest steps {bare['min'] / ours['min']:.3f}); target >= 0.95")
    if args.tutorial:
        ref = MMPRETRAIN_TUTORIAL_S_PER_ITER
        print(f"tutorial point: ours {ours['mean']:.2f} s/iter, bare {bare['mean']:.2f} s/iter; "
              f"mmpretrain 1.2 reference ~{ref:.1f} s/iter -> ours runs at {ref / ours['mean']:.2f}x its speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
