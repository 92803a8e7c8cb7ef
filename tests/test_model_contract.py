"""The transformers classifier contract, checked against ResNetForImageClassification with the same weights:
hidden states, problem types and their losses, transformers ResNet configs and folders, gradient checkpointing."""

import copy
import json
import math

import pytest
import torch
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification

from hf_finetune.models import FinetuneResNetConfig, FinetuneResNetForImageClassification, to_transformers_state_dict
from hf_finetune.models.modeling_finetune_resnet import asymmetric_loss, classification_loss, sigmoid_focal_loss

pytestmark = pytest.mark.floors  # every test here also runs at the declared floors (.ci/floors)


def images(n=4, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def pair(num_labels=5, **config):
    """Ours and a ResNetForImageClassification carrying the same weights (ResNet-18, in eval mode)."""
    torch.manual_seed(0)
    ours = FinetuneResNetForImageClassification(
        FinetuneResNetConfig(depth=18, num_labels=num_labels, zero_init_residual=False, **config)).eval()
    native_config = ours.config.backbone_config()
    native_config.num_labels = num_labels
    native_config.output_hidden_states = ours.config.output_hidden_states
    native_config.problem_type = ours.config.problem_type
    native = ResNetForImageClassification(native_config).eval()
    native.load_state_dict(to_transformers_state_dict(ours.state_dict()), strict=True)
    return ours, native


# ----------------------------------------------------------------------------- hidden states
@pytest.mark.parametrize("from_config", [True, False])
def test_hidden_states_match_transformers(from_config):
    ours, native = pair(output_hidden_states=from_config)
    x = images()
    kwargs = {} if from_config else {"output_hidden_states": True}
    with torch.no_grad():
        expected = native(ours.normalize(x), **kwargs).hidden_states
        got = ours(x, **kwargs).hidden_states
    assert len(got) == len(expected) == 5  # stem + four stages
    for mine, theirs in zip(got, expected):
        assert mine.shape == theirs.shape
        assert torch.allclose(mine, theirs, atol=1e-5)


def test_hidden_states_argument_overrides_config_and_tuple_layout():
    ours, native = pair(output_hidden_states=True)
    x, labels = images(), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        assert ours(x, output_hidden_states=False).hidden_states is None
        mine = ours(x, labels=labels, return_dict=False)
        theirs = native(ours.normalize(x), labels=labels, return_dict=False)
    assert len(mine) == len(theirs) == 3  # loss, logits, hidden states
    assert torch.allclose(mine[0], theirs[0], atol=1e-5) and torch.allclose(mine[1], theirs[1], atol=1e-5)
    assert len(mine[2]) == len(theirs[2]) == 5


# ----------------------------------------------------------------------------- problem types
def labels_for(kind, n=4, num_labels=5):
    generator = torch.Generator().manual_seed(1)
    if kind == "single_label_classification":
        return torch.randint(0, num_labels, (n,), generator=generator)
    if kind == "multi_label_classification":
        return (torch.rand(n, num_labels, generator=generator) > 0.5).float()
    return torch.randn(n, num_labels, generator=generator).squeeze(-1)


@pytest.mark.parametrize("kind, num_labels, explicit", [
    ("single_label_classification", 5, False),
    ("multi_label_classification", 5, False),
    ("regression", 1, False),
    ("regression", 3, True),
    ("multi_label_classification", 5, True),
])
def test_loss_and_inferred_problem_type_match_transformers(kind, num_labels, explicit):
    ours, native = pair(num_labels=num_labels, problem_type=kind if explicit else None)
    x, labels = images(), labels_for(kind, num_labels=num_labels)
    with torch.no_grad():
        mine = ours(x, labels=labels).loss
        theirs = native(ours.normalize(x), labels=labels).loss
    assert ours.config.problem_type == native.config.problem_type == kind
    assert torch.allclose(mine, theirs, atol=1e-6)


def config(**kwargs):
    return FinetuneResNetConfig(depth=18, num_labels=kwargs.pop("num_labels", 3), **kwargs)


def test_mmpretrain_sigmoid_cross_entropy_sums_classes_and_averages_samples():
    logits, targets = torch.randn(4, 3), (torch.rand(4, 3) > 0.5).float()
    bce_mean = nn.functional.binary_cross_entropy_with_logits(logits, targets)
    loss = classification_loss(logits, targets, config(use_sigmoid=True, loss_weight=2.0))
    assert torch.allclose(loss, 2.0 * bce_mean * 3)  # mean over N*C elements -> sum over C / N
    assert torch.allclose(classification_loss(logits, targets, config()), bce_mean)  # transformers' BCE


def test_focal_loss_hand_computed():
    # logit 0 -> p = 0.5 for a positive: pt = 0.5, weight = alpha * 0.5**gamma, BCE = ln 2.
    logits, targets = torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])
    per_element = sigmoid_focal_loss(logits, targets, gamma=2.0, alpha=0.25)
    assert torch.allclose(per_element, torch.tensor([[0.25 * 0.25 * math.log(2), 0.75 * 0.25 * math.log(2)]]))
    loss = classification_loss(logits, targets, config(num_labels=2, loss_type="FocalLoss", loss_weight=3.0))
    assert torch.allclose(loss, 3.0 * per_element.sum())


