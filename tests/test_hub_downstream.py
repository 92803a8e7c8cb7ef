"""Downstream of a Hub model's training (HuggingFaceClassifier recipes): export, model card, push,
and the work dir loading where hf_finetune is not installed, with the predictions of
`hf-finetune predict`. Tiny random models saved to temp folders; the Hub is tests/hub_server.py."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from hf_finetune.hub import export_transformers, main, push_work_dir
from hf_finetune.hub.export import is_resnet_work_dir
from hub_server import HubServer

LABELS = ["cat", "dog", "fox"]
TOKEN = "hf_downstream_test_token_0123456789"


def save_tiny_vit(folder, size=32):
    """A ViT as a Hub repo (or a Hub model's work dir) holds it: config, weights, image processor."""
    from transformers import AutoModelForImageClassification, ViTConfig, ViTImageProcessorPil

    config = ViTConfig(image_size=size, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, id2label=dict(enumerate(LABELS)),
                       label2id={name: i for i, name in enumerate(LABELS)})
    torch.manual_seed(0)
    AutoModelForImageClassification.from_config(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": size, "width": size}).save_pretrained(folder)
    return str(folder)


def sample_images(folder, count=6):
    """Visibly different PNGs (a colour and a stripe of its complement), of another size than the model's."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        colour = rng.integers(0, 256, 3).astype(np.uint8)
        array = np.zeros((40, 48, 3), np.uint8) + colour
        array[:, : (48 * i) // count] = 255 - colour
        paths.append(os.path.join(folder, f"{i}.png"))
        Image.fromarray(array).save(paths[-1])
    return paths


def front_matter(path):
    text = open(path, encoding="utf-8").read()
    return yaml.safe_load(text.split("---\n")[1]), text


@pytest.fixture
def vit_work_dir(tmp_path):
    """The model files of a Hub model's work dir, plus a file that is not the model's."""
    work_dir = save_tiny_vit(tmp_path / "work_dir")
    (tmp_path / "work_dir" / "all_results.json").write_text(json.dumps({"test_accuracy_top1": 0.5}))
    return work_dir


@pytest.fixture(scope="module")
def hub():
    server = HubServer(token=TOKEN).start()
    yield server
    server.stop()


@pytest.fixture
def online(monkeypatch):
    """In-process pushes: conftest switched huggingface_hub offline; Xet is not served here."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


# ---------------------------------------------------------------------- export
def test_export_of_a_hub_model_is_the_plain_model_and_its_processor(vit_work_dir, tmp_path, capsys):
    from transformers import AutoModelForImageClassification

    assert not is_resnet_work_dir(vit_work_dir)
    out = str(tmp_path / "exported")
    assert main(["export", vit_work_dir, out]) == 0
    assert "ViTForImageClassification" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "vit" and "auto_map" not in config
    with open(os.path.join(vit_work_dir, "preprocessor_config.json")) as a, \
            open(os.path.join(out, "preprocessor_config.json")) as b:
        assert json.load(a) == json.load(b)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = AutoModelForImageClassification.from_pretrained(vit_work_dir).eval()(pixel_values=pixels).logits
        got = AutoModelForImageClassification.from_pretrained(out).eval()(pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_export_refuses_remote_code_and_a_missing_processor(vit_work_dir, tmp_path, capsys):
    config_path = os.path.join(vit_work_dir, "config.json")
    config = json.load(open(config_path))
    os.remove(os.path.join(vit_work_dir, "preprocessor_config.json"))
    assert main(["export", vit_work_dir, str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "preprocessor_config.json" in err and len(err.strip().splitlines()) == 1

    json.dump(dict(config, auto_map={"AutoModelForImageClassification": "modeling_x.X"}), open(config_path, "w"))
    assert main(["export", vit_work_dir, str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "remote code" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


# ---------------------------------------------------------------------- push and card
def test_push_of_a_hub_model_uploads_no_native_copy_and_a_plain_card(vit_work_dir, hub, online):
    push_work_dir(vit_work_dir, "test-user/tiny-vit", token=TOKEN, endpoint=hub.url)
    stored = hub.repos["test-user/tiny-vit"]
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md",
            "all_results.json"} <= set(stored.files)
    assert not any(name.startswith("native/") for name in stored.files)
    card = stored.files["README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert "vit" in meta["tags"] and "custom_code" not in meta["tags"] and "resnet" not in meta["tags"]
    assert "trust_remote_code" not in card and 'pipeline("image-classification", model="test-user/tiny-vit")' in card
