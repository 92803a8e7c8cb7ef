"""Hub: image processor config, model card, native export, push to a local Hub, load elsewhere.

The Hub is tests/hub_server.py on 127.0.0.1. Pushes run in-process with an explicit
endpoint (huggingface_hub's offline switch patched off), except the end-to-end test, which
runs the CLI with HF_ENDPOINT in a subprocess and then loads the repo in a fresh
subprocess where hf_finetune cannot be imported.
"""

import dataclasses
import hashlib
import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from hf_finetune.config import config_from_dict
from hf_finetune.errors import UserError
from hf_finetune.hub import (
    HubError,
    PushOnSaveCallback,
    export_transformers,
    main,
    push_work_dir,
    write_image_processor_config,
    write_model_card,
)
from hub_server import HubServer

TOKEN = "hf_test" + secrets.token_hex(16)  # unique, so any leak is found by a plain search
LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEAN = [125.307, 122.961, 113.8575]
STD = [51.5865, 50.847, 51.255]
MODEL_FILES = ("model.safetensors", "config.json", "configuration_finetune_resnet.py", "modeling_finetune_resnet.py")


def tiny_recipe():
    """A merged recipe as training saves it: ResNet-18, 10 classes, 32 px test pipeline."""
    return {
        "model": {
            "type": "ImageClassifier",
            "backbone": {"type": "ResNet", "depth": 18, "frozen_stages": 1, "zero_init_residual": False},
            "neck": {"type": "GlobalAveragePooling"},
            "head": {"type": "LinearClsHead", "num_classes": 10, "topk": [1, 5]},
        },
        "data_preprocessor": {"num_classes": 10, "mean": MEAN, "std": STD, "to_rgb": False},
        "train_dataloader": {"batch_size": 8, "dataset": {"type": "CIFAR10", "split": "train", "pipeline": [
            {"type": "RandomCrop", "crop_size": 32, "padding": 4}, {"type": "PackClsInputs"}]}},
        "val_dataloader": {"batch_size": 8, "dataset": {"type": "CIFAR10", "split": "test", "pipeline": [
            {"type": "Resize", "scale": 32}, {"type": "PackClsInputs"}]}},
        "test_dataloader": {"batch_size": 8, "dataset": {"type": "CIFAR10", "split": "test", "pipeline": [
            {"type": "Resize", "scale": 32}, {"type": "PackClsInputs"}]}},
        "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0001}},
        "param_scheduler": {"type": "MultiStepLR", "by_epoch": True, "milestones": [1], "gamma": 0.1},
        "train_cfg": {"by_epoch": True, "max_epochs": 2, "total_batch_size": 8},
        "training_args": {"push_to_hub": True, "hub_model_id": "test-user/tiny-resnet"},
    }


def build_tiny_model():
    from hf_finetune.models import build_model

    torch.manual_seed(0)
    cfg = config_from_dict(tiny_recipe())
    model = build_model(cfg.model, cfg.data_preprocessor, id2label=dict(enumerate(LABELS)))
    # Spread the predictions over several classes: non-trivial BN statistics and a large head.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.startswith("head."):
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return model.eval()


def write_training_outputs(work_dir):
    """The files training writes next to the model (numbers made up, shapes real)."""
    def dump(name, value):
        with open(os.path.join(work_dir, name), "w") as handle:
            json.dump(value, handle)

    dump("recipe.json", tiny_recipe())
    dump("all_results.json", {"epoch": 2.0, "train_loss": 2.05, "eval_accuracy_top1": 0.31,
                              "eval_accuracy_top5": 0.8, "test_accuracy_top1": 0.3, "test_accuracy_top5": 0.79})
    history = [
        {"loss": 2.3, "learning_rate": 0.01, "epoch": 0.5, "step": 1},
        {"loss": 2.2, "learning_rate": 0.01, "epoch": 1.0, "step": 2},
        {"eval_loss": 2.25, "eval_accuracy_top1": 0.2, "eval_accuracy_top5": 0.6, "epoch": 1.0, "step": 2},
        {"loss": 2.0, "learning_rate": 0.001, "epoch": 1.5, "step": 3},
        {"loss": 1.9, "learning_rate": 0.001, "epoch": 2.0, "step": 4},
        {"eval_loss": 2.1, "eval_accuracy_top1": 0.31, "eval_accuracy_top5": 0.8, "epoch": 2.0, "step": 4},
        {"train_loss": 2.05, "train_runtime": 1.0, "epoch": 2.0, "step": 4},
    ]
    dump("trainer_state.json", {"log_history": history, "global_step": 4, "epoch": 2.0})
    matrix = [[(3 * i + j) % 5 for j in range(10)] for i in range(10)]
    dump("confusion_matrix.json", {"labels": LABELS, "matrix": matrix})
    # Things that must stay local.
    os.makedirs(os.path.join(work_dir, "checkpoint-4"), exist_ok=True)
    with open(os.path.join(work_dir, "checkpoint-4", "optimizer.pt"), "wb") as handle:
        handle.write(b"optimizer state")
    with open(os.path.join(work_dir, "training_args.bin"), "wb") as handle:
        handle.write(b"pickled training args: stays local")


