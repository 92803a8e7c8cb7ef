"""mmengine's `custom_hooks` as transformers TrainerCallbacks: EMAHook and EarlyStoppingHook
(transformers' EarlyStoppingCallback). The recipe's values arrive checked (hf_finetune.config:
EMAHookCfg, EarlyStoppingHookCfg).

How EMAHook meets the Trainer. After each optimizer update the Trainer calls `on_step_end`
(DefaultFlowCallback, which runs first, has already set `should_evaluate` / `should_save`),
then evaluates, then writes a checkpoint and calls `on_save`. The Trainer has no event
before an evaluation, so EMAHook swaps the averaged weights into the model at `on_step_end`
(and `on_epoch_end`) whenever an evaluation or a save follows, and swaps them back at the
next `on_step_begin`, before any forward pass. Evaluation, the best-checkpoint metric and
each checkpoint's model.safetensors therefore use the averaged weights, as mmengine's
EMAHook gives them to validation and checkpoints. `ema.safetensors`, next to
model.safetensors, holds the other weights (the trained ones) and the update count, so a
resumed run continues both exactly: call `EMAHook.load_checkpoint` right after the Trainer
has loaded the checkpoint's model weights. When training ends the model keeps the averaged
weights (the model that is saved, tested and pushed), unless the Trainer has just loaded
the best checkpoint, which already holds them.

Updates count optimizer updates (mmengine counts iterations; they differ only with
gradient accumulation).
"""

import logging
import math
import os

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from transformers import EarlyStoppingCallback, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .errors import CheckpointError, RecipeError
from .metrics import in_percent
from .workdir import atomic_write

logger = logging.getLogger("hf_finetune")

EMA_STATE_NAME = "ema.safetensors"


