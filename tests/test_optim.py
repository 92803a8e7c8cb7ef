"""Optimizer groups and LR schedules against hand computations (mmcls/mmengine semantics)."""

import math

import pytest
import torch
from torch import nn

from hf_finetune.config import config_from_dict
from hf_finetune.errors import RecipeError
from hf_finetune.models import FinetuneResNetConfig, FinetuneResNetForImageClassification
from hf_finetune.optim import build_lr_scheduler, build_optimizer
from hf_finetune.training import BatchPlan, plan_batches, updates_per_epoch

SGD = {"type": "SGD", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}
MODEL = {"head": {"num_classes": 10}}


def config(recipe):
    """The typed config of a recipe that sets only the sections under test."""
    return config_from_dict({"model": MODEL, **recipe})


def lrs_over(recipe, updates_per_epoch, total, lr=0.1):
    """The LR each optimizer update uses, as the Trainer steps the scheduler."""
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = build_lr_scheduler(optimizer, config(recipe).param_scheduler, updates_per_epoch,
                                   total)
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_multistep_by_epoch_changes_at_the_first_update_of_the_milestone_epoch():
    recipe = {"param_scheduler": {"type": "MultiStepLR", "by_epoch": True, "milestones": [2, 3],
                                  "gamma": 0.1}}
    lrs = lrs_over(recipe, updates_per_epoch=3, total=12)
    expected = [0.1] * 6 + [0.01] * 3 + [0.001] * 3  # epochs 0,1 | 2 | 3
    assert lrs == pytest.approx(expected)


def test_tutorial_schedule_drops_at_epoch_15():
    recipe = {"param_scheduler": {"type": "MultiStepLR", "by_epoch": True, "milestones": [15],
                                  "gamma": 0.1}}
    lrs = lrs_over(recipe, updates_per_epoch=4, total=4 * 17, lr=0.01)
    assert lrs[15 * 4 - 1] == pytest.approx(0.01)
    assert lrs[15 * 4] == pytest.approx(0.001)