@pytest.fixture(scope="module")
def tiny_work_dir(tmp_path_factory):
    work_dir = str(tmp_path_factory.mktemp("hub") / "work_dir")
    build_tiny_model().save_pretrained(work_dir)
    write_training_outputs(work_dir)
    return work_dir


@pytest.fixture
def work_dir(tiny_work_dir, tmp_path):
    """A private copy of the tiny work dir."""
    return shutil.copytree(tiny_work_dir, str(tmp_path / "work_dir"))


@pytest.fixture(scope="module")
def hub():
    server = HubServer(token=TOKEN).start()
    yield server
    server.stop()


def sample_images(size=40, count=8):
    """Deterministic, visibly different images (solid colour + a stripe of its complement)."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        colour = rng.integers(0, 256, 3).astype(np.uint8)
        array = np.zeros((size, size, 3), np.uint8) + colour
        array[:, : (size * i) // count] = 255 - colour
        images.append(Image.fromarray(array))
    return images


def uint8_batch(images):
    return torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).contiguous()


def load_ours(work_dir):
    from hf_finetune.models import FinetuneResNetForImageClassification

    return FinetuneResNetForImageClassification.from_pretrained(work_dir).eval()


def file_digests(folder, names=MODEL_FILES):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest() for name in names}


def assert_token_absent(*, folders=(), texts=(), blobs=()):
    for folder in folders:
        for root, _, names in os.walk(folder):
            for name in names:
                with open(os.path.join(root, name), "rb") as handle:
                    assert TOKEN.encode() not in handle.read(), f"token written to {os.path.join(root, name)}"
    for text in texts:
        assert TOKEN not in text
    for blob in blobs:
        assert TOKEN.encode() not in blob


def front_matter(path):
    text = open(path, encoding="utf-8").read()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1]), text


# ---------------------------------------------------------------------- image processor
@pytest.mark.parametrize(
    "pipeline, expected_size, crop",
    [
        ([{"type": "Resize", "scale": 224}, {"type": "PackClsInputs"}], (224, 224), None),
        ([{"type": "Resize", "scale": [48, 40]}, {"type": "CenterCrop", "crop_size": 32}, {"type": "PackClsInputs"}],
         (48, 40), (32, 32)),
        ([{"type": "PackClsInputs"}], (32, 32), None),  # no resize: the training crop size
    ],
)
@pytest.mark.floors
def test_image_processor_reproduces_test_pipeline(tmp_path, pipeline, expected_size, crop):
    from transformers import AutoImageProcessor

    assert importlib.util.find_spec("torchvision") is None, "torchvision must not be installed"
    recipe = tiny_recipe()
    recipe["test_dataloader"]["dataset"]["pipeline"] = pipeline
    config = {"mean": MEAN, "std": STD, "to_rgb": False}
    write_image_processor_config(tmp_path, config, cfg=config_from_dict(recipe))

    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor).__name__ == "ViTImageProcessorPil"
    colour = np.array([200, 30, 90], np.uint8)
    image = Image.fromarray(np.zeros((20, 25, 3), np.uint8) + colour)
    pixels = processor(image, return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3) + (crop or expected_size)
    expected = (torch.tensor(colour, dtype=torch.float32) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(pixels[0, :, 0, 0], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.floors
def test_image_processor_matches_the_data_pipeline_resize(tmp_path):
    """On CIFAR-sized images the processor gives exactly what the test pipeline + model normalisation give."""
    from transformers import AutoImageProcessor

    transforms = pytest.importorskip("hf_finetune.data.transforms")
    recipe = tiny_recipe()
    recipe["test_dataloader"]["dataset"]["pipeline"] = [{"type": "Resize", "scale": 224}, {"type": "PackClsInputs"}]
    write_image_processor_config(tmp_path, {"mean": MEAN, "std": STD, "to_rgb": False}, cfg=config_from_dict(recipe))
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8))
              for i in range(2)]
    pixels = AutoImageProcessor.from_pretrained(tmp_path)(images, return_tensors="pt")["pixel_values"]

    nhwc = torch.from_numpy(np.stack([np.asarray(image) for image in images]))
    resized = transforms.Resize(224).apply(nhwc).permute(0, 3, 1, 2).float()
    expected = (resized - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels, expected, atol=1e-4, rtol=1e-4)


def test_image_processor_statistics_follow_to_rgb(tmp_path):
    path = write_image_processor_config(tmp_path, {"mean": MEAN, "std": STD, "to_rgb": True},
                                        cfg=config_from_dict(tiny_recipe()))
    written = json.load(open(path))
    assert written["image_mean"] == pytest.approx([m / 255 for m in MEAN[::-1]])
    assert written["image_std"] == pytest.approx([s / 255 for s in STD[::-1]])


# ---------------------------------------------------------------------- model card
@pytest.mark.floors
def test_model_card_metadata_tables_and_figures(work_dir):
    write_image_processor_config(work_dir)
    path = write_model_card(work_dir, repo_id="test-user/tiny-resnet", native_subfolder="native")
    meta, text = front_matter(path)

    assert meta["library_name"] == "transformers"
    assert {"image-classification", "hf_finetune", "resnet"} <= set(meta["tags"])
    assert meta["datasets"] == ["uoft-cs/cifar10"] and meta["metrics"] == ["accuracy"]
    assert "base_model" not in meta  # trained from scratch here
    result = meta["model-index"][0]["results"][0]
    assert result["task"]["type"] == "image-classification"
    assert result["dataset"] == {"name": "CIFAR-10", "type": "uoft-cs/cifar10", "split": "test"}
    values = {metric["name"]: metric["value"] for metric in result["metrics"]}
    assert values == {"Top-1 Accuracy": 0.3, "Top-5 Accuracy": 0.79}

    for snippet in ("| epochs | `2` |", "| total batch size | `8` |", "SGD(lr=0.01", "MultiStepLR(",
                    "| frozen_stages | `1` |", "| input size | 32x32 |", "| test (split `test`) | 30.00 | 79.00 |",
                    'trust_remote_code=True', 'subfolder="native"', "test-user/tiny-resnet"):
        assert snippet in text, snippet
    for png in ("training_curves.png", "confusion_matrix.png"):
        assert f"({png})" in text
        with open(os.path.join(work_dir, png), "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
        with Image.open(os.path.join(work_dir, png)) as image:
            image.verify()


def test_model_card_without_optional_inputs(work_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in MODEL_FILES:
        shutil.copy(os.path.join(work_dir, name), bare)
    meta, text = front_matter(write_model_card(str(bare)))
    assert meta["library_name"] == "transformers" and "model-index" not in meta
    assert "No evaluation results" in text and text.count("Not available") == 2
    assert not (bare / "training_curves.png").exists()


def test_model_card_names_hub_base_checkpoint(work_dir):
    recipe = tiny_recipe()
    recipe["model"]["backbone"]["init_cfg"] = {"type": "Pretrained", "checkpoint": "microsoft/resnet-18"}
    json.dump(recipe, open(os.path.join(work_dir, "recipe.json"), "w"))
    meta, text = front_matter(write_model_card(work_dir))
    assert meta["base_model"] == "microsoft/resnet-18"
    assert "[`microsoft/resnet-18`](https://huggingface.co/microsoft/resnet-18)" in text


# ---------------------------------------------------------------------- native export
@pytest.mark.floors
def test_export_cli_gives_native_model_with_same_predictions(work_dir, tmp_path, capsys):
    from transformers import AutoImageProcessor, AutoModelForImageClassification, ResNetForImageClassification, pipeline

    write_image_processor_config(work_dir)
    out = str(tmp_path / "native")
    assert main(["export", work_dir, out, "--format", "transformers"]) == 0
    assert "exported" in capsys.readouterr().out

    native = AutoModelForImageClassification.from_pretrained(out).eval()
    assert type(native) is ResNetForImageClassification
    assert native.config.id2label == dict(enumerate(LABELS))
    assert native.config.label2id == {name: i for i, name in enumerate(LABELS)}
    ours = load_ours(work_dir)
    processor = AutoImageProcessor.from_pretrained(out)
    images = sample_images()
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = ours(pixel_values=pixels).logits
        torch.testing.assert_close(native(pixel_values=pixels).logits, expected, atol=1e-5, rtol=1e-5)

    classifier = pipeline("image-classification", model=out)
    predictions = classifier(images)
    assert [p[0]["label"] for p in predictions] == [LABELS[i] for i in expected.argmax(1)]
    assert len({p[0]["label"] for p in predictions}) > 1  # the comparison is not vacuous
    torch.testing.assert_close(torch.tensor([p[0]["score"] for p in predictions]),
                               expected.softmax(1).max(1).values, atol=1e-4, rtol=1e-4)


def test_export_folds_to_rgb_into_first_conv(work_dir, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    config = json.load(open(os.path.join(work_dir, "config.json")))
    config["to_rgb"] = True
    json.dump(config, open(os.path.join(work_dir, "config.json"), "w"))
    out = export_transformers(work_dir, str(tmp_path / "native"))

    ours, native = load_ours(work_dir), AutoModelForImageClassification.from_pretrained(out).eval()
    assert ours.config.to_rgb
    torch.testing.assert_close(native.resnet.embedder.embedder.convolution.weight,
                               ours.backbone.embedder.embedder.convolution.weight.flip(1))
    images = sample_images(size=32)  # the processor's size: its resize is the identity
    pixels = AutoImageProcessor.from_pretrained(out)(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = ours(pixel_values=uint8_batch(images)).logits  # the model flips uint8 input itself
        torch.testing.assert_close(native(pixel_values=pixels).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.floors
def test_to_rgb_remote_code_model_with_processor_matches_uint8_input(work_dir):
    """Processor output (stats in flipped order) into our model == our model on the raw uint8 image."""
    from transformers import AutoImageProcessor

    config = json.load(open(os.path.join(work_dir, "config.json")))
    config["to_rgb"] = True
    json.dump(config, open(os.path.join(work_dir, "config.json"), "w"))
    write_image_processor_config(work_dir)
    ours = load_ours(work_dir)
    images = sample_images(size=32)
    pixels = AutoImageProcessor.from_pretrained(work_dir)(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = ours(pixel_values=uint8_batch(images)).logits
        got = ours(pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_export_of_unfinished_work_dir_is_a_user_error(tmp_path, capsys):
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.safetensors" in err


# ---------------------------------------------------------------------- push + load elsewhere
HIDE_PACKAGE = """
import sys

