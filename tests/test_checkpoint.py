"""Pretrained weights: every layout written the way its library writes it, fetched from a path,
an http URL (torch.hub cache + hash check) or the Hub cache, read safely, remapped and reported."""

import argparse
import collections
import functools
import hashlib
import http.server
import json
import re
import shutil
import socket
import sys
import threading
import time

import numpy as np
import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file
from transformers import ResNetForImageClassification

from hf_finetune.config import config_from_dict
from hf_finetune.errors import CheckpointError
from hf_finetune.models import FinetuneResNetConfig, build_model, load_checkpoint_file, load_pretrained
from hf_finetune.models.checkpoints import UnloadedObject

pytestmark = pytest.mark.floors  # every test here also runs at the declared floors (.ci/floors)

MEAN, STD = [125.3, 123.0, 113.9], [51.6, 50.8, 51.3]


# ----------------------------------------------------------------------------- writers
def source_model(depth=18, num_labels=1000, seed=0):
    """A transformers ResNet classifier with random weights AND random BatchNorm statistics."""
    config = FinetuneResNetConfig(depth=depth).backbone_config()
    config.num_labels = num_labels
    model = ResNetForImageClassification(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                offset = 0.9 if "running_var" in name else -0.1  # variances stay positive
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.2 + offset)
            elif name.endswith("num_batches_tracked"):
                tensor.fill_(7)
    return model


def torchvision_name(hf_key):
    """transformers ResNetForImageClassification key -> torchvision / timm / mmcls-backbone key."""
    key = hf_key.removeprefix("resnet.")
    if key.startswith("classifier.1."):
        return "fc." + key.rsplit(".", 1)[1]
    if m := re.fullmatch(r"embedder\.embedder\.(convolution|normalization)\.(\w+)", key):
        return f"{'conv1' if m[1] == 'convolution' else 'bn1'}.{m[2]}"
    block = r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.(convolution|normalization)\.(\w+)"
    if m := re.fullmatch(block, key):
        kind = "conv" if m[4] == "convolution" else "bn"
        return f"layer{int(m[1]) + 1}.{m[2]}.{kind}{int(m[3]) + 1}.{m[5]}"
    if m := re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.(convolution|normalization)\.(\w+)", key):
        return f"layer{int(m[1]) + 1}.{m[2]}.downsample.{0 if m[3] == 'convolution' else 1}.{m[4]}"
    raise AssertionError(f"unmapped {hf_key}")


def torchvision_state_dict(source, keep_num_batches_tracked=True):
    return collections.OrderedDict(
        (torchvision_name(k), v.clone()) for k, v in source.state_dict().items()
        if keep_num_batches_tracked or not k.endswith("num_batches_tracked")
    )


def mmcls_state_dict(source):
    state = collections.OrderedDict()
    for key, tensor in torchvision_state_dict(source).items():
        state["head." + key if key.startswith("fc.") else "backbone." + key] = tensor
    return state


def write_mmcls(path, source):
    """What mmcls 0.x / mmpretrain publish: {'meta': ..., 'state_dict': {backbone.*, head.fc.*}}."""
    torch.save({"meta": {"mmcls_version": "0.25.0", "CLASSES": [f"c{i}" for i in range(1000)]},
                "state_dict": mmcls_state_dict(source)}, path)
    return path


def recipe(depth=18, num_classes=10, init_cfg=None, load_from=None):
    backbone = {"type": "ResNet", "depth": depth}
    if init_cfg is not None:
        backbone["init_cfg"] = {"type": "Pretrained", **init_cfg}
    return {
        "model": {"backbone": backbone, "neck": {"type": "GlobalAveragePooling"},
                  "head": {"type": "LinearClsHead", "num_classes": num_classes}},
        "data_preprocessor": {"mean": MEAN, "std": STD},
        "load_from": load_from,
    }


def build(recipe):
    """The model a recipe describes, its init_cfg and load_from applied."""
    cfg = config_from_dict(recipe)
    return build_model(cfg.model, cfg.data_preprocessor, load_from=cfg.load_from)