def test_asymmetric_loss_hand_computed():
    logits = torch.tensor([[2.0, -3.0, 0.5]])
    targets = torch.tensor([[1.0, 0.0, 0.0]])
    p = torch.sigmoid(logits)[0]
    loss = classification_loss(logits, targets, config(loss_type="AsymmetricLoss", asymmetric_gamma_pos=1.0,
                                                       asymmetric_gamma_neg=2.0, asymmetric_clip=0.1))
    positive = -(1 - p[0]) * torch.log(p[0])
    # sigmoid(-3) = 0.047 is under the clip: the easy negative costs nothing.
    easy_negative = torch.tensor(0.0)
    pn = 1 - p[2] + 0.1
    hard_negative = -((1 - pn) ** 2) * torch.log(pn)
    assert torch.allclose(loss, positive + easy_negative + hard_negative, atol=1e-6)
    # No focusing and no clip: plain binary cross entropy, summed over classes.
    plain = asymmetric_loss(logits, targets, gamma_pos=0.0, gamma_neg=0.0, clip=0.0)
    assert torch.allclose(plain, nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none"))


def test_sigmoid_losses_take_single_label_indices_as_one_hot():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    one_hot = nn.functional.one_hot(labels, 3).float()
    for loss_type in ("FocalLoss", "AsymmetricLoss"):
        single = classification_loss(logits, labels, config(loss_type=loss_type))
        multi = classification_loss(logits, one_hot, config(loss_type=loss_type))
        assert torch.allclose(single, multi)


def test_label_smoothing_still_applies_to_single_label():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    smoothed = classification_loss(logits, labels, config(loss_type="LabelSmoothLoss", label_smoothing=0.2))
    target = 0.8 * nn.functional.one_hot(labels, 3).float() + 0.2 / 3
    assert torch.allclose(smoothed, -(target * logits.log_softmax(-1)).sum(-1).mean())


def test_single_label_takes_soft_targets_when_told():
    # Mixup / CutMix hand float [N, C] scores: an explicit single-label problem type keeps softmax cross entropy.
    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    one_hot = nn.functional.one_hot(labels, 3).float()
    smoothing = config(problem_type="single_label_classification", label_smoothing=0.1)
    from_indices = classification_loss(logits, labels, smoothing)
    assert torch.allclose(classification_loss(logits, one_hot, smoothing), from_indices)
    mixed = 0.7 * one_hot + 0.3 * one_hot.roll(1, 0)
    expected = -((0.9 * mixed + 0.1 / 3) * logits.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(classification_loss(logits, mixed, smoothing), expected)


@pytest.mark.parametrize("kwargs, labels, message", [
    ({"label_smoothing": 0.1}, torch.ones(2, 3), "single-label classification only"),
    ({"loss_type": "FocalLoss", "num_labels": 1}, torch.randn(2), "problem_type='regression'"),
])
def test_loss_combinations_that_do_not_apply(kwargs, labels, message):
    with pytest.raises(ValueError, match=message):
        classification_loss(torch.randn(2, kwargs.get("num_labels", 3)), labels, config(**kwargs))


def test_multi_label_model_trains_on_multi_hot_labels():
    ours, _ = pair(num_labels=5, loss_type="AsymmetricLoss")
    ours.train()
    loss = ours(images(), labels=labels_for("multi_label_classification")).loss
    loss.backward()
    assert torch.isfinite(loss) and ours.head.fc.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- transformers ResNet configs
def test_transformers_resnet_keys_map_to_depth_and_style():
    assert FinetuneResNetConfig(hidden_sizes=[256, 512, 1024, 2048]).depth == 50  # ResNetConfig's defaults
    resnet18 = ResNetConfig(depths=[2, 2, 2, 2], layer_type="basic", hidden_sizes=[64, 128, 256, 512]).to_dict()
    config18 = FinetuneResNetConfig(**resnet18)
    assert (config18.depth, config18.style, config18.hidden_sizes) == (18, "pytorch", [64, 128, 256, 512])
    caffe = FinetuneResNetConfig(depths=[3, 4, 23, 3], downsample_in_bottleneck=True)
    assert (caffe.depth, caffe.style) == (101, "caffe")


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden_sizes": [32, 64, 128, 256]}, r"^hidden_sizes=\[32, 64, 128, 256\] cannot be built"),
    ({"embedding_size": 32}, "^embedding_size=32 cannot be built"),
    ({"depths": [2, 2, 2, 2]}, r"^depths=\[2, 2, 2, 2\] with layer_type='bottleneck' is not a ResNet depth"),
    ({"depth": 50, "depths": [2, 2, 2, 2], "layer_type": "basic", "hidden_sizes": [64, 128, 256, 512]},
     "^depth=50 contradicts"),
    ({"depth": 18, "problem_type": "multilabel"}, "^problem_type='multilabel' is not supported"),
])
def test_config_values_we_cannot_build(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        FinetuneResNetConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_transformers_resnet_folder_loads_with_its_depth_and_weights(tmp_path):
    torch.manual_seed(0)
    native_config = ResNetConfig(depths=[2, 2, 2, 2], layer_type="basic", hidden_sizes=[64, 128, 256, 512],
                                 num_labels=3, output_hidden_states=True)
    native = ResNetForImageClassification(native_config).eval()
    native.save_pretrained(tmp_path / "native")
    ours = FinetuneResNetForImageClassification.from_pretrained(tmp_path / "native").eval()
    assert ours.config.depth == 18 and ours.config.num_labels == 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        mine, theirs = ours(x), native(x)
    assert torch.equal(mine.logits, theirs.logits)
    assert all(torch.equal(a, b) for a, b in zip(mine.hidden_states, theirs.hidden_states))


def test_transformers_resnet_folder_with_unbuildable_widths_is_one_clear_error(tmp_path):
    ResNetConfig(depths=[2, 2, 2, 2], layer_type="basic", hidden_sizes=[32, 64, 128, 256]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hidden_sizes=.*load_from / init_cfg"):
        FinetuneResNetForImageClassification.from_pretrained(tmp_path)


def test_new_fields_survive_save_and_load(tmp_path):
    ours, _ = pair(num_labels=5, with_cp=True, loss_type="FocalLoss", focal_gamma=1.5,
                   problem_type="multi_label_classification")
    ours.save_pretrained(tmp_path)
    loaded = FinetuneResNetForImageClassification.from_pretrained(tmp_path)
    for key in ("with_cp", "loss_type", "focal_gamma", "problem_type", "depth"):
        assert getattr(loaded.config, key) == getattr(ours.config, key), key
    assert all(block.gradient_checkpointing for block in blocks(loaded))


def test_config_builds_from_its_defaults_as_resnet50(tmp_path):
    config = FinetuneResNetConfig()
    assert (config.depth, config.style, config.hidden_sizes[-1]) == (50, "pytorch", 2048)
    config.save_pretrained(tmp_path)
    loaded = FinetuneResNetConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert json.loads((tmp_path / "config.json").read_text())["depth"] == 50  # written, not left to the default


# ----------------------------------------------------------------------------- gradient checkpointing
def train_step(model, x, labels):
    model.train()
    model.zero_grad()
    loss = model(x, labels=labels).loss
    loss.backward()
    return {"loss": loss.detach(), **{name: p.grad for name, p in model.named_parameters()}}


def blocks(model):
    return [block for stage in model.backbone.encoder.stages for block in stage.layers]


def count_block_calls(model):
    """Stage index of each residual block run, recomputations included (GradientCheckpointingLayer
    recomputes `forward`, outside the block's own hooks, so the hook sits on its inner Sequential)."""
    calls = []
    for index, stage in enumerate(model.backbone.encoder.stages):
        for block in stage.layers:
            block.layer.register_forward_pre_hook(lambda *args, index=index: calls.append(index))
    return calls


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("depth", [18, 50])
def test_blocks_are_gradient_checkpointing_layers_with_resnet_model_keys(depth):
    from transformers import ResNetModel
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = FinetuneResNetForImageClassification(FinetuneResNetConfig(depth=depth, num_labels=3))
    assert len(blocks(model)) == sum(FinetuneResNetConfig(depth=depth).backbone_config().depths)
    assert all(isinstance(block, GradientCheckpointingLayer) for block in blocks(model))
    assert not any(block.gradient_checkpointing for block in blocks(model))
    model.gradient_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in blocks(model))
    model.gradient_checkpointing_disable()
    assert not any(block.gradient_checkpointing for block in blocks(model))
    # Saved models, mmcls conversion and the transformers export rely on ResNetModel's key names.
    native_keys = [f"backbone.{key}" for key in ResNetModel(model.config.backbone_config()).state_dict()]
    assert list(model.state_dict()) == native_keys + ["head.fc.weight", "head.fc.bias"]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("enable", ["with_cp", "gradient_checkpointing_enable"])
def test_gradient_checkpointing_gives_the_same_gradients(enable):
    plain, _ = pair(num_labels=5, frozen_stages=1)
    if enable == "with_cp":
        checkpointed, _ = pair(num_labels=5, frozen_stages=1, with_cp=True)
        checkpointed.load_state_dict(plain.state_dict())
    else:
        checkpointed = copy.deepcopy(plain)
        # What TrainingArguments(gradient_checkpointing=True) reaches (through activation_checkpointing_enable).
        checkpointed.gradient_checkpointing_enable()
    before = {k: v.clone() for k, v in checkpointed.state_dict().items()}
    calls = count_block_calls(checkpointed)
    x, labels = images(4), labels_for("single_label_classification", n=4)

    expected, got = train_step(plain, x, labels), train_step(checkpointed, x, labels)
    for name, grad in expected.items():
        if grad is None:  # frozen: the stem and stage 1
            assert got[name] is None, name
        else:
            assert torch.allclose(got[name], grad, atol=1e-6, rtol=1e-5), name
    # Trainable blocks (stages 2-4) ran twice, once more in backward; frozen stage 1 once.
    assert calls.count(0) == 2 and calls.count(1) == 2 * 2
    # BatchNorm statistics: counted once per step, as without checkpointing; frozen ones untouched.
    state = checkpointed.state_dict()
    for name, value in plain.state_dict().items():
        assert torch.allclose(state[name], value, atol=1e-6), name
    assert torch.equal(state["backbone.encoder.stages.0.layers.0.layer.0.normalization.running_mean"],
                       before["backbone.encoder.stages.0.layers.0.layer.0.normalization.running_mean"])


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_kwargs_keep_gradients_and_statistics(use_reentrant):
    # Reentrant checkpointing needs an input that requires grad: the stem is trainable here.
    plain, _ = pair(num_labels=5)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    calls = count_block_calls(checkpointed)
    x, labels = images(4), labels_for("single_label_classification", n=4)
    expected, got = train_step(plain, x, labels), train_step(checkpointed, x, labels)
    assert len(calls) == 2 * 8  # every block recomputed
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, atol=1e-6, rtol=1e-5), name
    state = checkpointed.state_dict()
    for name, value in plain.state_dict().items():
        assert torch.allclose(state[name], value, atol=1e-6), name


def test_gradient_checkpointing_is_off_in_eval_and_without_grad():
    ours, _ = pair(with_cp=True)
    calls = count_block_calls(ours)
    with torch.no_grad():
        ours.train()(images())
    ours.eval()(images())
    assert len(calls) == 2 * 8  # two forwards over eight blocks, no recomputation set up


# transformers 5 renames gradient_checkpointing to activation_checkpointing; the old name still works.
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_training_arguments_gradient_checkpointing_reaches_the_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    ours, _ = pair(num_labels=5)
    x, labels = images(4), labels_for("single_label_classification")
    rows = [{"pixel_values": x[i], "labels": labels[i]} for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), gradient_checkpointing=True, max_steps=1,
                             per_device_train_batch_size=4, use_cpu=True, report_to=[], save_strategy="no")
    calls = count_block_calls(ours)
    Trainer(model=ours, args=args, train_dataset=rows).train()
    assert all(block.gradient_checkpointing for block in blocks(ours))
    assert len(calls) == 2 * 8  # every block recomputed in backward
