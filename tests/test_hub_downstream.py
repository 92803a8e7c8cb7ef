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
from safetensors.torch import load_file, save_file

from hf_finetune.hub import main, push_work_dir
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
        array = np.zeros((40, 40, 3), np.uint8) + colour
        array[:, : (40 * i) // count] = 255 - colour
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


# ---------------------------------------------------------------------- a trained work dir
def hub_recipe(tmp_path, model_name, test_pipeline, **model):
    """A HuggingFaceClassifier recipe, 2 updates on generated 32 px data; mean / std from the model."""
    def dataset(n, seed, pipeline):
        return {"type": "SyntheticCIFAR10", "num_samples": n, "seed": seed, "pipeline": pipeline}

    path = tmp_path / "hub_recipe.json"
    path.write_text(json.dumps({
        "_base_": [os.path.join(REPO, "recipes", "cifar10.json")],
        "model": {"_delete_": True, "type": "HuggingFaceClassifier", "model_name": model_name, "pretrained": True,
                  **model},
        "data_preprocessor": {"_delete_": True},
        "train_dataloader": {"num_workers": 0, "dataset": dataset(16, 0, [{"type": "PackClsInputs"}])},
        "val_dataloader": None,
        "test_dataloader": {"num_workers": 0, "dataset": dataset(8, 1, test_pipeline)},
        "optim_wrapper": {"optimizer": {"_delete_": True, "type": "AdamW", "lr": 0.001, "weight_decay": 0.05}},
        "param_scheduler": [],
        "train_cfg": {"by_epoch": False, "max_iters": 2, "total_batch_size": 8},
        "default_hooks": {"checkpoint": {"interval": 2, "by_epoch": False}},
        "randomness": {"seed": 0},
    }))
    return str(path)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The ViT is built for 32 px; the images are 40x40: the test pipeline and the saved image processor
# both resize (down, antialiased) and crop to 32. (Square: on a 40x48 image mmcv's CenterCrop,
# which rounds the offset of an odd margin up, and transformers', which rounds it down, take
# crops one pixel apart.)
TEST_PIPELINE = [{"type": "ResizeEdge", "scale": 36, "edge": "short", "backend": "pillow"},
                 {"type": "CenterCrop", "crop_size": 32},
                 {"type": "PackClsInputs"}]


@pytest.fixture(scope="module", params=[32, 48], ids=["native_size", "other_size"])
def trained(tmp_path_factory, request):
    """A work dir trained from a tiny ViT (2 updates), and image files to predict. other_size: the
    32 px ViT tested at 48 px, so the saved model's own size must become 48 (a plain pipeline()
    does not interpolate position embeddings)."""
    from hf_finetune.run import main as run_main

    size = request.param
    root = tmp_path_factory.mktemp("trained")
    source = save_tiny_vit(root / "tiny_vit")
    work_dir = str(root / "work_dir")
    pipeline = [{**TEST_PIPELINE[0], "scale": size + 4}, {**TEST_PIPELINE[1], "crop_size": size}, TEST_PIPELINE[2]]
    assert run_main([hub_recipe(root, source, pipeline), "--work-dir", work_dir]) == 0
    saved = json.loads(open(os.path.join(work_dir, "config.json")).read())
    assert saved["image_size"] == size
    assert load_file(os.path.join(work_dir, "model.safetensors"))["vit.embeddings.position_embeddings"].shape[1] \
        == (size // 8) ** 2 + 1
    # Two updates leave the fresh head near uniform; a larger head makes confident predictions,
    # so a preprocessing difference between the two loading routes would show in the scores.
    weights = os.path.join(work_dir, "model.safetensors")
    state = load_file(weights)
    save_file({k: v * 40 if k.startswith("classifier.") else v for k, v in state.items()}, weights,
              metadata={"format": "pt"})
    return work_dir, sample_images(str(root / "images"))


LOAD_WITHOUT_HF_FINETUNE = r"""
import importlib.abc, json, sys

class Refuse(importlib.abc.MetaPathFinder):  # the venv may hold an editable install: refuse it outright
    def find_spec(self, name, path=None, target=None):
        if name == "hf_finetune" or name.startswith("hf_finetune."):
            raise ModuleNotFoundError(f"No module named {name!r} (refused by the test)")

sys.meta_path.insert(0, Refuse())
from PIL import Image
from transformers import AutoModelForImageClassification, pipeline

folder, out, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
model = AutoModelForImageClassification.from_pretrained(folder)  # no trust_remote_code
classify = pipeline("image-classification", model=folder)
rows = [classify(Image.open(path), top_k=1)[0] for path in paths]
assert not any(name.split(".")[0] == "hf_finetune" for name in sys.modules), "hf_finetune was imported"
json.dump({"model_module": type(model).__module__, "rows": rows}, open(out, "w"))
"""


def load_elsewhere(folder, paths, tmp_path, family="vit"):
    """Top-1 (label, score) per image from plain transformers in a fresh `python -I` (no PYTHONPATH,
    no user site; hf_finetune refused); the model class must be transformers' own for `family`."""
    script, out = tmp_path / "load.py", tmp_path / "rows.json"
    script.write_text(LOAD_WITHOUT_HF_FINETUNE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-I", str(script), folder, str(out), *paths], cwd=str(tmp_path),
                            env=dict(env, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(out.read_text())
    assert loaded["model_module"].startswith(f"transformers.models.{family}."), loaded["model_module"]
    return [(row["label"], row["score"]) for row in loaded["rows"]]


def test_work_dir_and_export_load_without_hf_finetune_with_predict_s_predictions(trained, tmp_path):
    from hf_finetune.predict import predict

    work_dir, paths = trained
    expected = [row["predictions"][0] for row in predict(work_dir, paths, topk=1)]
    assert len(set(label for label, _ in expected)) > 1  # the images are told apart: a real comparison
    assert max(score for _, score in expected) > 0.5
    exported = str(tmp_path / "exported")
    assert main(["export", work_dir, exported]) == 0
    for folder in (work_dir, exported):
        got = load_elsewhere(folder, paths, tmp_path)
        assert [label for label, _ in got] == [label for label, _ in expected], folder
        assert [score for _, score in got] == pytest.approx([score for _, score in expected], abs=1e-4), folder


def test_card_names_the_hub_base_model(trained, tmp_path):
    from hf_finetune.hub import write_model_card

    work_dir = shutil.copytree(trained[0], str(tmp_path / "work_dir"))
    meta, text = front_matter(write_model_card(work_dir))
    assert "base_model" not in meta  # a local folder: no Hub id to name
    assert "vit" in meta["tags"] and "custom_code" not in meta["tags"]
    assert "trust_remote_code" not in text and "| frozen_stages |" in text

    recipe_path = os.path.join(work_dir, "recipe.json")
    recipe = json.load(open(recipe_path))
    cases = [({"model_name": "google/vit-base-patch16-224-in21k"}, "google/vit-base-patch16-224-in21k"),
             ({"model_name": "google/vit-base-patch16-224-in21k", "pretrained": False}, None),
             ({"type": "TimmClassifier", "model_name": "vit_small_patch16_224.augreg_in21k"},
              "timm/vit_small_patch16_224.augreg_in21k")]
    for change, base in cases:
        json.dump(dict(recipe, model=dict(recipe["model"], **change)), open(recipe_path, "w"))
        meta, text = front_matter(write_model_card(work_dir))
        assert meta.get("base_model") == base, change
        if base:
            assert f"[`{base}`](https://huggingface.co/{base})" in text


def test_export_of_a_timm_work_dir_without_timm_says_to_install_the_extra(tmp_path, capsys):
    from safetensors.torch import save_file as save_weights
    from transformers.utils import is_timm_available

    if is_timm_available():
        pytest.skip("timm is installed here")
    work_dir = tmp_path / "work_dir"
    work_dir.mkdir()
    (work_dir / "config.json").write_text(json.dumps({"model_type": "timm_wrapper", "architecture": "test_vit",
                                                      "num_classes": 3, "label_names": LABELS}))
    save_weights({"timm_model.head.weight": torch.zeros(3, 8)}, str(work_dir / "model.safetensors"))
    (work_dir / "preprocessor_config.json").write_text("{}")
    assert main(["export", str(work_dir), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and 'pip install "hf_finetune[timm]"' in err