def float_images(n=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def assert_backbone_equals(model, source):
    """Every tensor of the source backbone sits, unchanged, under our name."""
    ours = model.state_dict()
    theirs = source.state_dict()
    for key, tensor in theirs.items():
        if key.startswith("resnet."):
            assert torch.equal(ours["backbone." + key[len("resnet."):]], tensor), key


def assert_same_features(model, source):
    x = float_images()
    with torch.no_grad():
        ours = model.eval().backbone(x).pooler_output
        theirs = source.eval().resnet(x).pooler_output
    assert torch.equal(ours, theirs)


@pytest.fixture(scope="module")
def resnet18():
    return source_model(18)


# ----------------------------------------------------------------------------- layouts
def test_mmcls_checkpoint_with_prefix(tmp_path, resnet18, capsys):
    path = write_mmcls(tmp_path / "resnet18_8xb32_in1k_20210831-fbbb1da6.pth", resnet18)
    model = build(recipe(init_cfg={"checkpoint": str(path), "prefix": "backbone"}))
    assert_backbone_equals(model, resnet18)
    assert_same_features(model, resnet18)
    assert model.head.fc.weight.shape == (10, 512)
    report = capsys.readouterr().err
    total = sum(1 for k in model.state_dict() if k.startswith("backbone.") and "num_batches" not in k)
    assert f"loaded {total}/{total} backbone tensors from {path} (mmcls/mmpretrain, prefix 'backbone')" in report


def test_mmcls_checkpoint_without_prefix_reports_the_head(tmp_path, resnet18, capsys):
    path = write_mmcls(tmp_path / "mmcls.pth", resnet18)
    model = build(recipe(init_cfg={"checkpoint": str(path)}))
    assert_backbone_equals(model, resnet18)
    report = capsys.readouterr().err
    assert "(mmcls/mmpretrain)" in report
    assert "1000-class head is not used (expected" in report and "10-class head is new" in report
    assert not torch.equal(model.head.fc.weight[:10], resnet18.classifier[1].weight[:10])


def write_fake_mmengine(root):
    """Throwaway mmengine classes, importable only while `root` is on sys.path."""
    package = root / "mmengine" / "logging"
    package.mkdir(parents=True)
    (root / "mmengine" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "message_hub.py").write_text(
        "import pathlib\n"
        "class HistoryBuffer:\n"
        "    def __init__(self, values):\n"
        "        self._log_history = values\n"
        "class MessageHub:\n"
        "    def __init__(self, name, log_scalars):\n"
        "        self.instance_name = name\n"
        "        self.log_scalars = log_scalars\n"
        "    def __setstate__(self, state):\n"
        f"        pathlib.Path({str(root / 'EXECUTED')!r}).write_text('foreign code ran')\n"
        "        self.__dict__.update(state)\n"
    )


def test_mmpretrain_epoch_checkpoint_loads_without_running_foreign_code(tmp_path):
    """A real epoch_N.pth holds mmengine objects that weights_only=True refuses."""
    source = source_model(18, num_labels=10, seed=1)
    fake_root = tmp_path / "fake_site"
    write_fake_mmengine(fake_root)
    sys.path.insert(0, str(fake_root))
    try:
        from mmengine.logging.message_hub import HistoryBuffer, MessageHub

        hub = MessageHub("cifar10", {"train/loss": HistoryBuffer(np.array([2.3, 1.9]))})
        path = tmp_path / "epoch_3.pth"
        torch.save({
            "meta": {"mmengine_version": "0.10.4", "epoch": 3, "iter": 1173, "seed": 0,
                     "dataset_meta": {"classes": [f"c{i}" for i in range(10)]}},
            "state_dict": mmcls_state_dict(source),
            "message_hub": hub,
            "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}},
                          "param_groups": [{"lr": 0.01, "momentum": 0.9, "params": [0]}]},
            "param_schedulers": [{"milestones": collections.Counter({15: 1}), "last_epoch": 3,
                                  "base_values": [0.01], "by_epoch": True}],
            "loss_history": np.float64(1.9),
        }, path)
    finally:
        sys.path.remove(str(fake_root))
        for name in [m for m in sys.modules if m == "mmengine" or m.startswith("mmengine.")]:
            del sys.modules[name]
        shutil.rmtree(fake_root / "mmengine")

    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(path, weights_only=True)  # why the fallback exists
    checkpoint = load_checkpoint_file(str(path))
    assert isinstance(checkpoint["message_hub"], UnloadedObject)
    assert checkpoint["message_hub"].pickled_name == "mmengine.logging.message_hub.MessageHub"
    assert torch.equal(checkpoint["optimizer"]["state"][0]["momentum_buffer"], torch.ones(3))
    for key, tensor in mmcls_state_dict(source).items():
        assert torch.equal(checkpoint["state_dict"][key], tensor)
    assert "mmengine" not in sys.modules and not (fake_root / "EXECUTED").exists()

    # load_from: the whole model, head included, gives the source's logits.
    model = build(recipe(load_from=str(path))).eval()
    x = float_images()
    with torch.no_grad():
        assert torch.equal(model(x).logits, source(x).logits)


