"""The classifier: structure, init, input contract, loss, freezing, save/load, Auto classes, remote code."""

import json
import math
import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch
from torch import nn

from hf_finetune.config import config_from_dict
from hf_finetune.errors import RecipeError
from hf_finetune.models import (
    FinetuneResNetConfig,
    FinetuneResNetForImageClassification,
    build_config,
    build_model,
    to_transformers_state_dict,
)

MEAN = [125.307, 122.961, 113.8575]
STD = [51.5865, 50.847, 51.255]


def recipe(depth=18, num_classes=10, backbone=None, head=None, preprocessor=None, **extra):
    return {
        "model": {
            "type": "ImageClassifier",
            "backbone": {"type": "ResNet", "depth": depth, **(backbone or {})},
            "neck": {"type": "GlobalAveragePooling"},
            "head": {"type": "LinearClsHead", "num_classes": num_classes, **(head or {})},
        },
        "data_preprocessor": {"num_classes": num_classes, "mean": MEAN, "std": STD, **(preprocessor or {})},
        **extra,
    }


def model_from(recipe, id2label=None):
    cfg = config_from_dict(recipe)
    return build_model(cfg.model, cfg.data_preprocessor, id2label)


def config_from(recipe, id2label=None):
    cfg = config_from_dict(recipe)
    return build_config(cfg.model, cfg.data_preprocessor, id2label)


