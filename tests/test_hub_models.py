"""Hub image classifiers (HuggingFaceClassifier / TimmClassifier) on tiny random models that
the tests save to a temp folder, offline: training, saving and reloading, the knobs, bad input."""

import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file
from conftest import free_port

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


@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory):
    """A tiny timm ViT as transformers' TimmWrapper saves it (config.json model_type timm_wrapper)."""
    pytest.importorskip("timm", reason="timm is not installed (the timm test venv has it)")
    path = tmp_path_factory.mktemp("timm")
    config = transformers.TimmWrapperConfig(
        architecture="vit_tiny_patch16_224", num_labels=10,
        model_args={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        pretrained_cfg={"input_size": [3, 32, 32], "mean": MEAN, "std": STD, "crop_pct": 1.0,
                        "interpolation": "bilinear", "num_classes": 10})
    torch.manual_seed(0)
    transformers.TimmWrapperForImageClassification(config).save_pretrained(path)
    return str(path)


# Per family: the model type and the parameter names frozen_stages=1 freezes.
FROZEN_1 = {"vit": ("HuggingFaceClassifier", ("vit.embeddings.", "vit.layers.0.")),
            "convnext": ("HuggingFaceClassifier", ("convnext.embeddings.", "convnext.encoder.stages.0.")),
            "timm_vit": ("TimmClassifier", ("timm_model.cls_token", "timm_model.pos_embed",
                                            "timm_model.patch_embed.", "timm_model.blocks.0."))}


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


@pytest.mark.parametrize("family", ["vit", "convnext", "timm_vit"])
def test_two_steps_save_reload_predict(family, request, tmp_path):
    source = request.getfixturevalue(family)
    work = str(tmp_path / "work")
    model_type, prefix = FROZEN_1[family]
    model = {"type": model_type, "model_name": source, "pretrained": True, "frozen_stages": 1,
             "loss": {"type": "CrossEntropyLoss", "label_smoothing": 0.1}}
    assert main([recipe(tmp_path, model), "--work-dir", work]) == 0

    # The model's preprocessing was taken and recorded: mean / std on the 0-255 scale.
    saved = read_json(os.path.join(work, "recipe.json"))["data_preprocessor"]
    assert saved["mean"] == pytest.approx([m * 255 for m in MEAN])
    assert saved["std"] == pytest.approx([s * 255 for s in STD])
    config = transformers.AutoConfig.from_pretrained(work)
    assert config.num_labels == 10 and config.id2label[0] == "airplane"
    assert "auto_map" not in read_json(os.path.join(work, "config.json"))  # plain transformers: no remote code

    # Frozen: the embeddings and the first block/stage kept the source's weights; the rest trained.
    before, after = load_file(os.path.join(source, "model.safetensors")), \
        load_file(os.path.join(work, "model.safetensors"))
    frozen = [k for k in after if k.startswith(prefix)]
    trained = [k for k in after if not k.startswith(prefix)]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)

    # Reloaded (plain AutoModelForImageClassification + our uint8 preparation) and as
    # `hf-finetune predict` loads the work dir: the same predictions.
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


def hub_config(model, **sections):
    body = {"model": model, "data_preprocessor": {"mean": [0, 0, 0], "std": [1, 1, 1]}}
    body.update(sections)
    return config_from_dict(body)


def build(model, **sections):
    from hf_finetune.models import build_model

    cfg = hub_config(model, **sections)
    return build_model(cfg.model, cfg.data_preprocessor, {i: str(i) for i in range(3)})


