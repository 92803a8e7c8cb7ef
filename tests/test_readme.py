"""The README's examples run as printed."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from hf_finetune.config import compat_keys
from hf_finetune.run import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def python_block(marker):
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if marker in b]
    return block


def run_python(code, cwd):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_python_api_snippet_runs_as_printed(tmp_path):
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    result = run_python(python_block("hf_finetune.load_config"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test_accuracy_top1" in result.stdout
    # build_trainer's default work dir: work_dirs/<recipe name>
    assert (tmp_path / "work_dirs" / "cifar10_smoke").is_dir()


def test_predict_export_and_pipeline_as_printed(tmp_path, monkeypatch):
    """The README's `hf-finetune predict` and `hf-finetune export` commands, then its pipeline
    snippet on one of your images, with a small trained work dir standing in."""
    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps({
        "_base_": [str(ROOT / "recipes" / "cifar10_smoke.json")],
        "model": {"backbone": {"depth": 18}, "head": {"in_channels": 512}},
        "train_dataloader": {"dataset": {"num_samples": 16}}, "val_dataloader": None,
        "test_dataloader": {"dataset": {"num_samples": 8}}, "train_cfg": {"max_epochs": 1, "total_batch_size": 8},
    }))
    work_dir = tmp_path / "work_dirs" / "cifar10_smoke"
    assert main([str(recipe), "--work-dir", str(work_dir)]) == 0
    (tmp_path / "my_images" / "val" / "cat").mkdir(parents=True)
    Image.fromarray(np.full((40, 50, 3), 120, np.uint8)).save(tmp_path / "my_images" / "val" / "cat" / "0.jpg")
    monkeypatch.chdir(tmp_path)
    for command in ("predict work_dirs/cifar10_smoke my_images/ --topk 3 --out predictions.csv",
                    "export work_dirs/cifar10_smoke exported --format transformers"):
        assert f"hf-finetune {command}" in README
        assert main(command.split()) == 0, command
    assert "my_images/val/cat/0.jpg" in (tmp_path / "predictions.csv").read_text()
    result = run_python(python_block("pipeline("), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'label'" in result.stdout and "'score'" in result.stdout


def test_compatibility_keys_are_each_named_in_the_readme():
    for key in compat_keys():
        assert f"`{key}`" in README, key


HUB_COMMANDS = re.findall(r"^    hf-finetune (recipes/hub_model_finetune\.json .*)$", README, flags=re.M)


def seed_hub_cache(cache, repo_id, model_config, processor):
    """A tiny random stand-in for REPO_ID in a Hub cache laid out as huggingface_hub lays it out,
    so the README's Hub ids resolve offline."""
    from transformers import AutoModelForImageClassification

    folder = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    AutoModelForImageClassification.from_config(model_config).save_pretrained(folder / "snapshots" / commit)
    processor.save_pretrained(folder / "snapshots" / commit)


def test_hub_model_commands_run_as_printed(tmp_path):
    """Each `hf-finetune recipes/hub_model_finetune.json ...` line, as printed (plus one epoch on
    a few images), against tiny stand-ins of its Hub models in an offline cache; the timm line,
    without timm, ends in one line saying to install the extra."""
    from transformers import ConvNextConfig, ConvNextImageProcessorPil, ViTConfig, ViTImageProcessorPil
    from transformers.utils import is_timm_available

    assert len(HUB_COMMANDS) == 3
    cache = tmp_path / "hub_cache"
    seed_hub_cache(cache, "google/vit-base-patch16-224-in21k",
                   ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
                   ViTImageProcessorPil())
    seed_hub_cache(cache, "facebook/convnext-tiny-224",
                   ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64]), ConvNextImageProcessorPil())
    for split, count in (("train", 4), ("val", 2)):
        for index, name in enumerate(("cat", "dog")):
            (tmp_path / "my_images" / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((40, 50, 3), 60 + 100 * index + i, np.uint8)).save(
                    tmp_path / "my_images" / split / name / f"{i}.jpg")
    shrink = ["train_cfg.max_epochs=1", "train_cfg.total_batch_size=4", "train_dataloader.num_workers=0",
              "val_dataloader.num_workers=0", "test_dataloader.num_workers=0"]
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    for command in HUB_COMMANDS:
        words = command.split()
        timm = "model.type=TimmClassifier" in words
        if timm and is_timm_available():
            continue  # its stand-in would be a timm model: tests/test_timm.py covers those
        words += shrink if "--cfg-options" in words else ["--cfg-options", *shrink]
        result = subprocess.run([sys.executable, "-m", "hf_finetune.run", *words,
                                 "--work-dir", str(tmp_path / "work_dirs" / str(len(command)))],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        if timm:
            assert result.returncode == 2, result.stderr[-3000:]
            assert result.stderr.strip().splitlines()[-1].endswith('pip install "hf_finetune[timm]"')
        else:
            assert result.returncode == 0, (command, result.stderr[-3000:])
            assert "test_accuracy_top1" in (tmp_path / "work_dirs" / str(len(command)) / "all_results.json").read_text()


def test_streaming_shards_recipe_as_printed(tmp_path, monkeypatch):
    """The README's my_shards.json with --data-root on a folder of train/ and val/ shards."""
    import io
    import tarfile

    from hf_finetune.config import apply_overrides, load_config
    from hf_finetune.data import StreamingSplit, build_datasets, build_stream_loader, label_names

    (block,) = [b for b in re.findall(r"```json\n(.*?)```", README, flags=re.S) if '"WebDataset"' in b]
    assert "hf-finetune my_shards.json --data-root /data/wds/" in README
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    (tmp_path / "my_shards.json").write_text(block)
    (tmp_path / "classes.txt").write_text("goldfish\ntench\n")
    for split in ("train", "val"):
        (tmp_path / "wds" / split).mkdir(parents=True)
        with tarfile.open(tmp_path / "wds" / split / "shard-0000.tar", "w") as tar:
            for i in range(4):
                buf = io.BytesIO()
                Image.fromarray(np.full((300, 400, 3), 40 * i, np.uint8)).save(buf, format="JPEG")
                for name, data in ((f"n{i:04d}.jpg", buf.getvalue()), (f"n{i:04d}.cls", str(i % 2).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    monkeypatch.chdir(tmp_path)
    cfg = apply_overrides(load_config("my_shards.json"), data_root="wds/")
    dd = build_datasets(cfg)
    assert isinstance(dd["train"], StreamingSplit) and len(dd["train"]) == 1281167
    assert label_names(dd) == ["goldfish", "tench"]
    (batch,) = list(build_stream_loader(dd["val"], 4))
    assert batch["pixel_values"].shape == (4, 3, 224, 224) and batch["labels"].tolist() == [0, 1, 0, 1]
