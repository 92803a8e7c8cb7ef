"""Hub image classifiers (HuggingFaceClassifier / TimmClassifier) on tiny random models that
the tests save to a temp folder, offline: training, saving and reloading, the knobs, bad input."""

import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file

from hf_finetune.config import config_from_dict
from hf_finetune.errors import RecipeError
from hf_finetune.run import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPE = [{"type": "PackClsInputs"}]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # the processors' (0-1 scale): not ImageNet's, not the defaults


def _processor(path, size):
    transformers.ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=MEAN, image_std=STD
                                   ).save_pretrained(path)


def save_tiny(path, config, size=32):
    """A random model of `config` (10 labels, as a pretrained head the data then replaces)
    with an image processor, saved as a Hub repo would hold it."""
    config.num_labels = 10
    torch.manual_seed(0)
    transformers.AutoModelForImageClassification.from_config(config).save_pretrained(path)
    _processor(path, size)
    return str(path)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("vit"), transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64))


@pytest.fixture(scope="module")
def convnext(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("convnext"), transformers.ConvNextConfig(
        hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], image_size=32))


def recipe(tmp_path, model, **overrides):
    def dataset(n, seed):
        return {"type": "SyntheticCIFAR10", "num_samples": n, "seed": seed, "pipeline": PIPE}

    body = {
        "_base_": [os.path.join(REPO, "recipes", "cifar10.json")],
        "model": {"_delete_": True, **model},
        "train_dataloader": {"num_workers": 0, "dataset": dataset(16, 0)},
        "val_dataloader": {"num_workers": 0, "dataset": dataset(8, 1)},
        "test_dataloader": {"num_workers": 0, "dataset": dataset(8, 1)},
        "data_preprocessor": {"_delete_": True},
        "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.05, "momentum": 0.9}},
        "train_cfg": {"by_epoch": False, "max_iters": 2, "val_interval": 2, "total_batch_size": 8},
        "param_scheduler": [],
        "default_hooks": {"logger": {"interval": 1}, "checkpoint": {"interval": 2, "by_epoch": False}},
        "randomness": {"seed": 0},
    }
    body.update(overrides)
    path = tmp_path / "hub.json"
    path.write_text(json.dumps(body))
    return str(path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_two_steps_save_reload_predict(family, request, tmp_path):
    source = request.getfixturevalue(family)
    work = str(tmp_path / "work")
    model = {"type": "HuggingFaceClassifier", "model_name": source, "pretrained": True, "frozen_stages": 1,
             "loss": {"type": "CrossEntropyLoss", "label_smoothing": 0.1}}
    assert main([recipe(tmp_path, model), "--work-dir", work]) == 0

    # The model's preprocessing was taken and recorded: mean / std on the 0-255 scale.
    saved = read_json(os.path.join(work, "recipe.json"))["data_preprocessor"]
    assert saved["mean"] == pytest.approx([m * 255 for m in MEAN])
    assert saved["std"] == pytest.approx([s * 255 for s in STD])
    config = read_json(os.path.join(work, "config.json"))
    assert len(config["id2label"]) == 10 and config["id2label"]["0"] == "airplane"
    assert "auto_map" not in config  # plain transformers: no remote code

    # Frozen: the embeddings and the first block/stage kept the source's weights; the rest trained.
    before, after = load_file(os.path.join(source, "model.safetensors")), \
        load_file(os.path.join(work, "model.safetensors"))
    prefix = {"vit": ("vit.embeddings.", "vit.layers.0."), "convnext": ("convnext.embeddings.",
                                                                       "convnext.encoder.stages.0.")}[family]
    frozen = [k for k in after if k.startswith(prefix)]
    trained = [k for k in after if k.startswith(family + ".") and not k.startswith(prefix)]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)

    # Reloaded (plain AutoModelForImageClassification + our uint8 preparation): same predictions
    # as the Trainer's evaluation, and `hf-finetune predict` gives them too.
    from hf_finetune.models import load_saved_model
    from hf_finetune.predict import Classifier

    loaded = load_saved_model(work, "test")
    assert type(loaded).__module__.startswith("transformers.models.")
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    logits = loaded(pixel_values=images).logits
    classifier = Classifier.load(work)
    with torch.no_grad():
        ours = classifier.model(pixel_values=images).logits
    torch.testing.assert_close(ours, logits)
    # The same as normalising by hand and calling the model without any hook.
    plain = transformers.AutoModelForImageClassification.from_pretrained(work).eval()
    mean = torch.tensor(saved["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(saved["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(plain(pixel_values=(images.float() - mean) / std).logits, logits)
    results = read_json(os.path.join(work, "all_results.json"))
    assert results["test_num_samples"] == 8 and "eval_accuracy_top1" in results