def test_torchvision_checkpoint(tmp_path, resnet18, capsys):
    # torchvision's published files predate BatchNorm's num_batches_tracked: they must still count as complete.
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(torchvision_state_dict(resnet18, keep_num_batches_tracked=False), path)
    model = build(recipe(init_cfg={"checkpoint": str(path)}))
    for key, tensor in resnet18.state_dict().items():
        if key.startswith("resnet.") and not key.endswith("num_batches_tracked"):
            assert torch.equal(model.state_dict()["backbone." + key[7:]], tensor)
    assert_same_features(model, resnet18)
    report = capsys.readouterr().err
    assert "(torchvision/timm)" in report and "missing" not in report


def test_timm_hub_directory_and_training_checkpoint(tmp_path, resnet18, capsys):
    # timm's push_to_hub: model.safetensors + config.json carrying "architecture".
    repo = tmp_path / "timm-resnet18"
    repo.mkdir()
    save_file(dict(torchvision_state_dict(resnet18)), str(repo / "model.safetensors"))
    (repo / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 1000,
                                                  "num_features": 512, "pretrained_cfg": {"tag": "a1_in1k"}}))
    model = build(recipe(init_cfg={"checkpoint": str(repo)}))
    assert_backbone_equals(model, resnet18)
    assert "(timm)" in capsys.readouterr().err

    # timm's train.py checkpoint: DataParallel-prefixed keys and an argparse.Namespace.
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 9, "arch": "resnet18", "version": 2, "metric": 71.2,
                "args": argparse.Namespace(model="resnet18", lr=0.1),
                "state_dict": {"module." + k: v for k, v in torchvision_state_dict(resnet18).items()}}, path)
    model = build(recipe(init_cfg={"checkpoint": str(path)}))
    assert_backbone_equals(model, resnet18)
    assert "(timm)" in capsys.readouterr().err


def test_transformers_checkpoints_give_identical_outputs(tmp_path, capsys):
    source = source_model(18, num_labels=10, seed=2)
    source.save_pretrained(tmp_path / "classifier")
    source.resnet.save_pretrained(tmp_path / "backbone_only")

    whole = build(recipe(load_from=str(tmp_path / "classifier"))).eval()
    x = float_images()
    with torch.no_grad():
        assert torch.equal(whole(x).logits, source(x).logits)
    assert "backbone tensors and the head from" in capsys.readouterr().err

    cases = [(tmp_path / "backbone_only", None, "transformers ResNetModel"),
             (tmp_path / "classifier", "resnet", "transformers ResNetForImageClassification")]
    for checkpoint, prefix, layout in cases:
        model = build(recipe(init_cfg={"checkpoint": str(checkpoint), "prefix": prefix}))
        assert_backbone_equals(model, source)
        assert_same_features(model, source)
        assert f"({layout}" in capsys.readouterr().err


def test_resnet50_mmcls_checkpoint(tmp_path):
    source = source_model(50, num_labels=10, seed=4)
    path = write_mmcls(tmp_path / "resnet50_8xb32_in1k_20210831-ea4938fc.pth", source)
    model = build(recipe(depth=50, load_from=str(path))).eval()
    assert_backbone_equals(model, source)
    x = float_images()
    with torch.no_grad():
        assert torch.equal(model(x).logits, source(x).logits)


def test_our_own_save_pretrained_as_load_from(tmp_path):
    trained = build(recipe())
    trained.save_pretrained(tmp_path / "run")
    model = build(recipe(load_from=str(tmp_path / "run")))
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), model.state_dict().values()))


# ----------------------------------------------------------------------------- http URL
class CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests = []

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    root = tmp_path / "www"
    root.mkdir()
    CountingHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CountingHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read from the environment at import
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_download_cache_and_hash_check(http_root, tmp_path, resnet18, monkeypatch):
    root, base = http_root
    staging = write_mmcls(tmp_path / "staging.pth", resnet18)
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()
    good = f"resnet18_8xb32_in1k_20210831-{digest[:8]}.pth"
    shutil.copy(staging, root / good)
    for _ in range(2):
        model = build(recipe(init_cfg={"checkpoint": f"{base}/{good}", "prefix": "backbone"}))
        assert_backbone_equals(model, resnet18)
    assert CountingHandler.requests == [f"/{good}"]  # second build used the torch.hub cache
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / good).is_file()

    bad = "resnet18_8xb32_in1k_20210831-deadbeef.pth"
    shutil.copy(staging, root / bad)
    with pytest.raises(CheckpointError, match="does not match the hash prefix 'deadbeef'"):
        build(recipe(init_cfg={"checkpoint": f"{base}/{bad}", "prefix": "backbone"}))
    assert not (tmp_path / "torch_home" / "hub" / "checkpoints" / bad).exists()

    with pytest.raises(CheckpointError, match="HTTP 404.*set model.backbone.init_cfg.checkpoint to the local path"):
        build(recipe(init_cfg={"checkpoint": f"{base}/missing-0123abcd.pth"}))

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    requests_before = len(CountingHandler.requests)
    with pytest.raises(CheckpointError, match=r"offline mode is on.*wget"):
        build(recipe(init_cfg={"checkpoint": f"{base}/other-0123abcd.pth"}))
    assert len(CountingHandler.requests) == requests_before