def images(n=4, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def batchnorms(module):
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def residual_blocks(model):
    return [layer for stage in model.backbone.encoder.stages for layer in stage.layers]


# ----------------------------------------------------------------------------- structure and init
def test_structure_and_mmcls_init():
    torch.manual_seed(0)
    model = model_from(recipe(depth=18))
    assert model.config.model_type == "finetune_resnet"
    assert type(model.backbone).__name__ == "ResNetModel"
    assert isinstance(model.head.fc, nn.Linear) and model.head.fc.weight.shape == (10, 512)
    keys = list(model.state_dict())
    assert all(k.startswith(("backbone.embedder.", "backbone.encoder.", "head.fc.")) for k in keys), keys
    # Head: Normal(0, 0.01), zero bias.
    assert abs(model.head.fc.weight.std().item() - 0.01) < 0.002
    assert torch.all(model.head.fc.bias == 0)
    # Convs: Kaiming normal, fan_out, relu gain.
    conv = model.backbone.encoder.stages[3].layers[1].layer[0].convolution.weight
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert abs(conv.std().item() / math.sqrt(2.0 / fan_out) - 1) < 0.05
    # BatchNorm 1/0, except the last BN of every residual block (zero_init_residual).
    for block in residual_blocks(model):
        assert torch.all(block.layer[-1].normalization.weight == 0)
        assert torch.all(block.layer[0].normalization.weight == 1)
    assert all(torch.all(bn.bias == 0) for bn in batchnorms(model))

    no_zero = model_from(recipe(depth=18, backbone={"zero_init_residual": False}))
    assert all(torch.all(b.layer[-1].normalization.weight == 1) for b in residual_blocks(no_zero))


@pytest.mark.parametrize("depth, blocks, layer_type", [(18, [2, 2, 2, 2], "basic"), (34, [3, 4, 6, 3], "basic"),
                                                       (101, [3, 4, 23, 3], "bottleneck"),
                                                       (152, [3, 8, 36, 3], "bottleneck")])
def test_depth_architectures(depth, blocks, layer_type):
    config = config_from(recipe(depth=depth)).backbone_config()
    assert (config.depths, config.layer_type) == (blocks, layer_type)


def test_resnet50_styles():
    """pytorch style strides the 3x3 conv, caffe style the first 1x1 conv (mmcls)."""
    pytorch = model_from(recipe(depth=50))
    first = pytorch.backbone.encoder.stages[1].layers[0].layer
    assert (first[0].convolution.stride, first[1].convolution.stride) == ((1, 1), (2, 2))
    assert pytorch.head.fc.in_features == 2048
    caffe_config = config_from(recipe(depth=50, backbone={"style": "caffe"}))
    caffe = FinetuneResNetForImageClassification(caffe_config)
    first = caffe.backbone.encoder.stages[1].layers[0].layer
    assert (first[0].convolution.stride, first[1].convolution.stride) == ((2, 2), (1, 1))
    out = pytorch.eval()(images(2))
    assert out.logits.shape == (2, 10)


# ----------------------------------------------------------------------------- input contract
def test_uint8_is_normalised_inside_and_float_passes_through():
    model = model_from(recipe(depth=18, preprocessor={"to_rgb": True})).eval()
    x = images()
    expected = (x.flip(1).float() - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model.normalize(x), expected)
        # Float input (an image processor's, normalised in RGB order) gets only the flip.
        normalised_rgb = expected.flip(1)
        assert torch.allclose(model.normalize(normalised_rgb), expected)
        assert torch.allclose(model(x).logits, model(normalised_rgb).logits, atol=1e-5)
    # mean/std live in the config, not in the weights.
    assert not any("pixel" in k for k in model.state_dict())


@pytest.mark.floors
def test_channels_last_and_bf16_autocast():
    model = model_from(recipe(depth=18)).eval()
    x = images()
    with torch.no_grad():
        reference = model(x).logits
        model_cl = model.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        assert model_cl.normalize(x_cl).is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(model_cl(x_cl).logits, reference, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model_cl(x_cl, labels=torch.tensor([0, 1, 2, 3]))
    assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    assert torch.allclose(out.logits.float(), reference, atol=0.1, rtol=0.1)


def test_bf16_weights_accept_uint8():
    model = model_from(recipe(depth=18)).eval().to(torch.bfloat16)
    with torch.no_grad():
        assert model(images(2)).logits.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- loss
@pytest.mark.parametrize("loss, smoothing, weight", [
    ({"type": "CrossEntropyLoss"}, 0.0, 1.0),
    ({"type": "CrossEntropyLoss", "label_smoothing": 0.1, "loss_weight": 2.0}, 0.1, 2.0),
    ({"type": "LabelSmoothLoss", "label_smooth_val": 0.2, "loss_weight": 0.5}, 0.2, 0.5),
])
def test_loss(loss, smoothing, weight):
    model = model_from(recipe(depth=18, head={"loss": loss})).eval()
    labels = torch.tensor([0, 3, 9, 1])
    with torch.no_grad():
        out = model(images(), labels=labels)
    # mmcls LabelSmoothLoss(mode='original'): (1 - e) * one_hot + e / C, i.e. torch's label smoothing.
    one_hot = nn.functional.one_hot(labels, 10).float()
    target = (1 - smoothing) * one_hot + smoothing / 10
    manual = -(target * out.logits.log_softmax(-1)).sum(-1).mean() * weight
    assert torch.allclose(out.loss, manual, atol=1e-5)
    assert type(out).__name__ == "ImageClassifierOutput"
    loss_t, logits_t = model(images(), labels=labels, return_dict=False)
    assert torch.allclose(logits_t, out.logits)


# ----------------------------------------------------------------------------- freezing
def _train_step(model, seed=1):
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    optimizer.zero_grad()
    model(images(8, seed), labels=torch.arange(8) % 10).loss.backward()
    optimizer.step()


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_frozen_stages_grads_and_bn_statistics():
    model = model_from(recipe(depth=18, backbone={"frozen_stages": 2}))
    frozen = [model.backbone.embedder, model.backbone.encoder.stages[0], model.backbone.encoder.stages[1]]
    trainable = [model.backbone.encoder.stages[2], model.backbone.encoder.stages[3], model.head]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in trainable for p in m.parameters())
    before = [_snapshot(m) for m in frozen + trainable]
    _train_step(model)
    # Every .train() call keeps the frozen BatchNorms in eval mode, the others train.
    assert all(not bn.training for m in frozen for bn in batchnorms(m))
    assert all(bn.training for m in trainable[:2] for bn in batchnorms(m))
    for module, snapshot in zip(frozen, before[:3]):
        assert all(p.grad is None for p in module.parameters())
        assert all(torch.equal(v, snapshot[k]) for k, v in module.state_dict().items())
    for module, snapshot in zip(trainable[:2], before[3:5]):
        assert all(p.grad is not None for p in module.parameters())
        assert sum(p.grad.abs().sum() for p in module.parameters()) > 0
        bn = batchnorms(module)[0]
        name = next(k for k, v in module.named_modules() if v is bn)
        assert not torch.equal(bn.running_mean, snapshot[f"{name}.running_mean"])
        assert int(bn.num_batches_tracked) == 1


def test_frozen_stage_zero_is_stem_only():
    model = model_from(recipe(depth=18, backbone={"frozen_stages": 0}))
    assert all(not p.requires_grad for p in model.backbone.embedder.parameters())
    assert all(p.requires_grad for p in model.backbone.encoder.parameters())
    model.train()
    assert not model.backbone.embedder.embedder.normalization.training
    assert model.backbone.encoder.stages[0].layers[0].layer[0].normalization.training


def test_norm_eval_keeps_every_bn_still_but_trains_weights():
    model = model_from(recipe(depth=18, backbone={"norm_eval": True}))
    before = _snapshot(model)
    _train_step(model)
    assert all(not bn.training for bn in batchnorms(model))
    for bn_name, bn in model.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            assert torch.equal(bn.running_var, before[f"{bn_name}.running_var"])
    assert all(p.grad is not None for p in model.parameters())


# ----------------------------------------------------------------------------- save / load
@pytest.mark.floors
def test_save_pretrained_round_trip_and_auto_classes(tmp_path):
    import hf_finetune  # noqa: F401 - the registration happens on import
    from transformers import AutoConfig, AutoModelForImageClassification

    labels = {i: f"class{i}" for i in range(10)}
    model = model_from(recipe(depth=18, backbone={"frozen_stages": 1}, preprocessor={"to_rgb": True}), labels)
    _train_step(model)  # non-trivial BN statistics
    model.eval()
    model.save_pretrained(tmp_path)
    assert {"model.safetensors", "config.json", "configuration_finetune_resnet.py",
            "modeling_finetune_resnet.py"} <= set(os.listdir(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_finetune_resnet.FinetuneResNetConfig",
        "AutoModelForImageClassification": "modeling_finetune_resnet.FinetuneResNetForImageClassification",
    }
    assert config["model_cfg"]["backbone"]["frozen_stages"] == 1 and config["to_rgb"] is True

    x = images()
    with torch.no_grad():
        expected = model(x).logits
    loaded = FinetuneResNetForImageClassification.from_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), FinetuneResNetConfig)
    auto = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(auto) is FinetuneResNetForImageClassification
    for other in (loaded, auto):
        assert other.config.id2label == labels and other.config.mean == MEAN
        with torch.no_grad():
            assert torch.equal(other.eval()(x).logits, expected)
        # Freezing survives loading (parameters are re-created by from_pretrained).
        assert not any(p.requires_grad for p in other.backbone.encoder.stages[0].parameters())
        assert all(p.requires_grad for p in other.backbone.encoder.stages[1].parameters())
    # Saved weights are not re-initialised (zero_init_residual / head init would change them).
    sd, sd_loaded = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(sd[k], sd_loaded[k]) for k in sd)


