"""mmengine's `custom_hooks` as transformers TrainerCallbacks: EMAHook and EarlyStoppingHook.

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
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import check_flags, typed_entry
from .errors import CheckpointError, RecipeError
from .workdir import atomic_write

logger = logging.getLogger("hf_finetune")

EMA_STATE_NAME = "ema.safetensors"
# mmengine's hook priorities: accepted so configs translate; callbacks run in list order.
PRIORITIES = ("HIGHEST", "VERY_HIGH", "HIGH", "ABOVE_NORMAL", "NORMAL", "BELOW_NORMAL", "LOW",
              "VERY_LOW", "LOWEST")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _non_negative_int(value, key):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RecipeError(f"{key}: expected an integer >= 0, got {value!r}")
    return value


class EMAHook(TrainerCallback):
    """mmengine EMAHook with ExponentialMovingAverage: averaged = (1 - momentum) * averaged
    + momentum * param, every `interval` updates, the first update copying the weights.

    Buffers (BatchNorm statistics) are the model's own unless `update_buffers`, which
    averages them too. Before `begin_iter` updates (or epoch `begin_epoch`) the average
    simply follows the weights.
    """

    ARGS = ("momentum", "interval", "begin_iter", "begin_epoch", "update_buffers", "ema_type",
            "strict_load")

    def __init__(self, momentum=0.0002, interval=1, begin_iter=0, begin_epoch=0,
                 update_buffers=False, ema_type="ExponentialMovingAverage", strict_load=False,
                 *, key="EMAHook"):
        if not _is_number(momentum) or not 0 < momentum < 1:
            raise RecipeError(f"{key}.momentum: expected a number in (0, 1), got {momentum!r}")
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise RecipeError(f"{key}.interval: expected an integer >= 1, got {interval!r}")
        _non_negative_int(begin_iter, f"{key}.begin_iter")
        _non_negative_int(begin_epoch, f"{key}.begin_epoch")
        if begin_iter and begin_epoch:
            raise RecipeError(f"{key}.begin_epoch: set begin_iter or begin_epoch, not both")
        if ema_type != "ExponentialMovingAverage":
            raise RecipeError(f"{key}.ema_type: only 'ExponentialMovingAverage' is supported, "
                              f"got {ema_type!r}")
        check_flags(key, update_buffers=update_buffers, strict_load=strict_load)
        self.momentum = float(momentum)
        self.interval = interval
        self.begin_iter = begin_iter
        self.begin_epoch = begin_epoch
        self.update_buffers = update_buffers
        self.strict_load = strict_load
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


class EarlyStoppingHook(TrainerCallback, ExportableState):
    """mmengine EarlyStoppingHook on the Trainer's evaluations during training.

    An evaluation improves when the monitored value beats the best so far by at least
    `min_delta` (in the `rule`'s direction); training stops after `patience` evaluations in
    a row without improvement, at once when the value reaches `stopping_threshold`, or, with
    `check_finite`, when it is NaN/inf. `monitor` uses mmpretrain's names
    ("accuracy/top1"); accuracies are compared in percent, as mmpretrain reports them, so
    min_delta and stopping_threshold mean what they mean in its configs. The counters are
    saved in checkpoints (trainer_state.json) and restored on resume when the Trainer's
    `restore_callback_states_from_checkpoint` is on.
    """

    ARGS = ("monitor", "rule", "min_delta", "strict", "check_finite", "patience",
            "stopping_threshold")
    GREATER_KEYS = ("acc", "top", "AR@", "auc", "precision", "mAP", "mDice", "mIoU", "mAcc", "aAcc")
    LESS_KEYS = ("loss",)

    def __init__(self, monitor, rule=None, min_delta=0.1, strict=False, check_finite=True,
                 patience=5, stopping_threshold=None, *, key="EarlyStoppingHook"):
        if not isinstance(monitor, str) or not monitor:
            raise RecipeError(f"{key}.monitor: expected a metric name such as 'accuracy/top1', "
                              f"got {monitor!r}")
        if rule is None:
            rule = self._infer_rule(monitor, key)
        if rule not in ("greater", "less"):
            raise RecipeError(f"{key}.rule: expected 'greater' or 'less', got {rule!r}")
        if not _is_number(min_delta) or min_delta < 0:
            raise RecipeError(f"{key}.min_delta: expected a number >= 0, got {min_delta!r}")
        _non_negative_int(patience, f"{key}.patience")
        if stopping_threshold is not None and not _is_number(stopping_threshold):
            raise RecipeError(f"{key}.stopping_threshold: expected a number or null, "
                              f"got {stopping_threshold!r}")
        check_flags(key, strict=strict, check_finite=check_finite)
        self.monitor = monitor
        self.rule = rule
        self.min_delta = min_delta
        self.strict = strict
        self.check_finite = check_finite
        self.patience = patience
        self.stopping_threshold = stopping_threshold
        self.key = key
        self.wait_count = 0
        self.best_score = -math.inf if rule == "greater" else math.inf
        self.active = False  # only evaluations during training count

    @classmethod
    def _infer_rule(cls, monitor, key):
        """mmengine's rule from the metric name: exact key, then substring."""
        name = monitor.lower()
        greater = [k.lower() for k in cls.GREATER_KEYS]
        less = [k.lower() for k in cls.LESS_KEYS]
        for keys, rule in ((greater, "greater"), (less, "less")):
            if name in keys:
                return rule
        for keys, rule in ((greater, "greater"), (less, "less")):
            if any(k in name for k in keys):
                return rule
        raise RecipeError(f"{key}.rule: cannot infer it from monitor {monitor!r}; set "
                          f"'greater' or 'less'")

    def better(self, value, reference):
        return value > reference if self.rule == "greater" else value < reference

    def check(self, value):
        """Record one evaluation; (stop, reason)."""
        if self.check_finite and not math.isfinite(value):
            return True, (f"{self.monitor} = {value} is not finite; the best value was "
                          f"{self.best_score:.4g}")
        if self.stopping_threshold is not None and self.better(value, self.stopping_threshold):
            self.best_score = value
            return True, (f"{self.monitor} = {value:.4g} reached the stopping threshold "
                          f"{self.stopping_threshold}")
        delta = self.min_delta if self.rule == "greater" else -self.min_delta
        if self.better(self.best_score + delta, value):  # not improved by min_delta
            self.wait_count += 1
            if self.wait_count >= self.patience:
                return True, (f"{self.monitor} did not improve in the last {self.wait_count} "
                              f"evaluations; best {self.best_score:.4g}")
            return False, ""
        self.best_score = value
        self.wait_count = 0
        return False, ""

    def monitored_value(self, metrics):
        """The monitored metric from the Trainer's metrics ("accuracy/top1" ->
        eval_accuracy_top1, in percent), or None when absent."""
        name = self.monitor.replace("/", "_")
        for candidate in (f"eval_{name}", name):
            if candidate in metrics:
                value = float(metrics[candidate])
                return value * 100 if name.startswith("accuracy") else value
        return None

    def on_train_begin(self, args, state, control, **kwargs):
        self.active = True

    def on_train_end(self, args, state, control, **kwargs):
        self.active = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self.active:
            return
        value = self.monitored_value(metrics or {})
        if value is None:
            message = (f"{self.key}.monitor: {self.monitor!r} is not among the evaluation "
                       f"metrics ({', '.join(sorted(metrics or {}))})")
            if self.strict:
                raise RecipeError(message)
            logger.warning("%s; early stopping skipped this evaluation", message)
            return
        stop, reason = self.check(value)
        if stop:
            logger.info("early stopping at update %d: %s", state.global_step, reason)
            control.should_training_stop = True

    def state(self):
        return {
            "args": {"monitor": self.monitor, "rule": self.rule, "min_delta": self.min_delta,
                     "strict": self.strict, "check_finite": self.check_finite,
                     "patience": self.patience, "stopping_threshold": self.stopping_threshold,
                     "key": self.key},
            "attributes": {"wait_count": self.wait_count, "best_score": self.best_score},
        }


CUSTOM_HOOKS = {"EMAHook": EMAHook, "EarlyStoppingHook": EarlyStoppingHook}


def build_custom_hooks(config, key="custom_hooks"):
    """The recipe's `custom_hooks` list as TrainerCallbacks (`priority` accepted, unused:
    EMAHook already swaps its weights in before any evaluation or save)."""
    if config is None:
        return []
    if not isinstance(config, (list, tuple)):
        raise RecipeError(f"{key}: expected a list of hooks, got {type(config).__name__}")
    hooks = []
    for i, hook_config in enumerate(config):
        where = f"{key}.{i}"
        cls, args = typed_entry(hook_config, CUSTOM_HOOKS, where, "hook", ignore=("priority",))
        priority = hook_config.get("priority", "NORMAL")
        if priority not in PRIORITIES and not (isinstance(priority, int) and 0 <= priority <= 100):
            raise RecipeError(f"{where}.priority: expected one of {', '.join(PRIORITIES)} or "
                              f"an integer 0..100, got {priority!r}")
        if cls is EarlyStoppingHook and "monitor" not in args:
            raise RecipeError(f"{where}.monitor: EarlyStoppingHook requires 'monitor' "
                              f"(e.g. 'accuracy/top1')")
        if cls is EMAHook and any(isinstance(h, EMAHook) for h in hooks):
            raise RecipeError(f"{where}.type: only one EMAHook is allowed")
        hooks.append(cls(**args, key=where))
    return hooks
