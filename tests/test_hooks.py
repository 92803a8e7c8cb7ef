"""EMAHook and EarlyStoppingHook: update rule and stop decisions against hand computations,
both inside a real Trainer (evaluation and checkpoints on the averaged weights, exact
resume), and the recipe's custom_hooks checked by the config."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hf_finetune.config import EMAHookCfg, config_from_dict
from hf_finetune.errors import RecipeError
from hf_finetune.hooks import EMA_STATE_NAME, EarlyStoppingHook, EMAHook, build_custom_hooks


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.floors]  # floors: .ci/floors

VAL = {"batch_size": 4, "dataset": {"type": "SyntheticCIFAR10", "num_samples": 8,
                                    "pipeline": [{"type": "PackClsInputs"}]}}


def recipe(custom_hooks, **sections):
    return {"model": {"head": {"num_classes": 10}}, "val_dataloader": VAL, "custom_hooks": custom_hooks,
            **sections}


def hooks(custom_hooks, **sections):
    """The recipe's custom_hooks as the run builds them: checked by the config, then built."""
    return build_custom_hooks(config_from_dict(recipe(custom_hooks, **sections)).custom_hooks)


def ema(**args):
    return EMAHook(EMAHookCfg(**args))


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
    model, hook = Tiny(), ema(momentum=0.1, interval=2)
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
    model, hook = Tiny(), ema(momentum=0.5, update_buffers=True)
    hook.on_train_begin(None, TrainerState(), TrainerControl(), model=model)
    for t, value in enumerate([2.0, 4.0], start=1):
        set_weights(model, value)
        step(hook, model, t)
    assert hook.averaged.module.norm.running_mean.eq(3.0).all()


def test_ema_follows_the_weights_until_begin_iter():
    model, hook = Tiny(), ema(momentum=0.5, begin_iter=3)
    hook.on_train_begin(None, TrainerState(), TrainerControl(), model=model)
    for t, value in enumerate([1.0, 2.0, 4.0, 8.0], start=1):
        set_weights(model, value)
        step(hook, model, t)
        average = hook.averaged.module.fc.weight
        if t < 3:
            assert average.eq(value).all()
    assert average.eq(0.5 * 4.0 + 0.5 * 8.0).all()  # copy at update 3, average at 4


def test_ema_begin_epoch_counts_epochs_from_one():
    model, hook = Tiny(), ema(momentum=0.5, begin_epoch=2)
    hook.on_train_begin(None, TrainerState(), TrainerControl(), model=model)
    for t, (epoch, value) in enumerate([(0.5, 1.0), (1.0, 2.0), (1.5, 4.0), (2.0, 8.0)], start=1):
        set_weights(model, value)
        hook.on_step_end(None, TrainerState(global_step=t, epoch=epoch), TrainerControl(), model=model)
    # Epoch 1 (updates 1, 2) follows the weights; epoch 2 copies at update 3, averages at 4.
    assert hook.averaged.module.fc.weight.eq(0.5 * 4.0 + 0.5 * 8.0).all()


def test_swap_in_for_evaluation_and_back_before_the_next_step():
    model, hook = Tiny(), ema(momentum=0.5)
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
    model, hook = Tiny(), ema()
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
    hand, averaged = HandEMA(0.25), ema(momentum=0.25)
    trainer = train(tmp_path / "full", [hand, averaged])
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

    resumed = train(tmp_path / "full", [ema(momentum=0.25)],
                    resume=str(tmp_path / "full" / "checkpoint-4"))
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, final[name]), name
    trained_again = load_file(tmp_path / "full" / "checkpoint-6" / EMA_STATE_NAME)
    for name, tensor in trained.items():
        assert torch.equal(trained_again[name], tensor), name


LOSS_STOPPER = [{"type": "EarlyStoppingHook", "monitor": "loss", "min_delta": 10.0, "patience": 2}]
BEST_LOSS = {"default_hooks": {"checkpoint": {"save_best": "loss"}}}  # as train() sets it