def test_step_lr_by_iteration():
    recipe = {"param_scheduler": {"type": "StepLR", "by_epoch": False, "step_size": 4, "gamma": 0.5}}
    lrs = lrs_over(recipe, updates_per_epoch=100, total=10)
    assert lrs == pytest.approx([0.1 * 0.5 ** (i // 4) for i in range(10)])


def test_cosine_by_epoch_is_piecewise_constant_and_converted_is_smooth():
    epoch_wise = {"param_scheduler": {"type": "CosineAnnealingLR", "by_epoch": True, "T_max": 4,
                                      "eta_min": 0.0}}
    lrs = lrs_over(epoch_wise, updates_per_epoch=2, total=8)
    expected = [0.1 * (1 + math.cos(math.pi * (i // 2) / 4)) / 2 for i in range(8)]
    assert lrs == pytest.approx(expected)

    smooth = {"param_scheduler": dict(epoch_wise["param_scheduler"], convert_to_iter_based=True)}
    lrs = lrs_over(smooth, updates_per_epoch=2, total=8)
    assert lrs == pytest.approx([0.1 * (1 + math.cos(math.pi * i / 8)) / 2 for i in range(8)])


def test_linear_warmup_then_multistep_multiply():
    recipe = {"param_scheduler": [
        {"type": "LinearLR", "by_epoch": False, "start_factor": 0.25, "begin": 0, "end": 4},
        {"type": "MultiStepLR", "by_epoch": True, "milestones": [2], "gamma": 0.1},
    ]}
    lrs = lrs_over(recipe, updates_per_epoch=3, total=9)
    warm = [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # total_iters = end - begin - 1 = 3
    step = [1, 1, 1, 1, 1, 1, 0.1, 0.1, 0.1]
    assert lrs == pytest.approx([0.1 * w * s for w, s in zip(warm, step)])


def test_constant_lr_and_begin_offsets():
    recipe = {"param_scheduler": {"type": "ConstantLR", "by_epoch": True, "factor": 0.5,
                                  "begin": 1, "end": 3}}
    lrs = lrs_over(recipe, updates_per_epoch=2, total=10)
    # epoch 0 untouched, epoch 1 halved, epoch 2 (= end - 1) restored, then held.
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])


def test_bad_scheduler_values_are_recipe_errors():
    with pytest.raises(RecipeError, match="param_scheduler.0.milestones: required"):
        lrs_over({"param_scheduler": {"type": "MultiStepLR"}}, 2, 4)
    with pytest.raises(RecipeError, match=r"param_scheduler.1.end: must be larger"):
        lrs_over({"param_scheduler": [{"type": "ConstantLR"},
                                      {"type": "LinearLR", "begin": 3, "end": 2}]}, 2, 4)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.frozen = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        for p in self.frozen.parameters():
            p.requires_grad = False


def groups_by_param(optimizer, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups
            for p in g["params"]}


def test_paramwise_cfg_and_frozen_parameters():
    model = Tiny()
    recipe = {"optim_wrapper": {
        "optimizer": SGD,
        "paramwise_cfg": {"custom_keys": {"head": {"lr_mult": 10.0, "decay_mult": 0.0}},
                          "norm_decay_mult": 0.0, "bias_decay_mult": 0.5},
    }}
    optimizer = build_optimizer(model, config(recipe).optim_wrapper)
    got = groups_by_param(optimizer, model)
    assert "frozen.weight" not in got and "frozen.bias" not in got
    assert got["head.weight"] == pytest.approx((1.0, 0.0))
    assert got["head.bias"] == pytest.approx((1.0, 0.0))  # custom key beats bias_decay_mult
    assert got["bn.weight"] == pytest.approx((0.1, 0.0))
    assert got["bn.bias"] == pytest.approx((0.1, 0.0))  # norm rule beats the bias rule
    assert got["stem.weight"] == pytest.approx((0.1, 1e-4))
    assert got["stem.bias"] == pytest.approx((0.1, 0.5e-4))
    assert optimizer.defaults["momentum"] == 0.9


def test_weight_decay_on_every_trainable_parameter_by_default():
    model = Tiny()
    recipe = {"optim_wrapper": {"optimizer": {"type": "AdamW", "lr": 1e-3, "weight_decay": 0.05}}}
    optimizer = build_optimizer(model, config(recipe).optim_wrapper)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert set(groups_by_param(optimizer, model).values()) == {(1e-3, 0.05)}


# --- batch sizes ---------------------------------------------------------------------------


def recipe_with_batch(total=128, per_device=16, accumulation=None, scale=False):
    data = {"type": "SyntheticCIFAR10", "pipeline": [{"type": "PackClsInputs"}]}
    recipe = {"train_cfg": {"total_batch_size": total},
              "train_dataloader": {"batch_size": per_device, "dataset": data},
              "val_dataloader": {"batch_size": per_device, "dataset": data},
              "optim_wrapper": {"optimizer": dict(SGD, lr=0.01)},
              "auto_scale_lr": {"base_batch_size": 128, "enable": scale}}
    if accumulation:
        recipe["optim_wrapper"]["accumulative_counts"] = accumulation
    return config(recipe)


@pytest.mark.parametrize("world, accumulation, per_device", [(1, 1, 128), (2, 1, 64), (8, 1, 16),
                                                             (8, 2, 8)])
def test_total_batch_holds_on_any_number_of_processes(world, accumulation, per_device):
    plan = plan_batches(recipe_with_batch(accumulation=accumulation), world_size=world)
    assert plan.per_device == per_device and plan.total == 128
    assert plan.per_device * world * accumulation == 128
    assert plan.lr == 0.01


def test_indivisible_total_batch_is_an_error():
    with pytest.raises(RecipeError, match="train_cfg.total_batch_size: 128 is not divisible by 3"):
        plan_batches(recipe_with_batch(), world_size=3)


def test_without_total_the_loader_batch_is_per_device_and_auto_scale_lr_scales():
    plan = plan_batches(recipe_with_batch(total=None, per_device=16, scale=True), world_size=2)
    assert (plan.per_device, plan.total) == (16, 32)
    assert plan.lr == pytest.approx(0.01 * 32 / 128)


def test_updates_per_epoch_matches_sharded_batches():
    plan = BatchPlan(world_size=2, per_device=4, accumulation=1, total=8, per_device_eval=4,
                     lr=0.1, base_lr=0.1)
    assert updates_per_epoch(37, plan) == 5  # 10 batches of 4 (last partial) over 2 ranks
    assert updates_per_epoch(37, plan, drop_last=True) == 5  # 9 batches -> 5 on rank 0
    plan.accumulation = 2
    assert updates_per_epoch(37, plan) == 3


# --- layer-wise LR decay (mmpretrain's fine-tune configs) -------------------------------------


def resnet(depth, frozen_stages=-1):
    return FinetuneResNetForImageClassification(
        FinetuneResNetConfig(depth=depth, num_labels=10, frozen_stages=frozen_stages))


def mmpretrain_layer(name, blocks_per_layer):
    """mmpretrain ResNet.get_layer_depth, written out: stem 0, stage 1 -> 1, stages 2 and 3
    in groups of blocks, stage 4 -> 6, head -> 7 (ResNet-50 and the ResNet-18 extension)."""
    if name.startswith("head."):
        return 7
    if not name.startswith("backbone.encoder.stages."):
        return 0
    stage, block = (int(v) for v in name.split(".")[3:6:2])
    per2, per3 = blocks_per_layer
    return {0: 1, 1: 2 + block // per2, 2: 4 + block // per3, 3: 6}[stage]


def layer_decay_recipe(rate, weight_decay, lr=0.1, **paramwise):
    return {"optim_wrapper": {
        "optimizer": {"type": "AdamW", "lr": lr, "weight_decay": weight_decay},
        "constructor": "LearningRateDecayOptimWrapperConstructor",
        "paramwise_cfg": {"layer_decay_rate": rate, **paramwise}}}


def layer_decay_groups(model, *args, **kwargs):
    return build_optimizer(model, config(layer_decay_recipe(*args, **kwargs)).optim_wrapper).param_groups


@pytest.mark.parametrize("depth, blocks_per_layer", [(50, (2, 3)), (18, (1, 1))])
def test_layer_decay_lr_per_parameter_follows_the_formula(depth, blocks_per_layer):
    model = resnet(depth)
    groups = layer_decay_groups(model, 0.5, 0.05)
    group_of = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(group_of) == len(names)
    layers = set()
    for name, param in names.items():
        layer = mmpretrain_layer(name, blocks_per_layer)
        layers.add(layer)
        assert group_of[id(param)]["layer_id"] == layer, name
        assert group_of[id(param)]["lr"] == pytest.approx(0.1 * 0.5 ** (8 - 1 - layer)), name
        assert group_of[id(param)]["weight_decay"] == 0.05
    assert layers == set(range(8)) and len(groups) == 8  # one group per layer


def test_layer_decay_skips_frozen_stages_and_applies_decay_mults():
    model = resnet(18, frozen_stages=2)
    groups = layer_decay_groups(model, 0.9, 0.1, lr=1.0, norm_decay_mult=0.0, bias_decay_mult=0.0,
                                custom_keys={"head.fc": {"decay_mult": 0.5}})
    in_groups = {id(p) for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        assert (id(param) in in_groups) == param.requires_grad, name
    assert min(g["layer_id"] for g in groups) == 4  # stem and stages 1, 2 frozen
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert decay[id(params["head.fc.bias"])] == pytest.approx(0.05)  # custom key first
    assert decay[id(params["head.fc.weight"])] == pytest.approx(0.05)
    stage4 = "backbone.encoder.stages.3.layers.0.layer.0."
    assert decay[id(params[stage4 + "normalization.weight"])] == 0.0
    assert decay[id(params[stage4 + "convolution.weight"])] == pytest.approx(0.1)


@pytest.mark.parametrize("recipe, key", [
    (layer_decay_recipe(0, 0.0), "optim_wrapper.paramwise_cfg.layer_decay_rate"),
    (layer_decay_recipe(0.7, 0.0, custom_keys={"head": {"lr_mult": 10}}),
     "optim_wrapper.paramwise_cfg.custom_keys.head.lr_mult"),
    (layer_decay_recipe(0.7, 0.0, norm_decay_mult=-1), "optim_wrapper.paramwise_cfg.norm_decay_mult"),
    ({"optim_wrapper": {"optimizer": SGD, "paramwise_cfg": {"layer_decay_rate": 0.7}}},
     "optim_wrapper.paramwise_cfg.layer_decay_rate"),
])
def test_layer_decay_errors_name_the_key(recipe, key):
    with pytest.raises(RecipeError) as error:
        config(recipe)
    assert str(error.value).startswith(f"recipe: {key}:")