def test_frozen_parameters_get_no_gradient(vit):
    model = build({"type": "HuggingFaceClassifier", "model_name": vit, "pretrained": True, "frozen_stages": 1})
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters()
                      if n.startswith(("vit.embeddings.", "vit.layers.0."))}
    model.train()
    out = model(pixel_values=torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    out.logits.sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    assert all(p.grad is not None for n, p in model.named_parameters() if n not in frozen)
    # Frozen blocks stay in eval mode (dropout off) through the Trainer's model.train().
    assert not model.vit.layers[0].training and model.vit.layers[1].training


def test_norm_eval_keeps_batchnorm_statistics(tmp_path):
    source = save_tiny(tmp_path / "resnet", transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    model = build({"type": "HuggingFaceClassifier", "model_name": source, "pretrained": True,
                   "norm_eval": True})
    norm = model.resnet.embedder.embedder.normalization
    before = norm.running_mean.clone()
    model.train()
    model(pixel_values=torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert not norm.training and torch.equal(norm.running_mean, before)


def test_keys_that_would_do_nothing_are_refused(vit):
    """norm_eval on a model without BatchNorm, a revision of a local folder: one line each."""
    with pytest.raises(RecipeError, match=r"model.norm_eval: ViTForImageClassification has no BatchNorm layer"):
        build({"type": "HuggingFaceClassifier", "model_name": vit, "norm_eval": True})
    with pytest.raises(RecipeError, match=r"model.revision: model.model_name .* is a local folder, which has no "
                                          r"revisions"):
        build({"type": "HuggingFaceClassifier", "model_name": vit, "revision": "main"})


def _expected_layer(family, name):
    """The documented layer of a parameter (models.hub_classifier.FAMILIES; timm: its group_matcher)."""
    blocks = {"vit": "vit.layers.", "convnext": "convnext.encoder.stages.", "timm_vit": "timm_model.blocks."}[family]
    if ".embeddings." in name or name.startswith(("timm_model.cls_token", "timm_model.pos_embed",
                                                  "timm_model.patch_embed.")):
        return 0
    if name.startswith(blocks):
        return int(name[len(blocks):].split(".")[0]) + 1
    if name.startswith("timm_model.norm."):
        return 2  # timm groups the final norm with the last block
    return None  # final norm and classifier: the last layer, at the base LR


@pytest.mark.parametrize("family, layers", [("vit", 4), ("convnext", 6), ("timm_vit", 4)])
def test_layer_decay_groups(family, layers, request):
    """lr = base * rate ** (num_layers - 1 - layer): the head at the base LR."""
    from hf_finetune.models import build_model
    from hf_finetune.optim import build_optimizer

    cfg = hub_config({"type": FROZEN_1[family][0], "model_name": request.getfixturevalue(family)},
                     optim_wrapper={"optimizer": {"type": "AdamW", "lr": 1.0},
                                    "constructor": "LearningRateDecayOptimWrapperConstructor",
                                    "paramwise_cfg": {"layer_decay_rate": 0.5}})
    model = build_model(cfg.model, cfg.data_preprocessor, {i: str(i) for i in range(3)})
    groups = build_optimizer(model, cfg.optim_wrapper).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    layer_of = {names[id(p)]: g["layer_id"] for g in groups for p in g["params"]}
    assert all(g["lr"] == 0.5 ** (layers - 1 - g["layer_id"]) for g in groups)
    for name, layer in layer_of.items():
        expected = _expected_layer(family, name)
        assert layer == (layers - 1 if expected is None else expected), name
    assert sorted(set(layer_of.values())) == list(range(layers))


def test_frozen_stages_refused_where_undefined(tmp_path, vit):
    source = save_tiny(tmp_path / "effnet", transformers.EfficientNetConfig(
        image_size=32, width_coefficient=0.1, depth_coefficient=0.1))
    with pytest.raises(RecipeError, match=r"model.frozen_stages: 'efficientnet' models have no stages"):
        build({"type": "HuggingFaceClassifier", "model_name": source, "frozen_stages": 0})
    with pytest.raises(RecipeError, match=r"model.frozen_stages: 3 is more than the model has \(2 encoder layers\)"):
        build({"type": "HuggingFaceClassifier", "model_name": vit, "frozen_stages": 3})


def run_fails(tmp_path, capsys, model, flags=(), **overrides):
    """The CLI's exit code and its one error line; the work dir keeps what it held."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    (work / "keep.txt").write_text("mine")
    code = main([recipe(tmp_path, model, **overrides), "--work-dir", str(work), *flags])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert (work / "keep.txt").read_text() == "mine"
    assert code != 0 and len(err) == 1, err
    return err[0]


def test_bad_model_names(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = {"type": "HuggingFaceClassifier", "pretrained": True}
    line = run_fails(tmp_path, capsys, {**hub, "model_name": str(tmp_path / "missing" / "folder")})
    assert "model.model_name" in line and "no such folder" in line and "Hub model id" in line
    line = run_fails(tmp_path, capsys, {**hub, "model_name": "nobody/no-such-model"})
    assert "'nobody/no-such-model': not a local folder, offline mode is on" in line
    # A folder holding no image classifier (a text model).
    bert = tmp_path / "bert"
    transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                            intermediate_size=8).save_pretrained(bert)
    line = run_fails(tmp_path, capsys, {**hub, "model_name": str(bert)})
    assert "a 'bert' model, not an image classifier" in line
    # A folder with no model at all.
    (tmp_path / "empty").mkdir()
    line = run_fails(tmp_path, capsys, {**hub, "model_name": str(tmp_path / "empty")})
    assert "not a saved transformers model" in line


def test_family_without_image_processor(tmp_path, capsys, vit):
    bare = tmp_path / "bare"
    transformers.AutoModelForImageClassification.from_pretrained(vit).save_pretrained(bare)
    line = run_fails(tmp_path, capsys, {"type": "HuggingFaceClassifier", "model_name": str(bare)})
    assert "has no image processor" in line and "data_preprocessor.mean" in line


def test_remote_code_is_refused_unless_trusted(tmp_path, capsys):
    """A model whose code lives in its repo: refused in one line, its code never run."""
    repo = tmp_path / "remote"
    repo.mkdir()
    marker = tmp_path / "code_ran"
    (repo / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (repo / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                                           "AutoModelForImageClassification": "modeling_evil.Evil"}}))
    line = run_fails(tmp_path, capsys, {"type": "HuggingFaceClassifier", "model_name": str(repo)})
    assert "model.trust_remote_code=true" in line
    assert not marker.exists()


@pytest.mark.skipif(transformers.utils.is_timm_available(), reason="timm is installed here")
def test_timm_classifier_without_timm(tmp_path, capsys):
    line = run_fails(tmp_path, capsys, {"type": "TimmClassifier", "model_name": "timm/resnet18.a1_in1k"})
    assert line == 'error: model.type TimmClassifier needs timm, which is not installed: ' \
                   'pip install "hf_finetune[timm]"'


def test_input_size_checked_before_training(tmp_path, capsys, convnext, vit):
    """A ViT at another size interpolates its position embeddings; a size a model cannot
    take is refused before training, in one line."""
    model = build({"type": "HuggingFaceClassifier", "model_name": vit})
    assert model(pixel_values=torch.zeros(1, 3, 48, 48, dtype=torch.uint8)).logits.shape == (1, 3)
    small = [{"type": "Resize", "scale": 4}, {"type": "PackClsInputs"}]
    line = run_fails(tmp_path, capsys, {"type": "HuggingFaceClassifier", "model_name": convnext},
                     train_dataloader={"num_workers": 0, "dataset": {
                         "type": "SyntheticCIFAR10", "num_samples": 16, "seed": 0, "pipeline": small}})
    assert "train_dataloader.dataset.pipeline: the pipeline makes 4x4 images" in line


def test_resume_eval_only_ema_mixup_checkpointing(vit, tmp_path):
    """Downstream as for the ResNet: EMA, Mixup / CutMix and gradient checkpointing train; --resume
    from a checkpoint ends on the same weights; --eval-only gives the saved model's metrics."""
    import shutil

    model = {"type": "HuggingFaceClassifier", "model_name": vit, "pretrained": True, "with_cp": True,
             "train_cfg": {"augments": [{"type": "Mixup", "alpha": 0.8}, {"type": "CutMix", "alpha": 1.0}]}}
    path = recipe(tmp_path, model, custom_hooks=[{"type": "EMAHook", "momentum": 0.1}],
                  train_cfg={"by_epoch": False, "max_iters": 4, "val_interval": 2, "total_batch_size": 8})
    full = str(tmp_path / "full")
    assert main([path, "--work-dir", full]) == 0
    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(full, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    assert main([path, "--work-dir", resumed, "--resume"]) == 0
    expected, again = (load_file(os.path.join(d, "model.safetensors")) for d in (full, resumed))
    assert all(torch.equal(again[name], tensor) for name, tensor in expected.items())
    assert main([path, "--work-dir", resumed, "--eval-only"]) == 0
    assert read_json(os.path.join(resumed, "test_results.json"))["test_accuracy_top1"] == \
        read_json(os.path.join(full, "all_results.json"))["test_accuracy_top1"]


def test_two_process_ddp_on_cpu(convnext, tmp_path):
    """2 processes (gloo): the total batch splits across them, frozen embeddings included."""
    import subprocess
    import sys

    path = recipe(tmp_path, {"type": "HuggingFaceClassifier", "model_name": convnext, "pretrained": True,
                             "frozen_stages": 0})
    work = str(tmp_path / "ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), os.path.join(REPO, "hf_finetune", "run.py"), path,
               "--work-dir", work]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch: 8 total = 4 per device x 2 process(es)" in proc.stderr
    assert read_json(os.path.join(work, "trainer_state.json"))["global_step"] == 2
    assert read_json(os.path.join(work, "all_results.json"))["test_num_samples"] == 8


def test_the_private_trainer_methods_overridden_are_unchanged():
    """FinetuneTrainer reads checkpoints of Hub models through from_pretrained by overriding
    Trainer._load_from_checkpoint and _load_best_model (private): this fails when they change."""
    import inspect

    from transformers import Trainer

    assert list(inspect.signature(Trainer._load_from_checkpoint).parameters) == \
        ["self", "resume_from_checkpoint", "model"]
    assert list(inspect.signature(Trainer._load_best_model).parameters) == ["self"]
    source = inspect.getsource(Trainer)
    assert "self._load_from_checkpoint(resume_from_checkpoint" in source and "self._load_best_model()" in source


def test_checkpointing_refused_where_the_family_has_none(tmp_path, capsys, convnext):
    with pytest.raises(RecipeError, match="model.with_cp: ConvNextForImageClassification has no gradient "
                                          "checkpointing in transformers"):
        build({"type": "HuggingFaceClassifier", "model_name": convnext, "with_cp": True})
    line = run_fails(tmp_path, capsys, {"type": "HuggingFaceClassifier", "model_name": convnext},
                     training_args={"gradient_checkpointing": True})
    assert "training_args.gradient_checkpointing: ConvNextForImageClassification has no gradient" in line


def test_unset_preprocessing_comes_from_the_model(tmp_path, vit):
    """mean / std null and a pipeline that fixes no size take the image processor's; what the
    recipe sets stays."""
    from hf_finetune.config import load_config
    from hf_finetune.training import with_model_preprocessing

    sized = [{"type": "RandomResizedCrop", "scale": 24}, {"type": "PackClsInputs"}]
    cfg = load_config(recipe(tmp_path, {"type": "HuggingFaceClassifier", "model_name": vit},
                             train_dataloader={"num_workers": 0, "dataset": {
                                 "type": "SyntheticCIFAR10", "num_samples": 16, "pipeline": sized}},
                             data_preprocessor={"_delete_": True, "std": [2, 2, 2]}))
    resolved = with_model_preprocessing(cfg).to_dict()
    assert resolved["data_preprocessor"]["mean"] == pytest.approx([m * 255 for m in MEAN])
    assert resolved["data_preprocessor"]["std"] == [2, 2, 2]
    assert resolved["train_dataloader"]["dataset"]["pipeline"] == sized
    assert resolved["test_dataloader"]["dataset"]["pipeline"] == [{"type": "Resize", "scale": [32, 32]}] + PIPE
    assert with_model_preprocessing(with_model_preprocessing(cfg)).to_dict() == resolved


def test_multi_label_focal_loss(vit, tmp_path):
    """A sigmoid loss makes the Hub model multi-label: mmpretrain's metrics, predict's labels."""
    from hf_finetune.predict import Classifier

    def dataset(n, seed):
        return {"num_workers": 0, "dataset": {"type": "SyntheticMultiLabel", "num_samples": n, "seed": seed,
                                              "pipeline": [{"type": "Resize", "scale": 32}] + PIPE}}

    body = {"_base_": [os.path.join(REPO, "recipes", "multilabel_smoke.json")],
            "model": {"_delete_": True, "type": "HuggingFaceClassifier", "model_name": vit, "pretrained": True,
                      "loss": {"type": "FocalLoss"}},
            "data_preprocessor": {"_delete_": True},
            "train_dataloader": dataset(16, 0), "val_dataloader": dataset(8, 1), "test_dataloader": dataset(8, 1),
            "param_scheduler": [],
            "train_cfg": {"by_epoch": False, "max_iters": 2, "val_interval": 2, "total_batch_size": 8}}
    path = tmp_path / "multilabel.json"
    path.write_text(json.dumps(body))
    work = str(tmp_path / "work")
    assert main([str(path), "--work-dir", work]) == 0
    assert "test_multilabel/mAP" in read_json(os.path.join(work, "all_results.json"))
    classifier = Classifier.load(work)
    assert classifier.multi_label and len(classifier.labels) == 5


def test_load_from_is_refused_for_hub_models(vit):
    with pytest.raises(RecipeError, match="load_from: not used with HuggingFaceClassifier: its weights come from "
                                          "model.model_name"):
        hub_config({"type": "HuggingFaceClassifier", "model_name": vit}, load_from="weights.safetensors")
    with pytest.raises(RecipeError, match="unknown key for HuggingFaceClassifier 'backbone'"):
        hub_config({"type": "HuggingFaceClassifier", "model_name": vit, "backbone": {}})


def test_resume_with_another_model_is_one_line(vit, tmp_path, capsys):
    import shutil

    work = str(tmp_path / "work")
    assert main([recipe(tmp_path, {"type": "HuggingFaceClassifier", "model_name": vit}), "--work-dir", work]) == 0
    wider = save_tiny(tmp_path / "wider", transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64))
    other = tmp_path / "other"
    shutil.copytree(os.path.join(work, "checkpoint-2"), other / "work" / "checkpoint-2")
    capsys.readouterr()
    line = run_fails(other, capsys, {"type": "HuggingFaceClassifier", "model_name": wider}, flags=["--resume"])
    assert "checkpoint-2: its weights do not load into this model" in line


def test_channels_last_only_for_convolutional_models(vit, convnext):
    from hf_finetune.training import convolutional

    assert convolutional(build({"type": "HuggingFaceClassifier", "model_name": convnext}))
    assert not convolutional(build({"type": "HuggingFaceClassifier", "model_name": vit}))


def test_unreachable_hub_fails_fast(tmp_path, monkeypatch):
    import socket
    import time

    from huggingface_hub import constants

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(RecipeError, match=r"model.model_name 'acme/vit': not a local folder, the Hub "
                                          r"\(http://127.0.0.1:\d+\) cannot be reached, and the Hub cache"):
        build({"type": "HuggingFaceClassifier", "model_name": "acme/vit", "pretrained": True})
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("family", ["vit", "deit"])
def test_fitting_position_embeddings_to_another_size_keeps_the_outputs(tmp_path, family):
    """fit_position_embeddings resizes once what the family would interpolate on every forward:
    at the new size, the fitted model without interpolation gives the original's interpolated
    outputs, a frozen embedding stays frozen, and the saved model reloads at that size."""
    from hf_finetune.models.hub_classifier import fit_position_embeddings

    config, model_class = {"vit": (transformers.ViTConfig, transformers.ViTForImageClassification),
                           "deit": (transformers.DeiTConfig, transformers.DeiTForImageClassification)}[family]
    torch.manual_seed(0)
    model = model_class(config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64, num_labels=3)).eval()
    model.get_submodule(f"{family}.embeddings").position_embeddings.requires_grad_(False)
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = model(pixel_values=pixels, interpolate_pos_encoding=True).logits
    assert fit_position_embeddings(model, 48) and not fit_position_embeddings(model, 48)
    assert not fit_position_embeddings(model, 44)  # not a multiple of the patch size: left as it is
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).logits, expected)
    assert not model.get_submodule(f"{family}.embeddings").position_embeddings.requires_grad
    model.save_pretrained(tmp_path / "fitted")
    reloaded = model_class.from_pretrained(tmp_path / "fitted").eval()
    assert reloaded.config.image_size == 48
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixels).logits, expected)