def test_early_stopping_stops_the_trainer_and_resumes_its_counters(tmp_path):
    trainer = train(tmp_path / "stop", hooks(LOSS_STOPPER, **BEST_LOSS), max_steps=12)
    # Evaluations at 2 (the best), 4 and 6 (no 10-point improvement: patience reached).
    assert trainer.state.global_step == 6
    # The counter was saved with the checkpoint and comes back on resume.
    saved = json.loads((tmp_path / "stop" / "checkpoint-4" / "trainer_state.json").read_text())
    state = saved["stateful_callbacks"]["EarlyStoppingHook"]
    assert state["attributes"]["early_stopping_patience_counter"] == 1
    assert state["args"]["early_stopping_threshold"] == 10.0 and state["args"]["key"] == "custom_hooks.0"
    resumed = train(tmp_path / "stop", hooks(LOSS_STOPPER, **BEST_LOSS),
                    resume=str(tmp_path / "stop" / "checkpoint-4"), max_steps=12)
    assert resumed.state.global_step == 6  # a fresh counter would have stopped at 8


# --- early stopping decisions --------------------------------------------------------------


def evaluations(hook, values, metric="accuracy_top1", greater=True):
    """Stop decisions for a series of evaluations during training, the Trainer's best value of
    metric_for_best_model updated after each as the Trainer does."""
    args = SimpleNamespace(metric_for_best_model=metric, greater_is_better=greater)
    state = TrainerState(global_step=1)
    hook.on_train_begin(args, state, TrainerControl())
    stops = []
    for value in values:
        control = TrainerControl()
        hook.on_evaluate(args, state, control, metrics={f"eval_{metric}": value})
        stops.append(control.should_training_stop)
        if state.best_metric is None or (value > state.best_metric if greater else value < state.best_metric):
            state.best_metric = value
    return stops


def stopper(**args):
    (hook,) = hooks([{"type": "EarlyStoppingHook", **args}],
                    default_hooks={"checkpoint": {"save_best": args["monitor"]}})
    return hook


def test_early_stopping_decision_sequence_greater_min_delta_in_percent():
    hook = stopper(monitor="accuracy/top1", min_delta=0.5, patience=2)
    accuracies = [0.70, 0.703, 0.71, 0.712, 0.714]  # percent: 70, 70.3, 71, 71.2, 71.4
    # 70 best; 70.3 waits; 71 beats 70.3 by 0.7; 71.2 waits; 71.4 beats 71.2 by 0.2 only: stop
    assert evaluations(hook, accuracies) == [False, False, False, False, True]
    # Each evaluation is compared with the best so far (transformers' rule): small steps wait.
    creeping = stopper(monitor="accuracy/top1", min_delta=0.5, patience=3)
    assert evaluations(creeping, [0.70, 0.704, 0.708, 0.712]) == [False, False, False, True]


def test_early_stopping_less_threshold_and_non_finite():
    hook = stopper(monitor="loss", rule="less", min_delta=0.0, patience=3, stopping_threshold=0.2)
    assert evaluations(hook, [1.0, 0.5, 0.5, 0.19], "loss", greater=False) == [False] * 3 + [True]
    nan_hook = stopper(monitor="loss", patience=3)
    assert evaluations(nan_hook, [1.0, float("nan")], "loss", greater=False) == [False, True]
    lenient = stopper(monitor="loss", patience=3, check_finite=False)
    assert evaluations(lenient, [1.0, float("nan")], "loss", greater=False) == [False, False]


def test_early_stopping_ignores_evaluations_outside_training_and_names_a_missing_metric():
    hook = stopper(monitor="accuracy/top1", patience=1)
    args = SimpleNamespace(metric_for_best_model="accuracy_top1", greater_is_better=True)
    control = TrainerControl()
    hook.on_evaluate(args, TrainerState(), control, metrics={"test_accuracy_top1": 0.5})  # before training
    hook.on_train_begin(args, TrainerState(), control)
    with pytest.raises(RecipeError, match=r"^custom_hooks\.0\.monitor: 'eval_accuracy_top1' is not"):
        hook.on_evaluate(args, TrainerState(), control, metrics={"eval_loss": 1.0})
    hook.on_train_end(args, TrainerState(), control)
    hook.on_evaluate(args, TrainerState(), control, metrics={"test_accuracy_top1": 0.5})  # the test split
    assert not control.should_training_stop and hook.early_stopping_patience_counter == 0


# --- recipe validation ---------------------------------------------------------------------


