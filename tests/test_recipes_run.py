"""The shipped recipes for one's own data and for multi-label data run end to end (shrunk to
32 px, ResNet-18 or a tiny ViT, a few updates), and what they leave is what predict and
--eval-only use."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from hf_finetune.predict import predict
from hf_finetune.run import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("cat", "dog", "fox")


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """my_images/{train,val}/<class>/*.jpg of mixed sizes, each class its own brightness."""
    root = tmp_path_factory.mktemp("my_images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 3)):
        for index, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                height, width = (48, 64) if i % 2 else (60, 45)
                pixels = rng.integers(0, 60, (height, width, 3)) + 80 * index
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.jpg", quality=90)
    return root


@pytest.mark.floors
def test_imagefolder_recipe_on_a_jpeg_folder(jpeg_folder, tmp_path):
    work_dir = tmp_path / "run"
    code = main([
        os.path.join(REPO, "recipes", "imagefolder_finetune.json"), "--data-root", str(jpeg_folder),
        "--work-dir", str(work_dir), "--cfg-options", "model.backbone.init_cfg=null",
        "model.backbone.depth=18", "model.head.in_channels=512", "train_cfg.max_epochs=2",
        "train_cfg.total_batch_size=8", "train_dataloader.dataset.pipeline.0.scale=32",
        "val_dataloader.dataset.pipeline.0.scale=36", "val_dataloader.dataset.pipeline.1.crop_size=32",
        "test_dataloader.dataset.pipeline.0.scale=36", "test_dataloader.dataset.pipeline.1.crop_size=32",
        "train_dataloader.num_workers=0", "val_dataloader.num_workers=0", "test_dataloader.num_workers=0",
    ])
    assert code == 0
    results = read_json(work_dir / "all_results.json")
    assert results["test_num_samples"] == 9
    # The number of classes came from the folder names.
    assert read_json(work_dir / "config.json")["id2label"] == {"0": "cat", "1": "dog", "2": "fox"}
    assert (work_dir / "README.md").is_file()  # the card read the saved recipe back
    # EMA weights were saved beside each checkpoint; the processor mirrors ResizeEdge + CenterCrop.
    assert any((work_dir / d / "ema.safetensors").is_file() for d in os.listdir(work_dir) if d.startswith("checkpoint-"))
    processor = read_json(work_dir / "preprocessor_config.json")
    assert processor["size"] == {"shortest_edge": 36} and processor["crop_size"] == {"height": 32, "width": 32}
    rows = predict(str(work_dir), [str(jpeg_folder / "val")], topk=2)
    assert len(rows) == 9 and all(row["error"] is None for row in rows)
    assert all(label in CLASSES for row in rows for label, _ in row["predictions"])


def test_multilabel_smoke_recipe_and_eval_only_agree(tmp_path):
    work_dir = tmp_path / "multilabel"
    recipe = os.path.join(REPO, "recipes", "multilabel_smoke.json")
    shrink = ["train_dataloader.dataset.num_samples=64", "val_dataloader.dataset.num_samples=32",
              "test_dataloader.dataset.num_samples=32", "train_cfg.max_epochs=2"]
    assert main([recipe, "--work-dir", str(work_dir), "--cfg-options", *shrink]) == 0
    results = read_json(work_dir / "all_results.json")
    for key in ("mAP", "precision", "recall", "f1-score"):
        assert 0.0 <= results[f"test_multilabel/{key}"] <= 1.0
    assert read_json(work_dir / "config.json")["problem_type"] == "multi_label_classification"

    assert main([recipe, "--work-dir", str(work_dir), "--eval-only", "--cfg-options", *shrink]) == 0
    again = read_json(work_dir / "test_results.json")
    assert again["test_multilabel/mAP"] == pytest.approx(results["test_multilabel/mAP"], abs=1e-6)
    assert again["test_multilabel/f1-score"] == pytest.approx(results["test_multilabel/f1-score"], abs=1e-6)


def test_hub_model_recipe_on_a_jpeg_folder(jpeg_folder, tmp_path):
    """recipes/hub_model_finetune.json with a tiny random ViT folder standing in for its Hub ViT
    (offline), at 32 px: mean / std and the classes come from the model and the folders."""
    from transformers import AutoModelForImageClassification, ViTConfig, ViTImageProcessorPil

    stand_in = str(tmp_path / "tiny_vit")
    torch.manual_seed(0)
    AutoModelForImageClassification.from_config(ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=5)).save_pretrained(stand_in)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(stand_in)  # mean / std 0.5
    work_dir = tmp_path / "run"
    code = main([
        os.path.join(REPO, "recipes", "hub_model_finetune.json"), "--data-root", str(jpeg_folder),
        "--work-dir", str(work_dir), "--cfg-options", f"model.model_name={stand_in}", "train_cfg.max_epochs=2",
        "train_cfg.total_batch_size=8", "train_dataloader.dataset.pipeline.0.scale=32",
        "val_dataloader.dataset.pipeline.0.scale=36", "val_dataloader.dataset.pipeline.1.crop_size=32",
        "test_dataloader.dataset.pipeline.0.scale=36", "test_dataloader.dataset.pipeline.1.crop_size=32",
        "train_dataloader.num_workers=0", "val_dataloader.num_workers=0", "test_dataloader.num_workers=0",
    ])
    assert code == 0
    assert read_json(work_dir / "all_results.json")["test_num_samples"] == 9
    config = read_json(work_dir / "config.json")
    assert config["model_type"] == "vit" and config["id2label"] == {"0": "cat", "1": "dog", "2": "fox"}
    assert read_json(work_dir / "recipe.json")["data_preprocessor"]["mean"] == pytest.approx([127.5] * 3)
    rows = predict(str(work_dir), [str(jpeg_folder / "val")], topk=2)
    assert len(rows) == 9 and all(row["error"] is None for row in rows)
