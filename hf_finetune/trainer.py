"""The Trainer subclass: whole-batch data loading, the recipe's optimizer and LR schedule,
a NaN guard, throughput in the logs, and the evaluation metrics."""

import logging
import os
import time

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint

from .errors import CheckpointError, TrainingError
from .metrics import CONFUSION_KEY
from .optim import build_lr_scheduler, build_optimizer

logger = logging.getLogger("hf_finetune")


def _split(metric_key_prefix):
    return "test" if metric_key_prefix == "test" else "val"


class LossGuard(TrainerCallback):
    """Remembers the first update whose loss was NaN/inf without a device sync per step, and
    stops training before anything is logged, evaluated or checkpointed after it, and at its end."""

    def __init__(self):
        self.first_bad = None

    def update(self, loss, step):
        bad = ~torch.isfinite(loss.detach())
        marker = torch.where(bad, step, -1)  # Python scalars: no host-to-device copy, no sync
        if self.first_bad is None:
            self.first_bad = marker
        else:
            self.first_bad = torch.where(self.first_bad >= 0, self.first_bad, marker)

    def check(self):
        if self.first_bad is not None and int(self.first_bad) >= 0:
            step = int(self.first_bad)
            raise TrainingError(
                f"the loss became NaN/inf at update {step + 1}; training stopped. Checkpoints "
                f"written before it are intact. Lower optim_wrapper.optimizer.lr, set "
                f"optim_wrapper.clip_grad, or check the data."
            )

    def on_step_end(self, args, state, control, **kwargs):
        # DefaultFlowCallback, which runs first, has set what follows this update.
        if control.should_log or control.should_evaluate or control.should_save or control.should_training_stop:
            self.check()  # never a log line, metric or checkpoint of NaN weights

    on_epoch_end = on_step_end

    def on_train_end(self, args, state, control, **kwargs):
        self.check()


class ResumeCallbackFiles(TrainerCallback):
    """Resuming: the callbacks that keep files beside a checkpoint's weights (EMAHook's
    ema.safetensors: `load_checkpoint`) load them at on_train_begin, the first event after the
    Trainer has loaded the weights and restored the callbacks' own state."""

    def __init__(self, checkpoint, handler):
        self.checkpoint = checkpoint
        self.handler = handler  # the Trainer's CallbackHandler

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for callback in self.handler.callbacks:
            if hasattr(callback, "load_checkpoint"):
                callback.load_checkpoint(self.checkpoint, model)


