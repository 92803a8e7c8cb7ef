"""Streamed splits: WebDataset tar shards (folder, glob, http URLs) and datasets' streaming=True,
per-rank shards, loader workers, the by-epoch schedule, resume, and bad input."""

import functools
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from conftest import free_port

from hf_finetune.config import load_config
from hf_finetune.data import StreamingSplit, build_datasets, build_stream_loader, label_names
from hf_finetune.data.streaming import RESUME_NOTE, StreamBatches
from hf_finetune.errors import DataError, RecipeError
from hf_finetune.run import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["cat", "dog", "eel"]
PIPE = [{"type": "Resize", "scale": 32}, {"type": "PackClsInputs"}]
PIPE_TRAIN = [{"type": "Resize", "scale": 32}, {"type": "RandomFlip", "prob": 0.5}, {"type": "PackClsInputs"}]


def encoded(i, fmt):
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 48, 3), 6 * i, np.uint8)).save(buf, format=fmt)  # the pixels say which sample
    return buf.getvalue()


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, shards=4, per_shard=10, corrupt=None):
    """shards x per_shard samples s00000.jpg/.png + .cls (label i % 3); corrupt: a sample index whose
    image bytes are not an image."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        with tarfile.open(folder / f"part-{k:03d}.tar", "w") as tar:
            for i in range(k * per_shard, (k + 1) * per_shard):
                fmt = "JPEG" if k % 2 == 0 else "PNG"
                data = b"not an image at all" if i == corrupt else encoded(i, fmt)
                add(tar, f"s{i:05d}.{'jpg' if fmt == 'JPEG' else 'png'}", data)
                add(tar, f"s{i:05d}.cls", str(i % 3).encode())
    return folder


def samples_of(batch):
    """The sample indices of a batch's images (written into their pixels)."""
    return [round(v / 6) for v in batch["pixel_values"][:, 0, 16, 16].tolist()]


def recipe(tmp_path, train=None, val=None, name="stream.json", **top):
    data = {
        "_base_": [os.path.join(REPO, "recipes", "cifar10.json")],
        "model": {"backbone": {"depth": 18, "init_cfg": None},
                  "head": {"in_channels": 512, "num_classes": 3, "topk": [1]}},
        "data_preprocessor": {"num_classes": 3},
        "train_dataloader": None if train is None else {"num_workers": 0, "dataset": {"_delete_": True, **train}},
        "val_dataloader": None if val is None else {"num_workers": 0, "dataset": {"_delete_": True, **val}},
        "test_dataloader": None,
        "val_evaluator": {"type": "Accuracy", "topk": [1]},
        "test_evaluator": {"type": "Accuracy", "topk": [1]},
        "train_cfg": {"max_epochs": 2, "total_batch_size": 8},
        "param_scheduler": {"type": "MultiStepLR", "by_epoch": True, "milestones": [1], "gamma": 0.5},
        "default_hooks": {"logger": {"interval": 1}},
        "randomness": {"seed": 0},
        **top,
    }
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def webdataset(shards, **keys):
    return {"type": "WebDataset", "shards": shards, "classes": CLASSES, "pipeline": PIPE, **keys}


def build_val(tmp_path, dataset):
    return build_datasets(load_config(recipe(tmp_path, val=dataset)))["val"]


def read_all(split, batch_size=8, **kwargs):
    """Every batch of one pass: (sample indices, labels) in order."""
    samples, labels = [], []
    for batch in build_stream_loader(split, batch_size, **kwargs):
        assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape[1:] == (3, 32, 32)
        assert batch["labels"].dtype == torch.int64
        labels += batch["labels"].tolist()
        samples += samples_of(batch)
    return samples, labels


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards") / "shards")


