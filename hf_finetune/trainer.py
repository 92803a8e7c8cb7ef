"""The Trainer subclass: whole-batch data loading, the recipe's optimizer and LR schedule,
a NaN guard, throughput in the logs, and the evaluation metrics."""

import math
import time

import torch
from transformers import Trainer

from .errors import TrainingError
from .optim import build_lr_scheduler, build_optimizer


class LossGuard:
    """Remembers the first update whose loss was NaN/inf without a device sync per step."""

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


class FinetuneTrainer(Trainer):
    """Trainer with whole-batch data loading, the recipe's optimizer and LR schedule.

    cfg: the Config; plan: the BatchPlan; datasets: the DatasetDict, whose splits are loaded
    as their dataloader sections say."""

    def __init__(self, *args, cfg, plan, datasets, batch_augments=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cfg = cfg
        self.plan = plan
        self.datasets = datasets
        self.batch_augments = batch_augments  # Mixup / CutMix, applied to training batches
        self.loss_guard = LossGuard()
        self._window = None  # (time, samples) at the last log, for images/s
        self._eval_loaders = {}

    def _section(self, dataset):
        splits = self.cfg.dataloaders()
        for split, ds in self.datasets.items():
            if ds is dataset:
                return splits[split]
        return splits.get("val") or splits["test"]

    # Data: the pipeline builds each batch tensor itself; the DataLoader only fetches it.
    def _loader(self, dataset, batch_size, shuffle, drop_last, train=False):
        from .data import build_dataloader  # datasets is imported only when data is needed

        section = self._section(dataset)
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
        )
        return self.accelerator.prepare(loader)

    def get_train_dataloader(self):
        loader = self._loader(self.train_dataset, self.args.per_device_train_batch_size,
                              self.cfg.train_dataloader.sampler.shuffle, self.args.dataloader_drop_last,
                              train=True)
        self.batches_per_epoch = len(loader)
        return loader

    def get_eval_dataloader(self, eval_dataset=None):
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if id(dataset) in self._eval_loaders:
            return self._eval_loaders[id(dataset)]
        loader = self._loader(dataset, self.args.per_device_eval_batch_size, False, False)
        if self._section(dataset).keep_workers():
            self._eval_loaders[id(dataset)] = loader
        return loader

    def get_test_dataloader(self, test_dataset):
        return self.get_eval_dataloader(test_dataset)

    # Optimisation as the recipe says.
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = build_optimizer(model or self.model, self.cfg.optim_wrapper, lr=self.plan.lr)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.batch_augments is not None and model.training:
            pixel_values, targets = self.batch_augments(inputs["pixel_values"], inputs["labels"])
            inputs = {**inputs, "pixel_values": pixel_values, "labels": targets}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "load_checkpoint"):  # EMAHook: the average and trained weights
                callback.load_checkpoint(resume_from_checkpoint, model or self.model)

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            batches = getattr(self, "batches_per_epoch", None) or len(self.get_train_dataloader())
            per_epoch = max(math.ceil(batches / self.args.gradient_accumulation_steps), 1)
            self.lr_scheduler = build_lr_scheduler(
                optimizer or self.optimizer, self.cfg.param_scheduler, per_epoch, num_training_steps
            )
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.loss_guard.update(loss, self.state.global_step)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # The Trainer computes the norm every update only to log it; without clipping, skip
        # that pass over every gradient on the updates that do not log.
        if grad_norm is None and not self._logs_next_update():
            return None
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _logs_next_update(self):
        step = self.state.global_step + 1
        every = self.args.logging_steps
        return (step == 1 and self.args.logging_first_step) or step >= self.state.max_steps or (
            every and step % every == 0)

    def floating_point_ops(self, inputs):
        # The Trainer would count the model's parameters again on every step.
        if not hasattr(self, "_params_for_flops"):
            self._params_for_flops = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs["pixel_values"].numel() * self._params_for_flops

    def log(self, logs, start_time=None):
        self.loss_guard.check()
        if "loss" in logs:
            now = time.perf_counter()
            seen = self.state.global_step * self.plan.total
            if self._window is not None and now > self._window[0] and seen > self._window[1]:
                logs["images_per_sec"] = round((seen - self._window[1]) / (now - self._window[0]), 1)
            self._window = (now, seen)
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        self.loss_guard.check()  # never write a checkpoint of NaN weights
        super()._save_checkpoint(model, trial)


def topk_of(cfg, num_classes):
    """The k values to report: the evaluators' and the head's (mmcls' head declares top-1 and
    top-5), and how many ranked classes that needs (never more than there are classes)."""
    ks = set()
    for topk in [cfg.model.head.topk] + [e.topk for e in cfg.val_evaluator + cfg.test_evaluator
                                         if e.type == "Accuracy"]:
        ks.update(topk if isinstance(topk, list) else [1] if topk is None else [topk])
    ks = sorted(ks)
    return ks, min(max(ks), num_classes)
