"""The fault catalogue: hostile or broken inputs and interrupted writes, each ending in one clear
line or a clean run, with nothing lost."""

import errno
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainingArguments

from hf_finetune.data import cifar
from cifar_writers import write_cifar10_batches, write_cifar10_tarball
from hf_finetune.errors import CheckpointError, DataError, TrainingError, UserError
from hf_finetune.models import (
    FinetuneResNetConfig,
    FinetuneResNetForImageClassification,
    load_checkpoint_file,
    load_pretrained,
)
from hf_finetune.models.checkpoints import assert_finite, read_checkpoint, verify_weights
from hf_finetune.workdir import (
    TEMP_PREFIX,
    WorkDirLock,
    atomic_write,
    check_fresh_start,
    disk_full_guard,
    dump_json,
    eval_source,
    is_disk_full,
    remove_interrupted_saves,
    resume_checkpoint,
    save_atomically,
    save_model_atomically,
    usable_checkpoints,
    verify_checkpoint,
)


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and "weights_only" not in message, message
    return message


@pytest.fixture(scope="module")
def resnet18():
    """One model for the module: the loads tested here fail before changing it."""
    return FinetuneResNetForImageClassification(FinetuneResNetConfig(depth=18, num_labels=10))


class Evil:
    """A pickle that runs `command` when loaded (os.system is on torch's block list; Popen is merely unknown)."""

    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