@pytest.mark.floors
def test_remote_code_loads_without_the_package(tmp_path):
    model = model_from(recipe(depth=18, preprocessor={"to_rgb": True})).eval()
    save_dir = tmp_path / "saved"
    model.save_pretrained(save_dir)
    x = images(2)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x).logits, tmp_path / "expected.pt")
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent("""
        import importlib.util, sys, torch
        assert importlib.util.find_spec("hf_finetune") is None, "hf_finetune must not be importable here"
        from transformers import AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        with torch.no_grad():
            logits = model(torch.load(sys.argv[2])).logits
        assert torch.equal(logits, torch.load(sys.argv[3])), (logits, torch.load(sys.argv[3]))
        assert "hf_finetune" not in sys.modules
        print("remote code OK")
    """))
    # -S skips site-packages' .pth files, which is where the editable install of hf_finetune hooks in;
    # PYTHONPATH then gives back the installed libraries only. cwd is outside the repository.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    library_dirs = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env.update(PYTHONPATH=os.pathsep.join(library_dirs), HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-S", str(child), str(save_dir), str(tmp_path / "x.pt"), str(tmp_path / "expected.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote code OK" in result.stdout


@pytest.mark.floors
def test_native_transformers_export_keys():
    from transformers import ResNetForImageClassification

    model = model_from(recipe(depth=18, backbone={"zero_init_residual": False})).eval()
    config = model.config.backbone_config()
    config.num_labels = 10
    native = ResNetForImageClassification(config).eval()
    native.load_state_dict(to_transformers_state_dict(model.state_dict()), strict=True)
    x = model.normalize(images())
    with torch.no_grad():
        assert torch.equal(native(x).logits, model(x).logits)