class HideHfFinetune:
    def find_spec(self, name, path=None, target=None):
        if name == "hf_finetune" or name.startswith("hf_finetune."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
        return None

sys.meta_path.insert(0, HideHfFinetune())
"""

LOAD_ELSEWHERE = """
import json, sys
import torch
from PIL import Image

try:
    import hf_finetune
    sys.exit("hf_finetune is importable: the test environment is wrong")
except ImportError:
    pass
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

repo, out, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
images = [Image.open(path) for path in paths]
model = AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(repo)
pixels = processor(images, return_tensors="pt")["pixel_values"]
with torch.no_grad():
    logits = model(pixel_values=pixels).logits
remote_pipe = pipeline("image-classification", model=repo, trust_remote_code=True)
native = AutoModelForImageClassification.from_pretrained(repo, subfolder="native")
native_processor = AutoImageProcessor.from_pretrained(repo, subfolder="native")
native_pipe = pipeline("image-classification", model=native, image_processor=native_processor)
json.dump({
    "model_module": type(model).__module__,
    "native_class": type(native).__name__,
    "logits": logits.tolist(),
    "remote_pipeline": [r[0] for r in remote_pipe(images)],
    "native_pipeline": [r[0] for r in native_pipe(images)],
}, open(out, "w"))
"""


def subprocess_env(hub, tmp_path, **extra):
    env = dict(os.environ)
    env.pop("HF_TOKEN", None)
    env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HOME=str(tmp_path / "hf_home"), TRANSFORMERS_VERBOSITY="info", **extra)
    return env


def test_push_then_load_without_hf_finetune(work_dir, hub, tmp_path):
    repo_id = "test-user/tiny-resnet"
    push = subprocess.run(
        [sys.executable, "-m", "hf_finetune.hub", "push", work_dir, repo_id],
        env=subprocess_env(hub, tmp_path, HF_TOKEN=TOKEN), capture_output=True, text=True, timeout=120,
    )
    assert push.returncode == 0, push.stderr[-3000:]

    stored = hub.repos[repo_id]
    assert set(stored.files) == {
        *MODEL_FILES, "preprocessor_config.json", "recipe.json", "all_results.json", "trainer_state.json",
        "confusion_matrix.json", "README.md", "training_curves.png", "confusion_matrix.png",
        "native/config.json", "native/model.safetensors", "native/preprocessor_config.json",
    }
    assert "model.safetensors" in stored.lfs_paths  # the LFS upload path was taken
    assert json.loads(stored.files["config.json"])["auto_map"]["AutoModelForImageClassification"]
    assert b'subfolder="native"' in stored.files["README.md"]

    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE_PACKAGE)
    (tmp_path / "load.py").write_text(textwrap.dedent(LOAD_ELSEWHERE))
    images = sample_images()
    paths = [str(tmp_path / f"image{i}.png") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    result_path = str(tmp_path / "result.json")
    load = subprocess.run(
        [sys.executable, str(tmp_path / "load.py"), repo_id, result_path, *paths],
        env=subprocess_env(hub, tmp_path, PYTHONPATH=str(hide)), cwd=str(tmp_path),
        capture_output=True, text=True, timeout=120,
    )
    assert load.returncode == 0, load.stderr[-3000:]
    result = json.load(open(result_path))
    assert result["model_module"].startswith("transformers_modules.")  # the Hub's copy of the code
    assert result["native_class"] == "ResNetForImageClassification"

    from transformers import AutoImageProcessor

    ours = load_ours(work_dir)
    pixels = AutoImageProcessor.from_pretrained(work_dir)([Image.open(p) for p in paths],
                                                          return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = ours(pixel_values=pixels).logits
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, atol=1e-5, rtol=1e-5)
    expected_labels = [LABELS[i] for i in expected.argmax(1)]
    assert len(set(expected_labels)) > 1
    for key in ("remote_pipeline", "native_pipeline"):
        assert [r["label"] for r in result[key]] == expected_labels, key
        torch.testing.assert_close(torch.tensor([r["score"] for r in result[key]]),
                                   expected.softmax(1).max(1).values, atol=1e-4, rtol=1e-4)

    assert_token_absent(folders=[work_dir, str(tmp_path / "hf_home")],
                        texts=[push.stdout, push.stderr, load.stdout, load.stderr], blobs=hub.stored_bytes())


# ---------------------------------------------------------------------- failures
def closed_port_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.floors
@pytest.mark.parametrize("case", ["bad_token", "no_token", "server_error", "unreachable", "hung", "offline"])
def test_push_failure_is_one_clear_message(case, work_dir, hub, online, monkeypatch, caplog, capsys):
    from huggingface_hub import constants

    import hf_finetune.hub.push as push_module

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", os.path.join(work_dir, "no-stored-token"))
    token, endpoint = TOKEN, hub.url
    expected = {"bad_token": "rejected the token (401", "no_token": "no Hub token found",
                "server_error": "server error (500", "unreachable": "cannot reach", "hung": "stopped answering",
                "offline": "HF_HUB_OFFLINE=1"}[case]
    silent = socket.socket()  # accepts connections (kernel backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    if case == "bad_token":
        hub.token = "hf_the_server_expects_another_token"  # so our TOKEN is the wrong one
    elif case == "no_token":
        token = None
    elif case == "server_error":
        hub.fail_status = 500
    elif case == "unreachable":
        endpoint = closed_port_url()
    elif case == "hung":
        endpoint = "http://127.0.0.1:%d" % silent.getsockname()[1]
        monkeypatch.setattr(push_module, "FIRST_CONTACT_TIMEOUT_S", 1.0)
    elif case == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = file_digests(work_dir)
    start = time.monotonic()
    try:
        with pytest.raises(HubError) as raised:
            push_work_dir(work_dir, "test-user/failing", token=token, endpoint=endpoint, include_native=False)
    finally:
        hub.token, hub.fail_status = TOKEN, None
        silent.close()
    assert time.monotonic() - start < 30
    message = str(raised.value)
    assert isinstance(raised.value, UserError) and raised.value.exit_code == 1
    assert expected in message
    assert "local outputs" in message and f"hf-finetune push {work_dir} test-user/failing" in message
    assert "test-user/failing" not in hub.repos
    assert file_digests(work_dir) == before
    assert_token_absent(folders=[work_dir], texts=[message, caplog.text, *capsys.readouterr()])


@pytest.mark.floors
def test_cli_push_failure_prints_error_and_retry_command(work_dir, online, capsys):
    endpoint = closed_port_url()
    code = main(["push", work_dir, "test-user/cli", "--token", TOKEN, "--no-native", "--private",
                 "--endpoint", endpoint])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.startswith("error: could not push")
    assert f"hf-finetune push {work_dir} test-user/cli --private --no-native --endpoint {endpoint}" in captured.err
    assert_token_absent(texts=[captured.out, captured.err])


# ---------------------------------------------------------------------- push during training
def checkpoint_in(work_dir, step=4):
    """checkpoint-STEP as the Trainer saves it: the model, its state, optimizer and training_args.bin."""
    checkpoint = os.path.join(work_dir, f"checkpoint-{step}")
    for name in (*MODEL_FILES, "trainer_state.json", "training_args.bin"):
        shutil.copy(os.path.join(work_dir, name), checkpoint)
    return SimpleNamespace(output_dir=work_dir)


def save_event(callback, args, step=4, main_process=True):
    from transformers import TrainerControl, TrainerState

    state = TrainerState(global_step=step, is_world_process_zero=main_process)
    callback.on_save(args, state, TrainerControl())
    return state


@pytest.mark.floors
@pytest.mark.parametrize("strategy, folder", [("every_save", None), ("checkpoint", "last-checkpoint"),
                                              ("all_checkpoints", "checkpoint-4")])
def test_push_on_save_callback(strategy, folder, work_dir, hub, online, caplog):
    """Each strategy the config accepts lands the model at the root and, for the checkpoint
    strategies, the whole checkpoint (less training_args.bin) in its folder."""
    from transformers import TrainerControl

    args = checkpoint_in(work_dir)
    repo_id = f"test-user/during-{strategy}"
    callback = PushOnSaveCallback(repo_id, TOKEN, private=True, strategy=strategy, endpoint=hub.url)
    assert TOKEN not in repr(callback)

    requests_before = len(hub.requests)
    save_event(callback, args, main_process=False)
    assert len(hub.requests) == requests_before  # only the main process pushes

    state = save_event(callback, args)
    callback.on_train_end(args, state, TrainerControl())  # waits for the background push
    stored = hub.repos[repo_id]
    assert stored.private
    root = {path for path in stored.files if "/" not in path}
    assert root == {*MODEL_FILES, "preprocessor_config.json", "recipe.json", "trainer_state.json"}
    in_folder = {path.split("/", 1)[1] for path in stored.files if "/" in path}
    assert {path.split("/")[0] for path in stored.files if "/" in path} == ({folder} if folder else set())
    assert in_folder == (set(os.listdir(os.path.join(work_dir, "checkpoint-4"))) - {"training_args.bin"}
                         if folder else set())
    assert stored.commits[-1]["summary"] == "Training in progress: checkpoint-4"

    hub.fail_status = 503
    try:
        with caplog.at_level("WARNING", logger="hf_finetune.hub"):
            save_event(callback, args)
            callback.on_train_end(args, state, TrainerControl())
    finally:
        hub.fail_status = None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "training continues" in warnings[0] and "503" in warnings[0]
    assert_token_absent(texts=[caplog.text], blobs=hub.stored_bytes())


@pytest.mark.parametrize("always_push", [False, True])
def test_push_on_save_does_not_block_training(always_push, work_dir, online, monkeypatch, caplog):
    """A Hub that never answers: on_save returns at once; a save made while the push runs is
    skipped (the Trainer's default) or queued (always_push); the end of training waits."""
    from transformers import TrainerControl

    import hf_finetune.hub.push as push_module

    monkeypatch.setattr(push_module, "FIRST_CONTACT_TIMEOUT_S", 1.0)
    args = checkpoint_in(work_dir)
    with socket.socket() as silent:  # accepts connections (kernel backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = "http://127.0.0.1:%d" % silent.getsockname()[1]
        callback = PushOnSaveCallback("test-user/hung", TOKEN, strategy="checkpoint", endpoint=endpoint,
                                      always_push=always_push)
        with caplog.at_level("INFO", logger="hf_finetune.hub"):
            start = time.monotonic()
            save_event(callback, args)
            state = save_event(callback, args)
            assert time.monotonic() - start < 0.5
            callback.on_train_end(args, state, TrainerControl())
    failures = [r.getMessage() for r in caplog.records if "training continues" in r.getMessage()]
    assert len(failures) == (2 if always_push else 1)
    assert all("stopped answering" in failure for failure in failures)
    assert ("previous push is still running" in caplog.text) is not always_push
    assert "waiting for the checkpoint push" in caplog.text
    assert_token_absent(texts=[caplog.text])


def test_hub_strategies_in_the_recipe():
    """Every hub_strategy the recipe accepts is one the push supports; hub_revision (which
    the push would ignore) is refused in one line."""
    from hf_finetune.config import HubCfg
    from hf_finetune.errors import RecipeError
    from hf_finetune.hub.callback import STRATEGIES

    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(HubCfg)}["strategy"]
    assert set(choices) == {"end", *STRATEGIES}
    recipe = tiny_recipe()
    recipe["training_args"].update(hub_strategy="all_checkpoints", hub_always_push=True, hub_token=TOKEN)
    cfg = config_from_dict(recipe)
    assert (cfg.hub.strategy, cfg.hub.always_push, cfg.hub.token) == ("all_checkpoints", True, TOKEN)
    assert not set(cfg.training_args) & {"hub_strategy", "hub_always_push", "hub_token", "push_to_hub"}
    recipe["training_args"]["hub_revision"] = "dev"
    with pytest.raises(RecipeError) as raised:
        config_from_dict(recipe)
    assert "\n" not in str(raised.value) and "training_args.hub_revision" in str(raised.value)


# ---------------------------------------------------------------------- from the entry point
def test_train_and_push_from_the_entry_point(hub, tmp_path):
    """`hf-finetune RECIPE --push-to-hub REPO` with hub_strategy all_checkpoints pushes each
    checkpoint during training, then the final model over it; the token goes nowhere."""
    from test_training import tiny_recipe

    work_dir = str(tmp_path / "trained")
    command = [sys.executable, "-m", "hf_finetune.run", tiny_recipe(tmp_path), "--work-dir", work_dir,
               "--push-to-hub", "test-user/trained", "--cfg-options", "train_cfg.max_epochs=1",
               "training_args.hub_strategy=all_checkpoints", f"training_args.hub_token={TOKEN}"]
    run = subprocess.run(command, env=subprocess_env(hub, tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    stored = hub.repos["test-user/trained"]
    for name in (*MODEL_FILES, "recipe.json", "all_results.json", "README.md", "native/model.safetensors"):
        assert name in stored.files, name
    assert json.loads(stored.files["all_results.json"])["test_num_samples"] == 37
    pushed_checkpoints = {path.split("/")[0] for path in stored.files if path.startswith("checkpoint-")}
    assert pushed_checkpoints == {name for name in os.listdir(work_dir) if name.startswith("checkpoint-")}
    for checkpoint in pushed_checkpoints:
        assert f"{checkpoint}/model.safetensors" in stored.files and f"{checkpoint}/optimizer.pt" in stored.files
    assert not any(path.endswith("training_args.bin") for path in stored.files)
    with open(os.path.join(work_dir, "model.safetensors"), "rb") as handle:  # the final push came last
        assert stored.files["model.safetensors"] == handle.read()
    assert [c["summary"] for c in stored.commits][-1] == "Upload model fine-tuned with hf_finetune"
    assert_token_absent(folders=[work_dir], texts=[run.stdout, run.stderr], blobs=hub.stored_bytes())

    # The Hub gone: training results stay, the error says how to push again.
    gone = dict(subprocess_env(hub, tmp_path), HF_ENDPOINT=closed_port_url())
    again = subprocess.run(command[:5] + [str(tmp_path / "again")] + command[6:], env=gone,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 1
    assert "hf-finetune push" in again.stderr and "Traceback" not in again.stderr
    assert "failed; training continues: could not push" in again.stderr  # the checkpoint push
    assert os.path.isfile(str(tmp_path / "again" / "model.safetensors"))
    assert_token_absent(folders=[str(tmp_path / "again")], texts=[again.stdout, again.stderr])