@pytest.fixture(scope="module")
def served(shards):
    """The shards over HTTP on 127.0.0.1."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(shards)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


# ---------------------------------------------------------------- reading shards

def test_a_folder_of_shards_reads_every_sample_once_in_uint8_batches(tmp_path, shards):
    split = build_val(tmp_path, webdataset(str(shards)))
    assert isinstance(split, StreamingSplit)
    assert label_names({"val": split}) == CLASSES
    samples, labels = read_all(split)
    assert samples == list(range(40))  # jpg and png shards alike, in order
    assert labels == [i % 3 for i in range(40)]


def test_http_urls_and_a_glob_read_the_same_samples(tmp_path, shards, served):
    urls = [f"{served}/part-{k:03d}.tar" for k in range(4)]
    assert read_all(build_val(tmp_path, webdataset(urls)))[0] == list(range(40))
    assert read_all(build_val(tmp_path, webdataset(str(shards / "part-00[13].tar"))))[0] == \
        list(range(10, 20)) + list(range(30, 40))


def test_workers_split_the_shards_and_read_each_sample_once(tmp_path, shards):
    split = build_val(tmp_path, webdataset(str(shards)))
    samples, _ = read_all(split, num_workers=2)
    assert sorted(samples) == list(range(40))


def test_each_rank_reads_its_own_shards(tmp_path, shards):
    split = build_val(tmp_path, webdataset(str(shards)))
    seen = []
    for rank in (0, 1):
        loader = build_stream_loader(split, 5, epoch_batches=4, shuffle=True, seed=0, rank=rank, world_size=2)
        seen.append({i // 10 for batch in loader for i in samples_of(batch)})  # the shards it read
    assert len(seen[0]) == len(seen[1]) == 2 and not seen[0] & seen[1]


def test_the_shuffle_buffer_is_reseeded_every_epoch_and_replays_with_its_seed(tmp_path, shards):
    dataset = {**webdataset(str(shards)), "shuffle_buffer": 16}  # a training split's (evaluation is not shuffled)
    split = build_datasets(load_config(recipe(tmp_path, train=dataset)))["train"]

    def epoch(number, seed=0, workers=0):
        loader = build_stream_loader(split, 8, epoch_batches=5, shuffle=True, seed=seed, num_workers=workers)
        loader.set_epoch(number)
        return [i for batch in loader for i in samples_of(batch)]

    first = epoch(0)
    assert len(first) == 40 and sorted(first) != first  # shuffled
    assert epoch(0) == first and epoch(1) != first and epoch(0, seed=1) != first
    assert epoch(1, workers=2) == epoch(1, workers=2)  # with workers too


def test_a_local_hub_format_folder_streams_with_its_info_length(tmp_path):
    import datasets

    repo = tmp_path / "repo"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    for split, n in (("train", 12), ("test", 6)):
        ds = datasets.Dataset.from_dict({"image": [{"bytes": encoded(i, "PNG"), "path": None} for i in range(n)],
                                         "label": [i % 3 for i in range(n)]}, features=features)
        (repo / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(repo / "data" / f"{split}-00000-of-00001.parquet"))
    dataset = {"type": "HFImageDataset", "data_root": str(repo), "streaming": True, "image_column": "image",
               "pipeline": PIPE}
    split = build_datasets(load_config(recipe(tmp_path, train={**dataset, "split": "train"})))["train"]
    with pytest.raises(DataError, match=r"images per epoch is not known .* set train_dataloader.dataset.num_samples"):
        len(split)
    (repo / "README.md").write_text(
        "---\ndataset_info:\n  splits:\n  - name: train\n    num_bytes: 0\n    num_examples: 12\n"
        "  - name: test\n    num_bytes: 0\n    num_examples: 6\n---\n")
    dd = build_datasets(load_config(recipe(tmp_path, train={**dataset, "split": "train"}, val=dataset)))
    assert len(dd["train"]) == 12 and label_names(dd) == CLASSES
    labels = []
    for batch in build_stream_loader(dd["val"], 4):
        labels += batch["labels"].tolist()
    assert labels == [i % 3 for i in range(6)]
    # The columns are checked as a folder's are, and a stream takes one class per image.
    with pytest.raises(DataError, match=r"has no image column 'img' \(did you mean 'image'\?\); columns "
                                        r"found: image \(Image\), label \(ClassLabel\)\. Set "
                                        r"val_dataloader.dataset.image_column"):
        build_val(tmp_path, {**dataset, "image_column": "img"})
    tagged = datasets.Dataset.from_dict({"image": [{"bytes": encoded(0, "PNG"), "path": None}], "tags": [[0, 2]]},
                                        features=datasets.Features({"image": datasets.Image(),
                                                                    "tags": datasets.Sequence(datasets.ClassLabel(
                                                                        names=CLASSES))}))
    tagged.to_parquet(str(tmp_path / "tagged" / "data" / "test-00000-of-00001.parquet"))
    with pytest.raises(DataError, match=r"column 'tags' of .* holds several classes per image; a streamed split "
                                        r"needs one class per image"):
        build_val(tmp_path, {**dataset, "data_root": str(tmp_path / "tagged"), "label_column": "tags"})


# ---------------------------------------------------------------- training

def train_recipe(tmp_path, shards, **keys):
    train = {**webdataset(str(shards)), "num_samples": 40, "shuffle_buffer": 8, "pipeline": PIPE_TRAIN,
             "classes": None, **keys}
    return recipe(tmp_path, train=train, val=webdataset(str(shards)),
                  default_hooks={"logger": {"interval": 1}, "checkpoint": {"interval": 3, "by_epoch": False, "max_keep_ckpts": -1}})


def lr_by_step(work_dir):
    with open(os.path.join(work_dir, "trainer_state.json")) as f:
        state = json.load(f)
    return {e["step"]: e["learning_rate"] for e in state["log_history"] if "learning_rate" in e}, state


@pytest.fixture(scope="module")
def streamed_run(tmp_path_factory, shards):
    tmp = tmp_path_factory.mktemp("streamed")
    work_dir = str(tmp / "work")
    assert main([train_recipe(tmp, shards), "--work-dir", work_dir]) == 0
    return tmp, work_dir


def test_the_by_epoch_schedule_follows_the_declared_epoch(streamed_run):
    _, work_dir = streamed_run
    lrs, state = lr_by_step(work_dir)
    assert state["global_step"] == 10  # 40 images / 8 per update, 2 epochs
    assert lrs[5] == pytest.approx(0.01) and lrs[6] == pytest.approx(0.005)  # milestone 1 = after update 5
    evaluations = [e for e in state["log_history"] if "eval_accuracy_top1" in e]
    assert [e["step"] for e in evaluations] == [5, 10]  # val_interval 1 epoch
    with open(os.path.join(work_dir, "all_results.json")) as f:
        assert json.load(f)["eval_num_samples"] == 40  # the whole val stream, each image once


def test_resume_continues_with_the_batches_of_an_uninterrupted_run(streamed_run, shards, tmp_path, caplog,
                                                                    monkeypatch):
    tmp, work_dir = streamed_run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(work_dir, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    built, build = [], StreamBatches._build

    def counted(self, rows, generator, lend=None):
        built.append(self.epoch_batches is not None)
        return build(self, rows, generator, lend)

    monkeypatch.setattr(StreamBatches, "_build", counted)
    with caplog.at_level("INFO", logger="hf_finetune"):
        assert main([train_recipe(tmp, shards), "--work-dir", resumed, "--resume"]) == 0
    assert RESUME_NOTE in caplog.text
    assert sum(built) == 7  # 10 updates - 3 done: the 3 batches skipped were read, not decoded
    full = load_file(os.path.join(work_dir, "model.safetensors"))
    again = load_file(os.path.join(resumed, "model.safetensors"))
    for key in full:  # the same batches, in the same order, with the same flips
        assert torch.equal(full[key], again[key]), key


def test_resume_with_loader_workers_is_exact_too(shards, tmp_path):
    path = train_recipe(tmp_path, shards)
    workers = ["--cfg-options", "train_dataloader.num_workers=2", "train_dataloader.persistent_workers=true"]
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    assert main([path, "--work-dir", full, *workers]) == 0
    shutil.copytree(os.path.join(full, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    assert main([path, "--work-dir", resumed, "--resume", *workers]) == 0
    again = load_file(os.path.join(resumed, "model.safetensors"))
    for key, value in load_file(os.path.join(full, "model.safetensors")).items():
        assert torch.equal(value, again[key]), key


def test_a_stream_without_a_length_needs_num_samples(tmp_path, shards, capsys):
    path = train_recipe(tmp_path, shards, num_samples=None)
    assert main([path, "--work-dir", str(tmp_path / "w")]) != 0
    assert "set train_dataloader.dataset.num_samples" in capsys.readouterr().err


def run_launch(args, cwd, processes):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), os.path.join(REPO, "hf_finetune", "run.py")] + args
    return subprocess.run(command, capture_output=True, text=True, timeout=400, env=env, cwd=cwd)


def test_two_process_ddp_on_cpu_reads_separate_shards(tmp_path, shards):
    work_dir = str(tmp_path / "ddp")
    path = train_recipe(tmp_path, shards)
    proc = run_launch([path, "--work-dir", work_dir, "--cfg-options", "train_dataloader.num_workers=1"],
                      tmp_path, processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "each of the 2 ranks reads its own 2 of the 4 shards" in proc.stderr
    assert "batch: 8 total = 4 per device x 2 process(es)" in proc.stderr
    _, state = lr_by_step(work_dir)
    assert state["global_step"] == 10  # the same schedule as one process
    with open(os.path.join(work_dir, "all_results.json")) as f:
        assert json.load(f)["eval_num_samples"] == 40  # dispatched: no image counted twice


# ---------------------------------------------------------------- bad input

def test_no_shards_found_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"val_dataloader.dataset.shards: no .tar shards found at .*empty"):
        build_val(tmp_path, webdataset(str(tmp_path / "empty")))
    with pytest.raises(RecipeError, match="WebDataset needs shards"):
        load_config(recipe(tmp_path, val={"type": "WebDataset", "pipeline": PIPE}))


def test_an_unreachable_or_missing_url_fails_fast(tmp_path, served):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    start = time.perf_counter()
    with pytest.raises(DataError, match=f"cannot reach http://127.0.0.1:{port}/part-000.tar"):
        build_val(tmp_path, webdataset([f"http://127.0.0.1:{port}/part-000.tar"]))
    assert time.perf_counter() - start < 10
    with pytest.raises(DataError, match="nope.tar answers HTTP 404"):
        build_val(tmp_path, webdataset([f"{served}/nope.tar"]))


def test_a_corrupt_member_follows_on_corrupt(tmp_path):
    bad = write_shards(tmp_path / "bad", shards=2, per_shard=6, corrupt=3)
    with pytest.raises(DataError, match=r"cannot decode image at .*part-000.tar/s00003.jpg"):
        read_all(build_val(tmp_path, webdataset(str(bad))), batch_size=4)
    with pytest.warns(UserWarning, match="skipping undecodable image"):
        samples, _ = read_all(build_val(tmp_path, webdataset(str(bad), on_corrupt="skip")), batch_size=4)
    assert samples == [i for i in range(12) if i != 3]


def test_labels_need_known_classes_and_must_fit_them(tmp_path, shards):
    dataset = {**webdataset(str(shards)), "classes": None}
    config = load_config(recipe(tmp_path, val=dataset))
    config.model.head.num_classes = config.data_preprocessor.num_classes = None
    with pytest.raises(DataError, match=r"class names must be known up front .* set val_dataloader.dataset.classes"):
        build_datasets(config)
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    split = build_datasets(load_config(recipe(tmp_path, val={**dataset, "classes": str(tmp_path / "classes.txt")},
                                              model={"backbone": {"depth": 18, "init_cfg": None},
                                                     "head": {"in_channels": 512, "num_classes": 2, "topk": [1]}},
                                              data_preprocessor={"num_classes": 2})))["val"]
    with pytest.raises(DataError, match=r"label 2 of .*s00002.jpg .* is outside 0..1"):
        read_all(split)


def test_streaming_a_hub_dataset_offline_is_one_line(tmp_path):
    dataset = {"type": "HFImageDataset", "hub_id": "someone/photos", "streaming": True, "pipeline": PIPE}
    with pytest.raises(DataError, match=r"cannot stream 'someone/photos': .* offline mode is on; streaming reads "
                                        r"the Hub while training"):
        build_val(tmp_path, dataset)


def test_a_multi_label_head_is_refused_for_a_stream(tmp_path, shards):
    config = load_config(recipe(tmp_path, val=webdataset(str(shards)), model={
        "backbone": {"depth": 18, "init_cfg": None},
        "head": {"type": "MultiLabelLinearClsHead", "in_channels": 512, "num_classes": 3}},
        val_evaluator={"type": "MultiLabelMetric"}, test_evaluator={"type": "MultiLabelMetric"}))
    with pytest.raises(DataError, match="a streamed split needs a single-label model; "
                                        "set model.head.type to LinearClsHead"):
        build_datasets(config)


def test_a_label_member_that_is_not_an_integer_is_one_line(tmp_path):
    folder = tmp_path / "named"
    folder.mkdir()
    with tarfile.open(folder / "part-000.tar", "w") as tar:
        add(tar, "s00000.jpg", encoded(0, "JPEG"))
        add(tar, "s00000.cls", b"cat")
    with pytest.raises(DataError, match=r"cannot read WebDataset shards .*part-000.tar: invalid literal for int"):
        read_all(build_val(tmp_path, webdataset(str(folder))))


def test_a_hub_model_trains_on_a_stream_and_its_size_is_checked_first(tmp_path, shards, capsys):
    """A Hub model reads a stream as the ResNet does; a pipeline whose fixed size the model cannot
    take is refused before training, though no image is read before it."""
    from transformers import ConvNextConfig, ConvNextForImageClassification, ConvNextImageProcessorPil

    folder = tmp_path / "convnext"
    ConvNextForImageClassification(ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64],
                                                  num_labels=3)).save_pretrained(folder)
    ConvNextImageProcessorPil().save_pretrained(folder)
    model = {"_delete_": True, "type": "HuggingFaceClassifier", "model_name": str(folder), "pretrained": True}
    train = webdataset(str(shards), num_samples=16, pipeline=PIPE_TRAIN)
    path = recipe(tmp_path, train=train, val=webdataset(str(shards)), model=model,
                  data_preprocessor={"_delete_": True})
    assert main([path, "--work-dir", str(tmp_path / "ok")]) == 0
    assert "eval_accuracy_top1" in (tmp_path / "ok" / "all_results.json").read_text()
    small = [{"type": "Resize", "scale": 4}, {"type": "PackClsInputs"}]
    path = recipe(tmp_path, train={**train, "pipeline": small}, model=model, data_preprocessor={"_delete_": True},
                  name="small.json")
    assert main([path, "--work-dir", str(tmp_path / "small")]) == 2
    assert "train_dataloader.dataset.pipeline: the pipeline makes 4x4 images" in capsys.readouterr().err
    assert not (tmp_path / "small" / "checkpoint-1").exists()


def test_stream_keys_elsewhere_and_a_streamed_training_folder_read_whole_are_refused(tmp_path, shards):
    """No key is read and ignored: num_samples / shuffle_buffer outside a stream, a shuffle buffer on
    an evaluation stream. A class folder streamed whole for training is not evaluated on as well."""
    folder = tmp_path / "photos"
    for name in CLASSES:
        (folder / name).mkdir(parents=True)
        for i in range(2):
            (folder / name / f"{i}.png").write_bytes(encoded(i, "PNG"))
    indexed = {"type": "HFImageDataset", "data_root": str(folder), "pipeline": PIPE}
    with pytest.raises(RecipeError, match=r"val_dataloader.dataset.num_samples: only a streamed split reads it"):
        load_config(recipe(tmp_path, val={**indexed, "num_samples": 5}))
    with pytest.raises(RecipeError, match=r"val_dataloader.dataset.shuffle_buffer: only a streamed split reads it"):
        load_config(recipe(tmp_path, val={**indexed, "shuffle_buffer": 5}))
    with pytest.raises(RecipeError, match=r"val_dataloader.dataset.shuffle_buffer: an evaluation split is read in "
                                          r"order, never shuffled"):
        load_config(recipe(tmp_path, val=webdataset(str(shards), shuffle_buffer=5)))
    config = load_config(recipe(tmp_path, train={**indexed, "streaming": True, "num_samples": 6}, val=indexed))
    with pytest.raises(DataError, match=r"image folder .*photos has no 'test' split folder, and the training split "
                                        r"streams all of its images"):
        build_datasets(config, splits=("val",))