# ----------------------------------------------------------------------------- bad recipes
@pytest.mark.parametrize("changes, expected", [
    ({"backbone": {"depth": 51}}, "model.backbone.depth"),
    ({"backbone": {"frozen_stages": 5}}, "model.backbone.frozen_stages"),
    ({"backbone": {"frozen_stages": -2}}, "out of range"),
    ({"backbone": {"deep_stem": True}}, "model.backbone.deep_stem: a boolean true is not allowed"),
    ({"backbone": {"avg_down": True}}, "model.backbone.avg_down: a boolean true is not allowed"),
    ({"backbone": {"num_stages": 3}}, "model.backbone.num_stages"),
    ({"backbone": {"out_indices": [2, 3]}}, "model.backbone.out_indices"),
    ({"backbone": {"in_channels": 4}}, "model.backbone.in_channels"),
    ({"backbone": {"stem_channels": 32}}, "model.backbone.stem_channels"),
    ({"backbone": {"base_channels": 32}}, "model.backbone.base_channels"),
    ({"backbone": {"with_cp": "yes"}}, "model.backbone.with_cp: expected true/false"),
    ({"backbone": {"style": "cafe"}}, "did you mean 'caffe'"),
    ({"backbone": {"init_cfg": {"type": "Kaiming"}}}, "model.backbone.init_cfg.type"),
    ({"num_classes": 3, "head": {"topk": [1, 5]}}, "model.head.topk"),
    ({"head": {"in_channels": 2048}}, "model.head.in_channels"),
    ({"head": {"loss": {"type": "FocalLos"}}}, "did you mean 'FocalLoss'"),
    ({"head": {"loss": {"type": "CrossEntropyLoss", "label_smoothing": 1.5}}}, "label_smoothing"),
    ({"head": {"type": "StackedLinearClsHead"}}, "model.head.type"),
    ({"preprocessor": {"num_classes": 100}}, "data_preprocessor.num_classes"),
    ({"preprocessor": {"std": [1.0, 0.0, 1.0]}}, "data_preprocessor.std"),
])
def test_bad_recipe_values(changes, expected):
    num_classes = changes.get("num_classes", 10)
    bad = recipe(depth=18, num_classes=num_classes, backbone=changes.get("backbone"),
                 head=changes.get("head"), preprocessor={"num_classes": num_classes, **changes.get("preprocessor", {})})
    with pytest.raises(RecipeError) as info:
        model_from(bad)
    assert expected in str(info.value)


def test_topk_message_and_small_label_sets():
    with pytest.raises(RecipeError, match=r"model.head.topk.*num_classes is 3.*\[1\]"):
        config_from(recipe(num_classes=3, head={"topk": [1, 5]}))
    assert config_from(recipe(num_classes=3, head={"topk": [1]})).num_labels == 3


def test_id2label_must_match_num_classes():
    with pytest.raises(RecipeError, match="num_classes is 10 but the dataset has 3"):
        config_from(recipe(), {0: "a", 1: "b", 2: "c"})
    assert config_from(recipe(num_classes=3, head={"topk": [1]}),
                       {0: "a", 1: "b", 2: "c"}).id2label[2] == "c"
