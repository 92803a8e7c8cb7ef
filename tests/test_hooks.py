"""EMAHook and EarlyStoppingHook: update rule and stop decisions against hand computations,
and both inside a real Trainer (evaluation and checkpoints on the averaged weights, exact
resume). Also layer-wise LR decay, the optimizer side of the same fine-tune configs."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hf_finetune.errors import RecipeError
from hf_finetune.hooks import EMA_STATE_NAME, EarlyStoppingHook, EMAHook, build_custom_hooks
from hf_finetune.layer_decay import layer_decay_param_groups
from hf_finetune.models import FinetuneResNetConfig, FinetuneResNetForImageClassification


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.floors]  # floors: .ci/floors


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x, labels=None):
        logits = self.fc(self.norm(x))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class Points(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x[:, :3].argmax(1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def step(hook, model, global_step, evaluate=False):
    control = TrainerControl(should_evaluate=evaluate)
    hook.on_step_begin(None, TrainerState(global_step=global_step - 1), TrainerControl(), model=model)
    hook.on_step_end(None, TrainerState(global_step=global_step, epoch=1.0), control, model=model)


def set_weights(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
        model.norm.running_mean.fill_(value)


# --- EMA update rule -----------------------------------------------------------------------


def test_ema_follows_mmengine_update_rule_with_interval():
    model, hook = Tiny(), EMAHook(momentum=0.1, interval=2)
    hook.on_train_begin(None, TrainerState(), TrainerControl(), model=model)
    expected = None
    for t, value in enumerate([1.0, 2.0, 4.0, 8.0, 16.0, 32.0], start=1):
        set_weights(model, value)
        step(hook, model, t)
        index = t - 1  # mmengine's steps counter before this update
        if index == 0:
            expected = value  # the first update copies
        elif index % 2 == 0:
            expected = 0.9 * expected + 0.1 * value
        for p in hook.averaged.module.parameters():
            assert torch.allclose(p, torch.full_like(p, expected))
    assert expected == pytest.approx(0.9 * (0.9 * 1 + 0.1 * 4) + 0.1 * 16)


def test_ema_update_buffers_averages_float_buffers_too():
    model, hook = Tiny(), EMAHook(momentum=0.5, update_buffers=True)
    hook.on_train_begin(None, TrainerState(), TrainerControl(), model=model)
    for t, value in enumerate([2.0, 4.0], start=1):
        set_weights(model, value)
        step(hook, model, t)
    assert hook.averaged.module.norm.running_mean.eq(3.0).all()


def test_ema_follows_the_weights_until_begin_iter():
    model, hook = Tiny(), EMAHook(momentum=0.5, begin_iter=3)
    hook.on_train_begin(None, TrainerState(), TrainerControl(), model=model)
    for t, value in enumerate([1.0, 2.0, 4.0, 8.0], start=1):
        set_weights(model, value)
        step(hook, model, t)
        average = hook.averaged.module.fc.weight
        if t < 3:
            assert average.eq(value).all()
    assert average.eq(0.5 * 4.0 + 0.5 * 8.0).all()  # copy at update 3, average at 4


def test_ema_begin_epoch_counts_epochs_from_one():
    model, hook = Tiny(), EMAHook(momentum=0.5, begin_epoch=2)
    hook.on_train_begin(None, TrainerState(), TrainerControl(), model=model)
    for t, (epoch, value) in enumerate([(0.5, 1.0), (1.0, 2.0), (1.5, 4.0), (2.0, 8.0)], start=1):
        set_weights(model, value)
        hook.on_step_end(None, TrainerState(global_step=t, epoch=epoch), TrainerControl(), model=model)
    # Epoch 1 (updates 1, 2) follows the weights; epoch 2 copies at update 3, averages at 4.
    assert hook.averaged.module.fc.weight.eq(0.5 * 4.0 + 0.5 * 8.0).all()


def test_swap_in_for_evaluation_and_back_before_the_next_step():
    model, hook = Tiny(), EMAHook(momentum=0.5)
    hook.on_train_begin(None, TrainerState(), TrainerControl(), model=model)
    set_weights(model, 2.0)
    step(hook, model, 1)
    set_weights(model, 4.0)
    step(hook, model, 2, evaluate=True)
    assert model.fc.weight.eq(3.0).all() and hook.swapped
    assert model.norm.running_mean.eq(4.0).all()  # buffers stay the model's
    hook.on_step_begin(None, TrainerState(global_step=2), TrainerControl(), model=model)
    assert model.fc.weight.eq(4.0).all() and not hook.swapped


def test_resume_without_ema_file_starts_from_checkpoint_weights(tmp_path, caplog):
    model, hook = Tiny(), EMAHook()
    set_weights(model, 5.0)
    hook.load_checkpoint(str(tmp_path), model)
    assert "no ema.safetensors" in caplog.text
    assert hook.averaged.module.fc.weight.eq(5.0).all() and hook.steps == 0


# --- EMA inside the Trainer ------------------------------------------------------------------


class HandEMA(TrainerCallback):
    """The EMA computed by hand from the trained weights after every update."""

    def __init__(self, momentum):
        self.momentum = momentum
        self.history = {}
        self.evaluations = 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        weights = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        previous = self.history.get(state.global_step - 1)
        if previous is not None:
            weights = {n: (1 - self.momentum) * previous[n] + self.momentum * w for n, w in weights.items()}
        self.history[state.global_step] = weights

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        expected = self.history[state.global_step]
        for name, p in model.named_parameters():
            assert torch.allclose(p.double(), expected[name], atol=1e-6), name
        self.evaluations += 1


class EMATrainer(Trainer):
    """The wiring: after the Trainer loads a checkpoint to resume, EMAHook loads its state."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, EMAHook):
                callback.load_checkpoint(resume_from_checkpoint, self.model)