# --------------------------------------------------------------------------- a real Trainer checkpoint
class TinyModel(PreTrainedModel):
    config_class = PretrainedConfig

    def __init__(self, config):
        super().__init__(config)
        self.linear = nn.Linear(4, 2)
        self.post_init()

    def forward(self, x, labels=None):
        logits = self.linear(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


@pytest.fixture(scope="module")
def trainer_checkpoints(tmp_path_factory):
    """A work dir holding checkpoint-1 and checkpoint-2, written by transformers' Trainer."""
    work_dir = tmp_path_factory.mktemp("run")
    data = [{"x": torch.randn(4), "labels": i % 2} for i in range(8)]
    args = TrainingArguments(str(work_dir), max_steps=2, save_steps=1, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True)
    Trainer(TinyModel(PretrainedConfig()), args, train_dataset=data).train()
    return work_dir


def copy_run(source, target):
    shutil.copytree(source, target)
    return target


# --------------------------------------------------------------------------- issue 10, class 2: one run per work dir
def hold_lock(work_dir, started, fork_worker):
    with WorkDirLock(work_dir):
        worker = None
        if fork_worker:  # as a DataLoader worker is: forked while the lock is held
            worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
            worker.start()
        started.put(worker and worker.pid)
        time.sleep(60)


def start_holder(work_dir, fork_worker=False):
    context = multiprocessing.get_context("fork")
    started = context.Queue()
    holder = context.Process(target=hold_lock, args=(work_dir, started, fork_worker))
    holder.start()
    return holder, started.get(timeout=30)


def test_second_run_on_a_work_dir_refuses_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    holder, _ = start_holder(tmp_path)
    try:
        start = time.monotonic()
        with pytest.raises(UserError) as error:
            WorkDirLock(tmp_path, wait_s=0.5).__enter__()
        assert time.monotonic() - start >= 0.5  # a holder being torn down gets that long
        assert f"in use by another run (pid {holder.pid} on host {socket.gethostname()})" in one_line(error)
        with WorkDirLock(tmp_path, is_main=False):  # the other processes of one run do not lock
            pass
    finally:
        holder.kill()  # SIGKILL: no cleanup, the lock file stays
        holder.join()
    assert (tmp_path / ".hf_finetune.lock").exists()
    with caplog.at_level(logging.WARNING, logger="hf_finetune"), WorkDirLock(tmp_path):
        assert f"pid {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert not (tmp_path / ".hf_finetune.lock").exists()


def test_a_killed_run_frees_its_work_dir_though_its_forked_workers_live_on(tmp_path):
    holder, worker_pid = start_holder(tmp_path, fork_worker=True)
    try:
        holder.kill()  # SIGKILL (the OOM killer): its DataLoader workers outlive it for seconds
        holder.join()
        os.kill(worker_pid, 0)  # the worker still runs
        with WorkDirLock(tmp_path, wait_s=0):  # taken at once
            pass
    finally:
        os.kill(worker_pid, signal.SIGKILL)


def test_fresh_run_on_a_used_work_dir_says_what_is_there(tmp_path, trainer_checkpoints):
    work_dir = copy_run(trainer_checkpoints, tmp_path / "run")
    (work_dir / "config.json").write_text("{}")
    with pytest.raises(UserError) as error:
        check_fresh_start(work_dir, resume=None)
    message = one_line(error)
    assert all(word in message for word in ("checkpoint-1", "checkpoint-2", "config.json", "--resume",
                                            "--work-dir", "--overwrite"))
    check_fresh_start(work_dir, resume=True)
    assert (work_dir / "checkpoint-2").is_dir()
    check_fresh_start(work_dir, resume=None, overwrite=True)
    assert not list(work_dir.glob("checkpoint-*")) and not (work_dir / "config.json").exists()
    check_fresh_start(work_dir, resume=None)  # nothing left to mix with


# --------------------------------------------------------------------------- class 3: disk full, half-written files
@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (needs root); else the test is skipped."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_disk_full_while_saving_is_one_line_and_leaves_no_partial_model(tiny_disk, resnet18):
    (tiny_disk / "earlier.json").write_text('{"kept": true}')
    with pytest.raises(TrainingError) as error:
        save_model_atomically(resnet18, tiny_disk / "run")  # 45 MB of weights on a 1 MiB disk
    message = one_line(error)
    assert str(tiny_disk / "run") in message and "disk is full" in message
    assert list((tiny_disk / "run").iterdir()) == []  # no config.json without weights, no temp files
    assert json.loads((tiny_disk / "earlier.json").read_text()) == {"kept": True}
    with pytest.raises(TrainingError, match="disk is full"), atomic_write(tiny_disk / "big.pt", "wb") as f:
        torch.save(torch.zeros(500_000), f)
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["earlier.json", "run"]


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
    Exception("Error while serializing: I/O error: No space left on device (os error 28)"),  # SafetensorError
])
@pytest.mark.floors
def test_disk_full_is_recognised_in_every_library_wrapping(tmp_path, error):
    assert is_disk_full(error)

    def write(folder):
        (tmp_path / "partial").mkdir(exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write("{}")
        raise error

    with pytest.raises(TrainingError, match=f"writing {tmp_path / 'out'} failed: the disk is full"):
        save_atomically(write, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_disk_full_names_the_file_being_written(tmp_path):
    with pytest.raises(TrainingError, match="writing /run/checkpoint-3/optimizer.pt failed: the disk is full"):
        with disk_full_guard(tmp_path):
            raise OSError(errno.ENOSPC, "No space left on device", "/run/checkpoint-3/optimizer.pt")
    with pytest.raises(OSError, match="Permission denied"), disk_full_guard(tmp_path):
        raise OSError(errno.EACCES, "Permission denied")


def test_interrupted_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "all_results.json"
    dump_json({"epoch": 1}, path)
    with pytest.raises(KeyboardInterrupt), atomic_write(path) as f:
        f.write('{"epoch": ')
        raise KeyboardInterrupt
    assert json.loads(path.read_text()) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["all_results.json"]


def test_saved_files_get_the_usual_mode(tmp_path, resnet18):
    previous = os.umask(0o027)
    try:
        written = save_model_atomically(resnet18, tmp_path)
        dump_json({}, tmp_path / "metrics.json")
    finally:
        os.umask(previous)
    assert {"config.json", "model.safetensors"} <= {p.name for p in written}
    for name in ("model.safetensors", "config.json", "metrics.json"):
        assert oct((tmp_path / name).stat().st_mode & 0o777) == oct(0o640), name


def test_what_a_killed_save_left_is_removed_at_start(tmp_path, trainer_checkpoints):
    work_dir = copy_run(trainer_checkpoints, tmp_path / "run")
    (work_dir / f"{TEMP_PREFIX}abc").mkdir()
    (work_dir / f"{TEMP_PREFIX}abc" / "model.safetensors").write_bytes(b"\0" * 1024)
    (work_dir / f"{TEMP_PREFIX}xyz").write_bytes(b"\0")
    (work_dir / "checkpoint-1" / ".tmpU4vWVU").write_bytes(b"\0" * 1024)  # a killed safetensors save_file
    (work_dir / "checkpoint-2" / "trainer_state.json").unlink()  # killed before the Trainer's last write
    before = {p.name for p in work_dir.iterdir()}
    removed = {str(p.relative_to(work_dir)) for p in remove_interrupted_saves(work_dir)}
    assert removed == {f"{TEMP_PREFIX}abc", f"{TEMP_PREFIX}xyz", "checkpoint-1/.tmpU4vWVU", "checkpoint-2"}
    assert {p.name for p in work_dir.iterdir()} == before - {f"{TEMP_PREFIX}abc", f"{TEMP_PREFIX}xyz", "checkpoint-2"}
    assert verify_checkpoint(work_dir / "checkpoint-1") == []
    assert ".tmpU4vWVU" not in {p.name for p in (work_dir / "checkpoint-1").iterdir()}


# --------------------------------------------------------------------------- classes 4 and 5: what resume / eval trust
@pytest.mark.floors
def test_corrupt_newest_checkpoint_falls_back_with_the_bad_file_named(tmp_path, trainer_checkpoints, caplog):
    work_dir = copy_run(trainer_checkpoints, tmp_path / "run")
    assert verify_checkpoint(work_dir / "checkpoint-2") == []
    optimizer = work_dir / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="hf_finetune"):
        assert list(usable_checkpoints(work_dir)) == [str(work_dir / "checkpoint-1")]
    assert str(optimizer) in caplog.text

    assert resume_checkpoint(work_dir, "auto") == str(work_dir / "checkpoint-1")
    with pytest.raises(CheckpointError) as error:
        resume_checkpoint(work_dir, str(work_dir / "checkpoint-2"))
    assert str(optimizer) in one_line(error)

    (work_dir / "checkpoint-1" / "trainer_state.json").unlink()
    assert "missing trainer_state.json" in verify_checkpoint(work_dir / "checkpoint-1")[0]
    assert list(usable_checkpoints(work_dir)) == []
    with pytest.raises(CheckpointError) as error:
        resume_checkpoint(work_dir, True)
    assert "no checkpoint in" in one_line(error) and "--overwrite" in str(error.value)
    assert resume_checkpoint(tmp_path / "new", True) is None and resume_checkpoint(work_dir, None) is None


def test_eval_only_after_an_interrupted_final_save(tmp_path, trainer_checkpoints, caplog):
    work_dir = copy_run(trainer_checkpoints, tmp_path / "run")
    (work_dir / "config.json").write_text("{}")  # the weights never made it
    with caplog.at_level(logging.WARNING, logger="hf_finetune"):
        assert eval_source(work_dir) == str(work_dir / "checkpoint-2")
    assert "newest usable checkpoint" in caplog.text
    (work_dir / "model.safetensors").write_bytes((work_dir / "checkpoint-2" / "model.safetensors").read_bytes())
    assert eval_source(work_dir) == str(work_dir)
    with pytest.raises(CheckpointError) as error:
        eval_source(tmp_path / "empty")
    assert "--eval-only PATH" in one_line(error)


# --------------------------------------------------------------------------- class 8: NaN / inf weights
@pytest.mark.floors
def test_non_finite_weights_are_refused_on_every_load_route(tmp_path, resnet18):
    state = {name: tensor.clone() for name, tensor in resnet18.state_dict().items()}
    state["head.fc.weight"][0, 0] = float("nan")
    state["backbone.embedder.embedder.convolution.weight"][0, 0, 0, 0] = float("inf")
    torch.save({"state_dict": state}, tmp_path / "run.pth")
    resnet18.save_pretrained(tmp_path / "run", state_dict=dict(state))
    names = "backbone.embedder.embedder.convolution.weight"

    for path, scope in [(tmp_path / "run.pth", "model"), (tmp_path / "run", "model"), (tmp_path / "run", "backbone")]:
        with pytest.raises(CheckpointError) as error:  # load_from, --eval-only FILE, init_cfg.checkpoint
            load_pretrained(resnet18, str(path), scope=scope, key="load_from")
        assert names in one_line(error) and "non-finite" in str(error.value)
    assert torch.isfinite(resnet18.head.fc.weight).all()
    with pytest.raises(CheckpointError) as error:  # --eval-only DIR, from_pretrained folders, --resume weights
        verify_weights(tmp_path / "run", key="--eval-only")
    assert "head.fc.weight" in one_line(error) and names in str(error.value)
    assert_finite({"huge but finite": torch.tensor([3e38, 3e38]), "steps": torch.tensor([2**62])}, "x")


def test_json_outputs_never_hold_nan(tmp_path):
    path = tmp_path / "test_results.json"
    dump_json({"test_loss": float("nan"), "lr": [float("inf"), 0.1], "n": 3}, path)

    def refuse(constant):
        raise ValueError(constant)

    assert json.loads(path.read_text(), parse_constant=refuse) == {"test_loss": None, "lr": [None, 0.1], "n": 3}


# --------------------------------------------------------------------------- class 11: incomplete CIFAR copies
def test_incomplete_cifar_copies_name_the_missing_batches(tmp_path):
    folder = write_cifar10_batches(tmp_path / "folder", n_train=10, n_test=2)
    for name in ("data_batch_4", "test_batch"):
        (folder / name).unlink()
    with pytest.raises(DataError) as error:
        cifar.read_batches_folder(folder)
    assert "data_batch_4, test_batch missing" in one_line(error) and str(folder) in str(error.value)

    # A plain .tar whose copy stopped after data_batch_2: it ends cleanly, nothing else says so.
    full = write_cifar10_tarball(tmp_path / "full", n_train=10, n_test=2)
    cut = tmp_path / "cifar-10-python.tar"
    with tarfile.open(full) as source, tarfile.open(cut, "w") as target:
        for member in source:
            if member.name.endswith(("data_batch_1", "data_batch_2", "batches.meta")):
                target.addfile(member, source.extractfile(member))
    with pytest.raises(DataError) as error:
        cifar.read_tarball(cut)
    assert "data_batch_3, data_batch_4, data_batch_5, test_batch missing" in one_line(error)
    complete = write_cifar10_batches(tmp_path / "complete", n_train=10, n_test=2)
    for splits, _ in (cifar.read_tarball(full), cifar.read_batches_folder(complete)):
        assert len(splits["train"][0]) == 10 and len(splits["test"][0]) == 2


# --------------------------------------------------------------------------- class 12: refused pickles, one line
@pytest.mark.parametrize("call,args", [(os.system, ("touch {marker}",)),
                                       (subprocess.call, (["touch", "{marker}"],))])
@pytest.mark.floors
def test_malicious_pickles_on_resume_and_eval_routes_are_one_line(tmp_path, trainer_checkpoints, call, args):
    marker = tmp_path / "PWNED"
    args = tuple(a.format(marker=marker) if isinstance(a, str) else [x.format(marker=marker) for x in a]
                 for a in args)
    work_dir = copy_run(trainer_checkpoints, tmp_path / "run")
    checkpoint = work_dir / "checkpoint-2"
    torch.save({"state": {}, "param_groups": [], "x": Evil(call, args)}, checkpoint / "optimizer.pt")
    with pytest.raises(CheckpointError) as error:  # --resume
        read_checkpoint(checkpoint / "optimizer.pt", key="--resume")
    assert "refuses to load" in one_line(error) and "optimizer.pt" in str(error.value)
    if call is os.system:  # blocked by torch: the load_from route refuses it too, in the same words
        with pytest.raises(CheckpointError) as load_from_error:
            load_checkpoint_file(str(checkpoint / "optimizer.pt"), key="--resume")
        assert str(error.value) == str(load_from_error.value)
    assert "refuses to load" in verify_checkpoint(checkpoint)[0]

    (checkpoint / "model.safetensors").unlink()
    torch.save({"linear.weight": torch.zeros(2, 4), "x": Evil(call, args)}, checkpoint / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as error:  # --eval-only DIR
        verify_weights(checkpoint, key="--eval-only")
    assert one_line(error).startswith("--eval-only: ") and "refuses to load" in str(error.value)
    time.sleep(0.1)
    assert not marker.exists()


# --------------------------------------------------------------------------- whole runs
def tiny_run_recipe(tmp_path, train_images, total_batch):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pack = [{"type": "PackClsInputs"}]
    recipe = {
        "_base_": [os.path.join(repo, "recipes", "cifar10.json")],
        "model": {"backbone": {"depth": 18, "init_cfg": None}, "head": {"in_channels": 512}},
        "train_dataloader": {"num_workers": 0, "dataset": {"type": "SyntheticCIFAR10", "num_samples": train_images,
                                                           "pipeline": pack}},
        "val_dataloader": None,
        "test_dataloader": {"num_workers": 0, "dataset": {"type": "SyntheticCIFAR10", "num_samples": 8, "seed": 1,
                                                          "pipeline": pack}},
        "train_cfg": {"max_epochs": 1, "total_batch_size": total_batch},
        "randomness": {"seed": 0},
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(recipe))
    return str(path)


def test_last_batch_of_one_image_then_a_second_run_on_the_same_work_dir(tmp_path, capsys, caplog):
    from hf_finetune.run import main

    recipe = tiny_run_recipe(tmp_path, train_images=17, total_batch=16)  # 16 + a batch of 1 at 32 px
    work_dir = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="hf_finetune"):
        assert main([recipe, "--work-dir", work_dir]) == 0
    assert "single image" in caplog.text
    assert json.load(open(os.path.join(work_dir, "trainer_state.json")))["global_step"] == 1
    weights_before = os.path.getmtime(os.path.join(work_dir, "model.safetensors"))

    capsys.readouterr()
    assert main([recipe, "--work-dir", work_dir]) == 2  # a fresh run would mix with the first
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a run" in err and "--overwrite" in err
    assert os.path.getmtime(os.path.join(work_dir, "model.safetensors")) == weights_before
    assert main([recipe, "--work-dir", work_dir, "--overwrite"]) == 0


def test_sigterm_stops_like_ctrl_c_and_resume_finishes(tmp_path):
    import signal
    import sys

    recipe = tiny_run_recipe(tmp_path, train_images=32, total_batch=4)
    work_dir = str(tmp_path / "term")
    proc = subprocess.Popen([sys.executable, "-m", "hf_finetune.run", recipe, "--work-dir", work_dir,
                             "--cfg-options", "train_cfg.max_epochs=20"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = os.path.join(work_dir, "checkpoint-8", "trainer_state.json")
    deadline = time.time() + 240
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert "checkpoints already written are intact" in err and "--resume" in err
    assert "Traceback" not in err
    from hf_finetune.run import main

    assert main([recipe, "--work-dir", work_dir, "--resume", "--cfg-options", "train_cfg.max_epochs=2"]) == 0
    assert json.load(open(os.path.join(work_dir, "trainer_state.json")))["global_step"] == 16


def test_an_empty_split_is_named_not_an_index_error(tmp_path, capsys):
    import datasets

    from hf_finetune.run import main

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    empty = datasets.Dataset.from_dict({"img": [], "label": []}, features=features)
    datasets.DatasetDict({"train": empty, "test": empty}).save_to_disk(str(tmp_path / "data"))
    recipe = tiny_run_recipe(tmp_path, train_images=8, total_batch=4)
    assert main([recipe, "--work-dir", str(tmp_path / "w"), "--cfg-options",
                 f'train_dataloader.dataset={{"type": "HFImageDataset", "data_root": "{tmp_path / "data"}", '
                 '"pipeline": [{"type": "PackClsInputs"}]}', "model.head.num_classes=2",
                 "data_preprocessor.num_classes=2", "model.head.topk=[1]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "empty (0 rows)" in err and "split '" in err and "index out of range" not in err


def test_a_corrupt_file_in_an_image_folder_names_its_class_folder(tmp_path):
    from PIL import Image

    from hf_finetune.config import config_from_dict
    from hf_finetune.data import build_datasets
    from hf_finetune.data.runtime import BatchDataError

    for name in ("cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / "train" / name / f"{i}.png")
    (tmp_path / "train" / "dog" / "1.png").write_bytes(b"not a png")
    cfg = config_from_dict({"model": {"head": {}}, "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.1}},
                            "train_dataloader": {"batch_size": 4, "dataset": {
                                "type": "HFImageDataset", "data_root": str(tmp_path), "val_split": 0,
                                "pipeline": [{"type": "PackClsInputs"}]}}})  # val_split 0: train/ is not split
    with pytest.raises(BatchDataError, match=r"1\.png in class folder 'dog'"):
        build_datasets(cfg)["train"][[0, 1, 2, 3]]


def test_resume_reuses_the_seed_the_interrupted_run_drew(tmp_path, monkeypatch, caplog):
    """randomness.seed null: the seed is drawn once and recorded when training starts; --resume
    continues with it (as mmengine restores it from the checkpoint), so data order and
    augmentation go on as the interrupted run's would have. A recipe's own seed stays."""
    import re

    from hf_finetune import outputs
    from hf_finetune.config import config_from_dict
    from hf_finetune.run import main
    from hf_finetune.training import process_state, resolve_seed

    recipe = tiny_run_recipe(tmp_path, train_images=8, total_batch=4)
    work_dir = tmp_path / "run"
    null_seed = ["--cfg-options", "randomness.seed=null"]

    def interrupted(*args, **kwargs):  # killed after training, before the final outputs are written
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "save_outputs", interrupted)
    with caplog.at_level(logging.INFO, logger="hf_finetune"):
        assert main([recipe, "--work-dir", str(work_dir), *null_seed]) == 130
    assert (work_dir / "checkpoint-2").is_dir() and not (work_dir / "model.safetensors").exists()
    first = json.loads((work_dir / "recipe.json").read_text())["randomness"]["seed"]
    assert re.findall(r"seed (\d+)", caplog.text) == [str(first)]

    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_finetune"):
        assert main([recipe, "--work-dir", str(work_dir), "--resume", *null_seed, "train_cfg.max_epochs=2"]) == 0
    assert "resuming from" in caplog.text and re.findall(r"seed (\d+)", caplog.text) == [str(first)]
    assert json.loads((work_dir / "recipe.json").read_text())["randomness"]["seed"] == first
    assert json.loads((work_dir / "trainer_state.json").read_text())["global_step"] == 4

    seeded = config_from_dict({"model": {"head": {"num_classes": 10}}, "randomness": {"seed": 3}})
    assert resolve_seed(seeded, process_state(), recorded=first + 1).randomness.seed == 3