class FinetuneTrainer(Trainer):
    """Trainer with whole-batch data loading, the recipe's optimizer and LR schedule.

    cfg: the Config; plan: the BatchPlan; loaders: {split: DataloaderCfg}, how each split is
    loaded ("train"; "test" for evaluate(metric_key_prefix="test"), "val" for other evaluations);
    updates_per_epoch: optimizer updates per epoch, the LR schedule's epoch; batch_augments:
    Mixup / CutMix (augments.BatchAugments), applied to training batches; loss_fn: the recipe's
    loss on (logits, labels) for a model that does not compute it itself (a Hub model), else None."""

    def __init__(self, *args, cfg, plan, loaders, updates_per_epoch, batch_augments=None, loss_fn=None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_fn = loss_fn
        if loss_fn is not None:
            # Our loss is a mean over the batch, as the ResNet's: the Trainer scales it for gradient
            # accumulation and passes no loss kwargs (a ViT's forward would count as taking them).
            self.model_accepts_loss_kwargs = False
            self.loss_is_scaled_for_ga = False
        self.cfg = cfg
        self.plan = plan
        self.loaders = loaders
        self.updates_per_epoch = updates_per_epoch
        self.batch_augments = batch_augments
        if batch_augments is not None:
            self.add_callback(batch_augments)  # it counts batches from the update training starts at
        self.loss_guard = LossGuard()
        self.add_callback(self.loss_guard)
        # FLOPs per input value, counted once: the Trainer would count the parameters on every step.
        self.flops_per_value = 6 * self.model.num_parameters(exclude_embeddings=True)
        self._window = None  # (time, samples) at the last log, for images/s
        self._eval_loaders = {}
        self._evaluations = {}  # metric_key_prefix -> (update, metrics) of the last evaluate()
        self._stream_resume = None  # while resuming a streamed split: (epoch, batches the Trainer skips)

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint is True:  # the Trainer's "latest checkpoint of output_dir"
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True
        restore = None
        if isinstance(resume_from_checkpoint, str):
            restore = ResumeCallbackFiles(resume_from_checkpoint, self.callback_handler)
            self.add_callback(restore)
            from .data.streaming import RESUME_NOTE, StreamingSplit

            if isinstance(self.train_dataset, StreamingSplit) and not self.args.ignore_data_skip:
                # What the Trainer will skip (its _init_training_state): the updates done in this epoch.
                step = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME)).global_step
                epoch, updates = divmod(step, self.updates_per_epoch)
                self._stream_resume = (epoch, updates * self.args.gradient_accumulation_steps)
                if self.is_world_process_zero():
                    logger.info(RESUME_NOTE)
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            self._stream_resume = None
            if restore is not None:
                self.remove_callback(restore)

    # Two private Trainer methods overridden: the Trainer reads a checkpoint's weights as a raw state
    # dict, but transformers 5 saves some families (ViT, DeiT, ...) under their former key names
    # (save_pretrained's save_original_format), which only from_pretrained maps back; the raw load
    # then leaves those weights untrained with a warning. Any model but our ResNet (whose keys
    # are its own) is read through from_pretrained. Checked on transformers 5.24;
    # tests/test_hub_models.py fails when their signatures change or resuming stops being exact.
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if _keys_are_its_own(target) or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        try:
            target.load_state_dict(type(target).from_pretrained(resume_from_checkpoint, config=target.config)
                                   .state_dict())
        except (OSError, ValueError, RuntimeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{resume_from_checkpoint}: its weights do not load into this model ({reason}); "
                                  f"resume with the recipe that wrote it, or start a new work dir") from None
        return None

    def _load_best_model(self):
        if _keys_are_its_own(self.accelerator.unwrap_model(self.model)) or self.is_fsdp_enabled or \
                self.is_deepspeed_enabled:
            return super()._load_best_model()
        return self._load_from_checkpoint(self.state.best_model_checkpoint)

    # Data: the pipeline builds each batch tensor itself; the DataLoader only fetches it.
    def _loader(self, dataset, split, batch_size, shuffle, drop_last, train=False):
        from .data import StreamingSplit, build_dataloader, build_stream_loader  # datasets only when needed

        section = self._section(split)
        if isinstance(dataset, StreamingSplit):
            loader = build_stream_loader(
                dataset, batch_size, epoch_batches=self.updates_per_epoch * self.args.gradient_accumulation_steps
                if train else None, shuffle=shuffle, seed=self.args.seed, rank=self.args.process_index,
                world_size=self.args.world_size, num_workers=section.num_workers,
                pin_memory=self.args.dataloader_pin_memory, persistent_workers=section.keep_workers(),
                prefetch_factor=section.prefetch_factor, shared_slots=section.shared_slots,
                resume=self._stream_resume if train else None)
            # Training: each rank reads its own shards (prepare would dispatch the main process's);
            # evaluation: accelerate dispatches the one stream's batches to the ranks.
            return loader if train else self.accelerator.prepare(loader)
        loader = build_dataloader(
            dataset,
            batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=section.num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=section.keep_workers(),
            prefetch_factor=section.prefetch_factor,
            seed=self.args.seed,
            drop_single=train,
            shared_slots=section.shared_slots,
        )
        return self.accelerator.prepare(loader)

    def _section(self, split):
        return self.loaders.get(split) or self.loaders.get("val") or self.loaders["test"]

    def get_train_dataloader(self):
        return self._loader(self.train_dataset, "train", self.args.per_device_train_batch_size,
                            self.cfg.train_dataloader.sampler.shuffle, self.args.dataloader_drop_last,
                            train=True)

    # metric_key_prefix names the split ("test", or "eval": validation), so the loader follows
    # that split's section; the Trainer then evaluates the loader handed over (get_eval_dataloader).
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        metrics = super().evaluate(self._eval_loader(dataset, _split(metric_key_prefix)), ignore_keys,
                                   metric_key_prefix)
        self._evaluations[metric_key_prefix] = (self.state.global_step, metrics)
        return metrics

    def evaluation_at_last_update(self, metric_key_prefix="eval"):
        """The metrics, confusion matrix included, of an evaluate() at the current update (the
        one the Trainer ran at the end of training), or None. The log history keeps no matrix."""
        step, metrics = self._evaluations.get(metric_key_prefix, (None, None))
        return dict(metrics) if step == self.state.global_step else None

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix="test"):
        return super().predict(self._eval_loader(test_dataset, _split(metric_key_prefix)), ignore_keys,
                               metric_key_prefix)

    def get_eval_dataloader(self, eval_dataset=None):
        if isinstance(eval_dataset, DataLoader):
            return eval_dataset
        return self._eval_loader(self.eval_dataset if eval_dataset is None else eval_dataset, "val")

    def get_test_dataloader(self, test_dataset):
        if isinstance(test_dataset, DataLoader):
            return test_dataset
        return self._eval_loader(test_dataset, "test")

    def _eval_loader(self, dataset, split):
        """One loader per split and dataset, kept while its workers are."""
        cached = self._eval_loaders.get(split)
        if cached is not None and cached[0] is dataset:
            return cached[1]
        loader = self._loader(dataset, split, self.args.per_device_eval_batch_size, False, False)
        if self._section(split).keep_workers():
            self._eval_loaders[split] = (dataset, loader)
        return loader

    # Optimisation as the recipe says.
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = build_optimizer(model or self.model, self.cfg.optim_wrapper, lr=self.plan.lr)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.batch_augments is not None and model.training:
            pixel_values, targets = self.batch_augments(inputs["pixel_values"], inputs["labels"])
            inputs = {**inputs, "pixel_values": pixel_values, "labels": targets}
        if self.loss_fn is not None and inputs.get("labels") is not None:
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            loss = self.loss_fn(outputs.logits, inputs["labels"])
            return (loss, outputs) if return_outputs else loss
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = build_lr_scheduler(
                optimizer or self.optimizer, self.cfg.param_scheduler, self.updates_per_epoch, num_training_steps
            )
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.loss_guard.update(loss, self.state.global_step)
        return loss

    # The one private Trainer method overridden: no public hook lets the Trainer skip the
    # gradient norm it computes on every update only to log it. Checked on transformers 5.18
    # and 5.24; tests/test_training.py fails when its signature or call changes.
    def _get_grad_norm(self, model, grad_norm=None):
        # Without clipping, skip that pass over every gradient on the updates that do not log.
        if grad_norm is None and not self._logs_next_update():
            return None
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _logs_next_update(self):
        step = self.state.global_step + 1
        every = self.args.logging_steps
        return (step == 1 and self.args.logging_first_step) or step >= self.state.max_steps or (
            every and step % every == 0)

    def floating_point_ops(self, inputs):
        return self.flops_per_value * inputs["pixel_values"].numel()

    def log(self, logs, start_time=None):
        logs = {k: v for k, v in logs.items() if not k.endswith(CONFUSION_KEY)}
        if "loss" in logs:
            now = time.perf_counter()
            seen = self.state.global_step * self.plan.total
            if self._window is not None and now > self._window[0] and seen > self._window[1]:
                logs["images_per_sec"] = round((seen - self._window[1]) / (now - self._window[0]), 1)
            self._window = (now, seen)
        super().log(logs, start_time)


def _keys_are_its_own(model):
    from .models import FinetuneResNetForImageClassification

    return isinstance(model, FinetuneResNetForImageClassification)


def topk_of(cfg, num_classes):
    """The k values to report: the evaluators' and the head's (mmcls' head declares top-1 and
    top-5), and how many ranked classes that needs (never more than there are classes)."""
    ks = cfg.topk()
    return ks, min(max(ks), num_classes)