def train(output_dir, callbacks, resume=None, max_steps=6):
    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=4, per_device_eval_batch_size=16,
        max_steps=max_steps, learning_rate=0.3, lr_scheduler_type="constant", eval_strategy="steps",
        eval_steps=2, save_strategy="steps", save_steps=2, report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True, remove_unused_columns=False, logging_steps=100,
        metric_for_best_model="loss", greater_is_better=False,
        restore_callback_states_from_checkpoint=True)
    trainer = EMATrainer(model=Tiny(), args=args, train_dataset=Points(), eval_dataset=Points(16),
                         callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_trainer_evaluates_checkpoints_and_ends_on_ema_weights_and_resumes_exactly(tmp_path):
    hand, ema = HandEMA(0.25), EMAHook(momentum=0.25)
    trainer = train(tmp_path / "full", [hand, ema])
    assert hand.evaluations == 3
    for step_ in (2, 4, 6):
        checkpoint = tmp_path / "full" / f"checkpoint-{step_}"
        saved = load_file(checkpoint / "model.safetensors")
        for name, expected in hand.history[step_].items():
            assert torch.allclose(saved[name].double(), expected, atol=1e-6)
        with safe_open(checkpoint / EMA_STATE_NAME, framework="pt") as f:
            assert f.metadata() == {"steps": str(step_), "weights": "trained"}
    state = json.loads((tmp_path / "full" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{state['best_global_step']}")
    final = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for name, expected in hand.history[6].items():
        assert torch.allclose(final[name].double(), expected, atol=1e-6)

    trained = load_file(tmp_path / "full" / "checkpoint-6" / EMA_STATE_NAME)
    assert trained.keys() == final.keys()

    resumed = train(tmp_path / "full", [EMAHook(momentum=0.25)],
                    resume=str(tmp_path / "full" / "checkpoint-4"))
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, final[name]), name
    trained_again = load_file(tmp_path / "full" / "checkpoint-6" / EMA_STATE_NAME)
    for name, tensor in trained.items():
        assert torch.equal(trained_again[name], tensor), name


def test_early_stopping_stops_the_trainer_and_resumes_its_counters(tmp_path):
    stopper = EarlyStoppingHook(monitor="loss", min_delta=10.0, patience=2)
    trainer = train(tmp_path / "stop", [stopper], max_steps=12)
    # Evaluations at 2 (the best), 4 and 6 (no 10-point improvement: patience reached).
    assert trainer.state.global_step == 6
    # The counters were saved with the checkpoint and come back on resume.
    saved = json.loads((tmp_path / "stop" / "checkpoint-2" / "trainer_state.json").read_text())
    attributes = saved["stateful_callbacks"]["EarlyStoppingHook"]["attributes"]
    assert attributes["wait_count"] == 0 and math.isfinite(attributes["best_score"])
    resumed_hook = EarlyStoppingHook(monitor="loss", min_delta=10.0, patience=2)
    resumed = train(tmp_path / "stop", [resumed_hook], resume=str(tmp_path / "stop" / "checkpoint-2"),
                    max_steps=12)
    assert resumed.state.global_step == 6  # a fresh counter would have stopped at 8


# --- early stopping decisions --------------------------------------------------------------


def evaluate(hook, metrics):
    control = TrainerControl()
    hook.on_evaluate(None, TrainerState(global_step=1), control, metrics=metrics)
    return control.should_training_stop


def test_early_stopping_decision_sequence_greater():
    hook = EarlyStoppingHook(monitor="accuracy/top1", min_delta=0.5, patience=2)
    hook.on_train_begin(None, None, None)
    accuracies = [0.70, 0.703, 0.71, 0.712, 0.714]  # percent: 70, 70.3, 71, 71.2, 71.4
    stops = [evaluate(hook, {"eval_accuracy_top1": a}) for a in accuracies]
    # 70 best; 70.3 < 70.5 waits; 71 best; 71.2 waits; 71.4 < 71.5 waits twice -> stop
    assert stops == [False, False, False, False, True]
    assert hook.best_score == pytest.approx(71.0)


def test_early_stopping_less_threshold_and_non_finite():
    hook = EarlyStoppingHook(monitor="loss", min_delta=0.0, patience=3, stopping_threshold=0.2)
    hook.on_train_begin(None, None, None)
    assert [evaluate(hook, {"eval_loss": v}) for v in (1.0, 0.5, 0.5, 0.19)] == [False] * 3 + [True]
    nan_hook = EarlyStoppingHook(monitor="loss", patience=3)
    nan_hook.on_train_begin(None, None, None)
    assert evaluate(nan_hook, {"eval_loss": float("nan")})
    nan_hook.check_finite = False
    assert not evaluate(nan_hook, {"eval_loss": float("nan")})


def test_early_stopping_ignores_evaluations_outside_training_and_missing_metrics():
    hook = EarlyStoppingHook(monitor="accuracy/top1", patience=1)
    assert not evaluate(hook, {"eval_accuracy_top1": 0.5})  # before training
    hook.on_train_begin(None, None, None)
    assert not evaluate(hook, {"test_accuracy_top1": 0.5}) and hook.wait_count == 0
    strict = EarlyStoppingHook(monitor="accuracy/top1", strict=True, key="custom_hooks.1")
    strict.on_train_begin(None, None, None)
    with pytest.raises(RecipeError, match=r"^custom_hooks\.1\.monitor: 'accuracy/top1' is not"):
        evaluate(strict, {"eval_loss": 1.0})


# --- recipe validation ---------------------------------------------------------------------


def test_build_custom_hooks_accepts_mmpretrain_configs():
    hooks = build_custom_hooks([
        {"type": "EMAHook", "momentum": 1e-4, "priority": "ABOVE_NORMAL"},
        {"type": "EarlyStoppingHook", "monitor": "accuracy/top1", "patience": 3},
    ])
    assert isinstance(hooks[0], EMAHook) and hooks[0].momentum == 1e-4
    assert isinstance(hooks[1], EarlyStoppingHook) and hooks[1].rule == "greater"
    assert build_custom_hooks(None) == []


@pytest.mark.parametrize("config, key", [
    ([{"type": "EMAHok"}], "custom_hooks.0.type"),
    ([{"type": "EMAHook", "momentum": 1.5}], "custom_hooks.0.momentum"),
    ([{"type": "EMAHook", "interval": 0}], "custom_hooks.0.interval"),
    ([{"type": "EMAHook", "momentun": 0.1}], "custom_hooks.0.momentun"),
    ([{"type": "EMAHook", "priority": "ABOVE"}], "custom_hooks.0.priority"),
    ([{"type": "EMAHook"}, {"type": "EMAHook"}], "custom_hooks.1.type"),
    ([{"type": "EarlyStoppingHook"}], "custom_hooks.0.monitor"),
    ([{"type": "EarlyStoppingHook", "monitor": "f1_macro"}], "custom_hooks.0.rule"),
    ([{"type": "EarlyStoppingHook", "monitor": "loss", "patience": -1}], "custom_hooks.0.patience"),
    ([{"type": "EMAHook", "update_buffers": 1}], "custom_hooks.0.update_buffers"),
    ([{"type": "EarlyStoppingHook", "monitor": "loss", "check_finite": "yes"}], "custom_hooks.0.check_finite"),
    ({"type": "EMAHook"}, "custom_hooks"),
])
def test_invalid_hooks_name_the_key(config, key):
    with pytest.raises(RecipeError) as error:
        build_custom_hooks(config)
    assert str(error.value).startswith(f"{key}:") and "\n" not in str(error.value)


# --- layer-wise LR decay (the optimizer side of mmpretrain's fine-tune configs) -------------


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


@pytest.mark.parametrize("depth, blocks_per_layer", [(50, (2, 3)), (18, (1, 1))])
def test_layer_decay_lr_per_parameter_follows_the_formula(depth, blocks_per_layer):
    model = resnet(depth)
    groups = layer_decay_param_groups(model, base_lr=0.1, weight_decay=0.05, layer_decay_rate=0.5)
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
    assert layers == set(range(8))


def test_layer_decay_skips_frozen_stages_and_applies_decay_mults():
    model = resnet(18, frozen_stages=2)
    groups = layer_decay_param_groups(
        model, base_lr=1.0, weight_decay=0.1, layer_decay_rate=0.9, norm_decay_mult=0.0,
        bias_decay_mult=0.0, custom_keys={"head.fc": {"decay_mult": 0.5}})
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


@pytest.mark.parametrize("kwargs, key", [
    ({"layer_decay_rate": 0}, "optim_wrapper.paramwise_cfg.layer_decay_rate"),
    ({"layer_decay_rate": 0.7, "custom_keys": {"head": {"lr_mult": 10}}},
     "optim_wrapper.paramwise_cfg.custom_keys.head"),
    ({"layer_decay_rate": 0.7, "norm_decay_mult": -1}, "optim_wrapper.paramwise_cfg.norm_decay_mult"),
])
def test_layer_decay_errors_name_the_key(kwargs, key):
    with pytest.raises(RecipeError) as error:
        layer_decay_param_groups(Tiny(), base_lr=0.1, weight_decay=0.0, **kwargs)
    assert str(error.value).startswith(f"{key}:")