def test_custom_hooks_take_mmpretrain_configs():
    ema_hook, early = hooks([
        {"type": "EMAHook", "momentum": 1e-4, "priority": "ABOVE_NORMAL"},
        {"type": "EarlyStoppingHook", "monitor": "accuracy/top1", "patience": 3},
    ])
    assert isinstance(ema_hook, EMAHook) and ema_hook.momentum == 1e-4
    assert isinstance(early, EarlyStoppingHook) and early.early_stopping_patience == 3
    assert early.early_stopping_threshold == pytest.approx(0.001)  # mmengine's 0.1, in percent
    assert early.check_finite and hooks([]) == []


# A metric the evaluators report whose name says no rule (mmengine's greater / less keys).
RECALL = {"val_evaluator": [{"type": "Accuracy"}, {"type": "SingleLabelMetric"}],
          "default_hooks": {"checkpoint": {"save_best": "single-label/recall"}}}


@pytest.mark.parametrize("custom_hooks, key, sections", [
    ([{"type": "EMAHok"}], "custom_hooks.0.type", {}),
    ([{"type": "EMAHook", "momentum": 1.5}], "custom_hooks.0.momentum", {}),
    ([{"type": "EMAHook", "interval": 0}], "custom_hooks.0.interval", {}),
    ([{"type": "EMAHook", "momentun": 0.1}], "custom_hooks.0.momentun", {}),
    ([{"type": "EMAHook", "priority": "ABOVE"}], "custom_hooks.0.priority", {}),
    ([{"type": "EMAHook"}, {"type": "EMAHook"}], "custom_hooks.1.type", {}),
    ([{"type": "EMAHook", "begin_iter": 5, "begin_epoch": 1}], "custom_hooks.0.begin_epoch", {}),
    ([{"type": "EMAHook", "ema_type": "StochasticWeightAverage"}], "custom_hooks.0.ema_type", {}),
    ([{"type": "EMAHook", "update_buffers": 1}], "custom_hooks.0.update_buffers", {}),
    ([{"type": "EarlyStoppingHook"}], "custom_hooks.0.monitor", {}),
    ([{"type": "EarlyStoppingHook", "monitor": "single-label/recall"}], "custom_hooks.0.rule",
     {**RECALL, "default_hooks": {"checkpoint": {"save_best": "single-label/recall", "rule": "greater"}}}),
    ([{"type": "EarlyStoppingHook", "monitor": "accuracy/top1", "patience": 0}], "custom_hooks.0.patience", {}),
    ([{"type": "EarlyStoppingHook", "monitor": "accuracy/top1", "check_finite": "yes"}],
     "custom_hooks.0.check_finite", {}),
    ([{"type": "EarlyStoppingHook", "monitor": "accuracy/top1", "strict": False}], "custom_hooks.0.strict", {}),
    # transformers' EarlyStoppingCallback watches the best-checkpoint metric, in its direction.
    ([{"type": "EarlyStoppingHook", "monitor": "loss"}], "custom_hooks.0.monitor", {}),
    ([{"type": "EarlyStoppingHook", "monitor": "accuracy/top1", "rule": "less"}], "custom_hooks.0.rule", {}),
    ([{"type": "EarlyStoppingHook", "monitor": "loss"}], "default_hooks.checkpoint.save_best",
     {"default_hooks": {"checkpoint": {"save_best": None}}}),
    ([{"type": "EarlyStoppingHook", "monitor": "loss"}], "custom_hooks.0.type", {"val_dataloader": None}),
    ([], "default_hooks.checkpoint.rule", RECALL),
    ([], "default_hooks.checkpoint.save_best", {"default_hooks": {"checkpoint": {"save_best": "f1_macro"}}}),
    ([{"type": "EarlyStoppingHook", "monitor": "acc/top1"}], "custom_hooks.0.monitor", {}),
])
def test_invalid_hooks_name_the_key(custom_hooks, key, sections):
    with pytest.raises(RecipeError) as error:
        config_from_dict(recipe(custom_hooks, **sections))
    assert str(error.value).startswith(f"recipe: {key}:") and "\n" not in str(error.value)


def test_best_checkpoint_rule_follows_the_metric_name():
    cfg = config_from_dict(recipe([], default_hooks={"checkpoint": {"save_best": "loss"}}))
    assert cfg.best_metric() == ("loss", "less")
    assert config_from_dict(recipe([])).best_metric() == ("accuracy/top1", "greater")