class EMAHook(TrainerCallback):
    """mmengine EMAHook with ExponentialMovingAverage: averaged = (1 - momentum) * averaged
    + momentum * param, every `interval` updates, the first update copying the weights.

    Buffers (BatchNorm statistics) are the model's own unless `update_buffers`, which
    averages them too. Before `begin_iter` updates (or epoch `begin_epoch`) the average
    simply follows the weights.
    """

    def __init__(self, cfg, key="EMAHook"):
        """cfg: the recipe's EMAHook entry; key: where it is, for messages."""
        self.momentum = cfg.momentum
        self.interval = cfg.interval
        self.begin_iter = cfg.begin_iter
        self.begin_epoch = cfg.begin_epoch
        self.update_buffers = cfg.update_buffers
        self.strict_load = cfg.strict_load
        self.key = key
        self.averaged = None  # torch AveragedModel: a copy of the model holding the average
        self.steps = 0  # updates seen since the average started (mmengine's `steps`)
        self.swapped = False  # True while the model holds the averaged weights

    # --- the averaged weights ------------------------------------------------------------
    def _tensors(self, module):
        tensors = list(module.parameters())
        if self.update_buffers:
            tensors += list(module.buffers())
        return tensors

    def _names(self, model):
        names = [name for name, _ in model.named_parameters()]
        if self.update_buffers:
            names += [name for name, _ in model.named_buffers()]
        return names

    def start(self, model):
        """A fresh average equal to the model's current weights."""
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(1 - self.momentum),
                                      use_buffers=self.update_buffers)
        self.averaged.requires_grad_(False)
        self.steps = 0
        self.swapped = False

    def _started(self, state):
        if self.begin_epoch:
            return math.ceil(state.epoch) >= self.begin_epoch  # the current epoch, 1-based
        return state.global_step >= self.begin_iter

    @torch.no_grad()
    def update(self, model, state):
        if not self._started(state):
            torch._foreach_copy_(self._tensors(self.averaged.module), self._tensors(model))
            return
        if self.steps % self.interval == 0:
            self.averaged.update_parameters(model)  # the first one copies
        self.steps += 1

    @torch.no_grad()
    def swap(self, model):
        """Exchange the model's weights with the averaged ones (both directions)."""
        for averaged, live in zip(self._tensors(self.averaged.module), self._tensors(model)):
            kept = live.detach().clone()
            live.copy_(averaged)
            averaged.copy_(kept)
        self.swapped = not self.swapped

    # --- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, checkpoint_dir, model):
        """ema.safetensors: the weights the checkpoint's model.safetensors does not hold."""
        names = self._names(model)
        tensors = {name: t.detach().cpu().contiguous()
                   for name, t in zip(names, self._tensors(self.averaged.module))}
        metadata = {"steps": str(self.steps), "weights": "trained" if self.swapped else "averaged"}
        with atomic_write(os.path.join(checkpoint_dir, EMA_STATE_NAME), "wb") as f:
            f.write(save(tensors, metadata=metadata))

    @torch.no_grad()
    def load_checkpoint(self, checkpoint_dir, model):
        """Restore the average and the trained weights after the model has loaded
        `checkpoint_dir`'s model.safetensors."""
        self.start(model)
        path = os.path.join(checkpoint_dir, EMA_STATE_NAME)
        if not os.path.isfile(path):
            # mmengine: a checkpoint written without EMA starts the average from its weights.
            logger.warning("%s: no %s (written without EMAHook); the average starts from the "
                           "checkpoint's weights", checkpoint_dir, EMA_STATE_NAME)
            return
        names = self._names(model)
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            stored = set(f.keys())
            missing = [n for n in names if n not in stored]
            unexpected = sorted(stored - set(names))
            if "steps" not in metadata:
                raise CheckpointError(f"{path}: not written by EMAHook (no update count); "
                                      f"remove it to start the average from the checkpoint")
            if (missing or unexpected) and self.strict_load:
                raise CheckpointError(
                    f"{path}: does not match the model ({len(missing)} missing, "
                    f"{len(unexpected)} unexpected tensors, e.g. {(missing + unexpected)[:3]}); "
                    f"resume with the recipe that wrote it, or set {self.key}.strict_load false")
            if missing:
                logger.warning("%s: %d tensors missing (e.g. %s); they keep the checkpoint's "
                               "weights", path, len(missing), missing[:3])
            # The file holds the trained weights when model.safetensors holds the average.
            target = model if metadata.get("weights") == "trained" else self.averaged.module
            for name, tensor in zip(names, self._tensors(target)):
                if name in stored:
                    tensor.copy_(f.get_tensor(name))
        self.steps = int(metadata["steps"])
        self.averaged.n_averaged.fill_(-(-self.steps // self.interval))  # updates done

    # --- Trainer events --------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.averaged is None:  # not resumed
            self.start(model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.swapped:
            self.swap(model)  # train on the trained weights again

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.update(model, state)
        self._swap_in_if_used(control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._swap_in_if_used(control, model)

    def _swap_in_if_used(self, control, model):
        if (control.should_evaluate or control.should_save) and not self.swapped:
            self.swap(model)

    def on_save(self, args, state, control, model=None, **kwargs):
        if args.should_save:
            checkpoint_dir = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            self.save_checkpoint(checkpoint_dir, model)

    @torch.no_grad()
    def on_train_end(self, args, state, control, model=None, **kwargs):
        best_loaded = args.load_best_model_at_end and state.best_model_checkpoint is not None
        if not self.swapped and not best_loaded:
            torch._foreach_copy_(self._tensors(model), self._tensors(self.averaged.module))
        self.averaged = None  # a later train() starts a fresh average


class EarlyStoppingHook(EarlyStoppingCallback):
    """mmengine's EarlyStoppingHook as transformers' EarlyStoppingCallback, which stops after
    `early_stopping_patience` evaluations in a row that do not beat the Trainer's best value of
    metric_for_best_model (greater_is_better) by more than `early_stopping_threshold`. Its
    counter is saved in checkpoints and restored on resume. Added here, from mmengine: stop at
    once when the value is not finite (`check_finite`) or beats `stopping_threshold`, and a
    missing metric is an error. Evaluations outside training (the test split) do not count.
    """

    def __init__(self, early_stopping_patience=1, early_stopping_threshold=0.0, check_finite=False,
                 stopping_threshold=None, key="EarlyStoppingHook"):
        super().__init__(early_stopping_patience, early_stopping_threshold)
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.key = key
        self.training = False

    def on_train_begin(self, args, state, control, **kwargs):
        # Not the parent's: the config has checked what it asserts, and its advice to load the
        # best model at the end is not mmengine's.
        self.training = True

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self.training:
            return
        key = args.metric_for_best_model
        key = key if key.startswith("eval_") else f"eval_{key}"
        value = (metrics or {}).get(key)
        if value is None:
            raise RecipeError(f"{self.key}.monitor: {key!r} is not among the evaluation metrics "
                              f"({', '.join(sorted(metrics or {}))})")
        threshold = self.stopping_threshold
        reached = threshold is not None and (value > threshold if args.greater_is_better else value < threshold)
        if self.check_finite and not math.isfinite(value):
            reason = f"{key} = {value} is not finite"
        elif reached:
            reason = f"{key} = {value:.4g} reached the stopping threshold {self.stopping_threshold:.4g}"
        else:
            super().on_evaluate(args, state, control, metrics, **kwargs)
            if not control.should_training_stop:
                return
            reason = (f"{key} did not improve on {state.best_metric:.4g} by more than "
                      f"{self.early_stopping_threshold:.4g} in {self.early_stopping_patience_counter} "
                      f"evaluations")
        logger.info("early stopping at update %d: %s", state.global_step, reason)
        control.should_training_stop = True

    def state(self):
        saved = super().state()
        saved["args"].update(check_finite=self.check_finite, stopping_threshold=self.stopping_threshold,
                             key=self.key)
        return saved


def build_custom_hooks(hooks):
    """The recipe's `custom_hooks` as TrainerCallbacks. `priority` has no effect: EMAHook
    swaps its weights in before any evaluation or save whatever the order."""
    callbacks = []
    for i, hook in enumerate(hooks):
        key = f"custom_hooks.{i}"
        if hook.type == "EMAHook":
            callbacks.append(EMAHook(hook, key))
            continue
        # mmpretrain gives min_delta and stopping_threshold in its units: percent for all
        # but the loss; our metrics are fractions.
        scale = 100 if in_percent(hook.monitor) else 1
        callbacks.append(EarlyStoppingHook(
            hook.patience, hook.min_delta / scale, check_finite=hook.check_finite,
            stopping_threshold=None if hook.stopping_threshold is None else hook.stopping_threshold / scale,
            key=key))
    return callbacks
