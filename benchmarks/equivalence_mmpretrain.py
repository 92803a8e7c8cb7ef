"""Step-for-step equivalence with mmpretrain 1.2: the same initial weights, data, order and batch,
the per-iteration loss and learning rate of both, side by side.

    ANCHOR_HOME=~/.cache/mmpretrain_anchor python benchmarks/equivalence_mmpretrain.py

Needs the reference install (`bash ../shared/anchor/setup_anchor.sh`, its own venv in
$ANCHOR_HOME); mmpretrain runs there as subprocesses, ours through its command line.

Two setups, each in both frameworks:
  tutorial  recipes/cifar10.json: ResNet-50 (stand-in pretrained backbone), frozen_stages=2,
            224 px, SGD lr 0.01 momentum 0.9 wd 1e-4, MultiStepLR by epoch (milestones [2])
  resnet18  ResNet-18 from scratch (mmcls init, zero_init_residual), 32 px, SGD lr 0.1,
            MultiStepLR by epoch (milestones [1, 3])
Per setup: mmpretrain builds the model from its config and calls init_weights(); that state dict
initialises both sides (load_from). 70 generated CIFAR images, batch 16, no shuffle, no
augmentation, fp32: 5 updates per epoch (the last batch holds 6 images), 4 epochs = 20 updates,
so the epoch-based LR drops and the partial batch both fall inside the compared steps.
Exits 1 if any loss or LR differs by more than --tolerance (relative).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_PER_FILE = 14  # x 5 files = 70 images: 4 full batches of 16 and one of 6
BATCH = 16
EPOCHS = 4
SEED = 0

# Both sides: a state dict from mmpretrain's own initialisation.
EXPORT_INIT = """
import sys, torch
from mmengine.config import Config
from mmpretrain.registry import MODELS
from mmpretrain.utils import register_all_modules
register_all_modules()
cfg = Config.fromfile(sys.argv[1])
torch.manual_seed(int(sys.argv[3]))
model = MODELS.build(cfg.model)
model.init_weights()
torch.save({"state_dict": model.state_dict()}, sys.argv[2])
"""

SETUPS = {
    "tutorial": {
        "mm_base": "{anchor}/resnet50_finetune_cifar.py",
        "mm_model": "dict(backbone=dict(init_cfg=dict(checkpoint='{anchor}/checkpoints/"
                    "resnet50_random_in1k_layout.pth')))",
        "mm_pipeline": "[dict(type='Resize', scale=224), dict(type='PackInputs')]",
        "mm_optimizer": "dict(lr=0.01)",
        "milestones": [2],
        "ours": [
            "model.backbone.init_cfg=null",
            # cv2's fixed-point resize, as mmcv's Resize (the default backend differs by 1 on some pixels)
            'train_dataloader.dataset.pipeline=[{"type": "Resize", "scale": 224, "backend": "cv2-exact"}, '
            '{"type": "PackClsInputs"}]',
        ],
    },
    "resnet18": {
        "mm_base": ["mmpretrain::_base_/models/resnet18.py",
                    "mmpretrain::_base_/datasets/cifar10_bs16.py",
                    "mmpretrain::_base_/schedules/cifar10_bs128.py",
                    "mmpretrain::_base_/default_runtime.py"],
        "mm_model": "dict(backbone=dict(zero_init_residual=True), head=dict(num_classes=10))",
        "mm_pipeline": "[dict(type='PackInputs')]",
        "mm_optimizer": "dict(lr=0.1)",
        "milestones": [1, 3],
        "ours": [
            "model.backbone.depth=18",
            "model.backbone.frozen_stages=-1",
            "model.backbone.zero_init_residual=true",
            "model.backbone.init_cfg=null",
            "model.head.in_channels=512",
            "optim_wrapper.optimizer.lr=0.1",
            'train_dataloader.dataset.pipeline=[{"type": "PackClsInputs"}]',
        ],
    },
}


def mm_config(setup, anchor, data_root, init_file, work):
    """An mmpretrain config: the setup's base with the equivalence settings on top."""
    spec = SETUPS[setup]
    base = spec["mm_base"]
    base = [base.format(anchor=anchor)] if isinstance(base, str) else base
    data = f"dict(data_root={str(data_root)!r}, pipeline={spec['mm_pipeline']})"
    text = textwrap.dedent(f"""\
        _base_ = {base!r}
        custom_imports = dict(imports=['cifar_skip_md5'], allow_failed_imports=False)
        model = {spec['mm_model'].format(anchor=anchor)}
        train_dataloader = dict(batch_size={BATCH}, num_workers=0, persistent_workers=False,
                                sampler=dict(type='DefaultSampler', shuffle=False), dataset={data})
        val_dataloader = dict(batch_size={BATCH}, num_workers=0, persistent_workers=False,
                              dataset=dict(data_root={str(data_root)!r}))
        test_dataloader = val_dataloader
        optim_wrapper = dict(optimizer={spec['mm_optimizer']})
        param_scheduler = dict(type='MultiStepLR', by_epoch=True, milestones={spec['milestones']}, gamma=0.1)
        train_cfg = dict(by_epoch=True, max_epochs={EPOCHS}, val_interval=100)
        default_hooks = dict(logger=dict(type='LoggerHook', interval=1),
                             checkpoint=dict(type='CheckpointHook', interval=100, save_last=False))
        log_processor = dict(window_size=1)
        randomness = dict(seed={SEED})
        load_from = {str(init_file)!r}
        """)
    path = work / f"mm_{setup}.py"
    path.write_text(text)
    return path