def test_unreachable_url_fails_fast(http_root):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/resnet50_8xb32_in1k_20210831-ea4938fc.pth"
    start = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(url, key="model.backbone.init_cfg.checkpoint")
    assert time.monotonic() - start < 5
    assert url in str(info.value) and "local path" in str(info.value)


# ----------------------------------------------------------------------------- Hub repo id
def cache_hub_repo(cache, repo_id, model):
    """The huggingface_hub cache layout, as a download of `repo_id` leaves it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    model.save_pretrained(snapshot)


def test_hub_repo_id_from_the_cache_offline(tmp_path, resnet18, monkeypatch):
    cache_hub_repo(tmp_path / "hub", "acme/resnet18", resnet18)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = build(recipe(init_cfg={"checkpoint": "acme/resnet18"}))
    assert_backbone_equals(model, resnet18)

    start = time.monotonic()
    with pytest.raises(CheckpointError, match="acme/unknown.*offline mode is on"):
        build(recipe(init_cfg={"checkpoint": "acme/unknown"}))
    assert time.monotonic() - start < 5


# ----------------------------------------------------------------------------- bad input
def test_missing_path_and_non_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint file not found: .*nowhere\.pth"):
        build(recipe(init_cfg={"checkpoint": str(tmp_path / "nowhere.pth")}))
    for name, content in [("notes.pth", b"not a checkpoint\n"), ("config.json", b'{"a": 1}'),
                          ("broken.safetensors", b"\x00" * 64)]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match="not a (readable safetensors file|checkpoint)"):
            load_checkpoint_file(str(tmp_path / name))
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="holds no tensors"):
        build(recipe(init_cfg={"checkpoint": str(tmp_path / "empty.pth")}))


class Malicious:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_code_in_a_checkpoint_is_never_run(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "x": Malicious(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refuses to load"):
        load_checkpoint_file(str(tmp_path / "evil.pth"))
    assert not marker.exists()


def test_prefix_matching_nothing_lists_the_prefixes(tmp_path, resnet18):
    path = tmp_path / "tv.pth"
    torch.save(torchvision_state_dict(resnet18), path)
    with pytest.raises(CheckpointError) as info:
        build(recipe(init_cfg={"checkpoint": str(path), "prefix": "backbone"}))
    message = str(info.value)
    assert "prefix 'backbone' matches no key" in message
    assert "bn1, conv1, fc, layer1, layer2, layer3, layer4" in message and "use no prefix" in message


def test_partial_load_is_an_error_unless_allowed(tmp_path, resnet18, capsys):
    path = write_mmcls(tmp_path / "r18.pth", resnet18)
    with pytest.raises(CheckpointError) as info:
        build(recipe(depth=50, init_cfg={"checkpoint": str(path), "prefix": "backbone"}))
    message = str(info.value)
    assert "allow_partial=true" in message and "looks like a ResNet-18" in message and "shape mismatch" in message

    model = build(recipe(depth=34, init_cfg={"checkpoint": str(path), "prefix": "backbone",
                                                   "allow_partial": True}))
    report = capsys.readouterr().err
    assert re.search(r"loaded \d+/\d+ backbone tensors", report) and "missing in the checkpoint" in report
    # Stage 1 blocks 0-1 exist in both depths: loaded.
    assert torch.equal(model.backbone.encoder.stages[0].layers[1].layer[0].convolution.weight,
                       resnet18.resnet.encoder.stages[0].layers[1].layer[0].convolution.weight)


def test_report_only_on_the_main_process(tmp_path, resnet18, capsys, monkeypatch):
    path = write_mmcls(tmp_path / "r18.pth", resnet18)
    monkeypatch.setenv("RANK", "1")
    report = load_pretrained(build(recipe()), str(path), prefix="backbone")
    assert report.complete and capsys.readouterr().err == ""


def test_unreachable_hub_fails_fast_and_falls_back_to_the_cache(tmp_path, resnet18, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cache_hub_repo(tmp_path / "hub", "acme/cached", resnet18)
    assert_backbone_equals(build(recipe(init_cfg={"checkpoint": "acme/cached"})), resnet18)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="acme/resnet18.*cannot be reached"):
        build(recipe(init_cfg={"checkpoint": "acme/resnet18"}))
    assert time.monotonic() - start < 5