def test_resume_of_a_vit_fitted_to_the_test_size(vit, tmp_path):
    """Trained at 32 px, tested at 48: the model's own size becomes 48 before training, and
    --resume from a checkpoint of it ends on the same weights as the run never stopped."""
    import shutil

    resize = [{"type": "Resize", "scale": 48}, {"type": "PackClsInputs"}]
    evaluation = {"num_workers": 0,
                  "dataset": {"type": "SyntheticCIFAR10", "num_samples": 8, "seed": 1, "pipeline": resize}}
    path = recipe(tmp_path, {"type": "HuggingFaceClassifier", "model_name": vit, "pretrained": True},
                  val_dataloader=evaluation, test_dataloader=evaluation,
                  train_cfg={"by_epoch": False, "max_iters": 4, "val_interval": 2, "total_batch_size": 8})
    full = str(tmp_path / "full")
    assert main([path, "--work-dir", full]) == 0
    assert read_json(os.path.join(full, "config.json"))["image_size"] == 48
    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(full, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    assert main([path, "--work-dir", resumed, "--resume"]) == 0
    expected, again = (load_file(os.path.join(d, "model.safetensors")) for d in (full, resumed))
    assert expected["vit.embeddings.position_embeddings"].shape[1] == 37  # 6 x 6 patches + the class token
    assert all(torch.equal(again[name], tensor) for name, tensor in expected.items())