def anchor_env(anchor):
    env = dict(os.environ, PYTHONPATH=str(anchor), CUDA_VISIBLE_DEVICES="")
    env.pop("VIRTUAL_ENV", None)
    return env


def run(cmd, log, **kwargs):
    """Run a command, its output to `log`; on failure show the end of the log and stop."""
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, **kwargs)
    if code:
        tail = Path(log).read_text().splitlines()[-30:]
        sys.exit(f"command failed ({code}): {' '.join(map(str, cmd))}\n" + "\n".join(tail))
    return time.perf_counter() - start


def mm_history(work_dir):
    """[(loss, lr)] per training iteration from mmengine's vis_data/scalars.json."""
    scalars = sorted(Path(work_dir).glob("*/vis_data/scalars.json"))[-1]
    rows = [json.loads(line) for line in scalars.read_text().splitlines() if line.strip()]
    rows = sorted((r for r in rows if "loss" in r), key=lambda r: r["step"])
    return [(r["loss"], r["lr"]) for r in rows]


def our_history(work_dir):
    """[(loss, lr)] per update from the Trainer's log_history."""
    state = json.loads((Path(work_dir) / "trainer_state.json").read_text())
    rows = sorted((r for r in state["log_history"] if "loss" in r), key=lambda r: r["step"])
    return [(r["loss"], r["learning_rate"]) for r in rows]


def rel_diff(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def compare(setup, ours, mm, steps, tolerance):
    """Print the per-step table; return the largest relative loss and LR differences."""
    print(f"\n== {setup}: first {steps} updates ==")
    print(f"{'step':>4} {'loss ours':>12} {'loss mm':>12} {'rel diff':>9} {'lr ours':>11} {'lr mm':>11}")
    worst_loss = worst_lr = 0.0
    for step in range(steps):
        if step >= len(ours) or step >= len(mm):
            print(f"{step + 1:>4} missing (ours logged {len(ours)}, mmpretrain {len(mm)})")
            return float("inf"), float("inf")
        (loss_a, lr_a), (loss_b, lr_b) = ours[step], mm[step]
        d_loss, d_lr = rel_diff(loss_a, loss_b), rel_diff(lr_a, lr_b)
        worst_loss, worst_lr = max(worst_loss, d_loss), max(worst_lr, d_lr)
        flag = "" if d_loss <= tolerance and d_lr <= tolerance else "  <-- differs"
        print(f"{step + 1:>4} {loss_a:>12.6f} {loss_b:>12.6f} {d_loss:>9.1e} {lr_a:>11.4g} {lr_b:>11.4g}{flag}")
    print(f"max rel diff: loss {worst_loss:.2e}, lr {worst_lr:.2e} (tolerance {tolerance:g})")
    return worst_loss, worst_lr


def run_setup(setup, anchor, work, data_root, extra_options=()):
    python = anchor / "venv" / "bin" / "python"
    env = anchor_env(anchor)
    folder = work / setup
    folder.mkdir()
    init_file = folder / "init.pth"
    config = mm_config(setup, anchor, data_root, init_file, work)
    run([python, "-c", EXPORT_INIT, config, init_file, str(SEED)], folder / "export.log", env=env, cwd=anchor)
    mm_time = run([python, anchor / "train.py", config, "--work-dir", folder / "mm"], folder / "mm.log",
                  env=env, cwd=anchor)

    options = [
        f"load_from={init_file}",
        "default_hooks.logger.interval=1",
        "default_hooks.checkpoint.interval=100",
        "train_dataloader.sampler.shuffle=false",
        "train_dataloader.num_workers=0",
        "val_dataloader.num_workers=0",
        "test_dataloader.num_workers=0",
        f"train_cfg.total_batch_size={BATCH}",
        f"train_cfg.max_epochs={EPOCHS}",
        "train_cfg.val_interval=100",
        f"param_scheduler.milestones={json.dumps(SETUPS[setup]['milestones'])}",
        f"randomness.seed={SEED}",
        "env_cfg.channels_last=false",  # NCHW convolutions: mmpretrain's float summation order
        *SETUPS[setup]["ours"],
        *extra_options,
    ]
    ours_env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    ours_time = run([sys.executable, "-m", "hf_finetune.run", REPO / "recipes" / "cifar10.json",
                     "--work-dir", folder / "ours", "--data-root", data_root, "--cfg-options", *options],
                    folder / "ours.log", env=ours_env, cwd=REPO)
    print(f"{setup}: mmpretrain {mm_time:.1f} s, ours {ours_time:.1f} s (whole commands); logs in {folder}")
    return our_history(folder / "ours"), mm_history(folder / "mm")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--anchor-home", default=os.environ.get(
        "ANCHOR_HOME", os.path.expanduser("~/.cache/mmpretrain_anchor")),
        help="folder setup_anchor.sh filled (default $ANCHOR_HOME or ~/.cache/mmpretrain_anchor)")
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    parser.add_argument("--steps", type=int, default=EPOCHS * 5, help="updates to compare (at most 20)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest relative difference")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="more overrides for our side, after the setup's (e.g. env_cfg.channels_last=false)")
    parser.add_argument("--work", help="keep runs here (default: a temporary folder, removed)")
    args = parser.parse_args()

    anchor = Path(args.anchor_home).expanduser().resolve()
    if not (anchor / "venv" / "bin" / "python").exists() or not (anchor / "train.py").exists():
        sys.exit(f"no mmpretrain install in {anchor}: run `ANCHOR_HOME={anchor} bash setup_anchor.sh` "
                 "(../shared/anchor) or pass --anchor-home")
    with tempfile.TemporaryDirectory(prefix="equivalence_") as tmp:
        work = Path(args.work or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        python, env = anchor / "venv" / "bin" / "python", anchor_env(anchor)
        data_root = work / "data"
        run([python, anchor / "make_synthetic_cifar10.py", data_root, "--train-per-batch", str(TRAIN_PER_FILE),
             "--test", str(BATCH)], work / "data.log", env=env)
        if "tutorial" in args.setups and not (anchor / "checkpoints" / "resnet50_random_in1k_layout.pth").exists():
            run([python, anchor / "make_random_pretrained.py", "checkpoints/resnet50_random_in1k_layout.pth"],
                work / "pretrained.log", env=env, cwd=anchor)
        failed = False
        for setup in args.setups:
            ours, mm = run_setup(setup, anchor, work, data_root, args.cfg_options)
            worst_loss, worst_lr = compare(setup, ours, mm, args.steps, args.tolerance)
            failed |= max(worst_loss, worst_lr) > args.tolerance
    print("\nEQUAL" if not failed else "\nDIFFERENT: see the rows marked above")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
