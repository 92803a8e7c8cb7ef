"""Training logs as mmengine writes them, on the terminal and in the work dir.

    Epoch(train)  [1][ 50/391]  lr: 1.0000e-02  eta: 0:12:31  time: 0.1234  data_time: 0.0012  loss: 0.5432
    Epoch(val) [1][79/79]  accuracy/top1: 85.16  accuracy/top5: 99.10

The same lines go to <work_dir>/<YYYYmmdd_HHMMSS>/<YYYYmmdd_HHMMSS>.log (with the package's
other log messages) and the scalars to .../vis_data/scalars.json, one JSON object per line:
mmengine's layout, so tools that read mmengine logs read these.

How time is measured (mmengine's IterTimerHook, mapped onto Trainer events): the Trainer
fetches an update's batches, then calls on_step_begin, computes, calls on_step_end, then
logs / evaluates / saves. An iteration starts when the previous one ended (on_step_end,
or the end of an evaluation or save that followed it, or the start of the epoch), so
`data_time` = on_step_begin - that start, and `time` = on_step_end - that start (data
included, as in mmengine). Both are averaged over the logging window; `eta` uses the
average over the whole run. On CUDA the step is asynchronous: as in mmengine, `time` is
exact at logging steps (the loss is read there) and spread over the window otherwise.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import sys
import time

import torch
from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from transformers.trainer_utils import has_length

from .metrics import TOPK_KEY, mmpretrain_name

LOG_FORMAT = "%(asctime)s - hf_finetune - %(levelname)s - %(message)s"
DATE_FORMAT = "%Y/%m/%d %H:%M:%S"
# Trainer log keys shown elsewhere in the line, or not per-iteration values.
TRAIN_SKIPPED = {"loss", "learning_rate", "epoch", "total_flos"}
EVAL_SKIPPED = {"runtime", "samples_per_second", "steps_per_second", "epoch"}


def progress_bars_disabled() -> bool:
    """TrainingArguments.disable_tqdm: bars only on a terminal, so a redirected log holds lines, not '\\r'."""
    return not sys.stdout.isatty()


def _eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def _number(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4f}"


class MMEngineLogger(TrainerCallback):
    """Prints and writes mmengine-style lines at each logging step and each evaluation (main process only)."""

    def __init__(self, work_dir: str, timestamp: str | None = None):
        self.timestamp = timestamp or time.strftime("%Y%m%d_%H%M%S")
        self.log_dir = os.path.join(str(work_dir), self.timestamp)
        self.log_file = os.path.join(self.log_dir, f"{self.timestamp}.log")
        self.scalars_file = os.path.join(self.log_dir, "vis_data", "scalars.json")
        self._handler = None
        self._steps_per_epoch = None
        self._iteration_start = None
        self._data_time = 0.0
        self._window = []  # (time, data_time) of the iterations since the last log line
        self._run_seconds, self._run_iterations = 0.0, 0

    # ------------------------------------------------------------ output
    def _open(self):
        """Create the log dir on first use, and send the package's log messages there too."""
        os.makedirs(os.path.dirname(self.scalars_file), exist_ok=True)
        self._handler = logging.FileHandler(self.log_file, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
        logging.getLogger("hf_finetune").addHandler(self._handler)
        self._file_logger = logging.getLogger(f"hf_finetune.log.{id(self)}")
        self._file_logger.propagate = False
        self._file_logger.setLevel(logging.INFO)
        self._file_logger.addHandler(self._handler)

    def write(self, line: str, scalars: dict | None) -> None:
        if self._handler is None:
            self._open()
        tqdm.write(line, file=sys.stdout)  # above any progress bar, not through it
        self._file_logger.info(line)
        if scalars is not None:
            with open(self.scalars_file, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(scalars) + "\n")

    def close(self) -> None:
        """Stop writing the package's log messages to the file (the file stays)."""
        if self._handler is not None:
            logging.getLogger("hf_finetune").removeHandler(self._handler)
            self._file_logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None

    # ------------------------------------------------------------ timing
    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if train_dataloader is not None and args.max_steps <= 0:
            self._steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._iteration_start = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self._data_time = now - (self._iteration_start or now)

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        seconds = now - (self._iteration_start or now)
        self._window.append((seconds, self._data_time))
        self._run_seconds += seconds
        self._run_iterations += 1
        self._iteration_start = now

    def on_save(self, args, state, control, **kwargs):
        self._iteration_start = time.perf_counter()  # a save is no part of the next iteration's data time

    # ------------------------------------------------------------ lines
    def _epoch_and_iter(self, args, state) -> str:
        step = state.global_step
        if args.max_steps > 0 or not self._steps_per_epoch:
            return f"Iter(train) [{step:>{len(str(state.max_steps))}}/{state.max_steps}]"
        per_epoch = self._steps_per_epoch
        epoch, inner = (step - 1) // per_epoch + 1, (step - 1) % per_epoch + 1
        return f"Epoch(train) [{epoch}][{inner:>{len(str(per_epoch))}}/{per_epoch}]"

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return  # evaluation logs are written by on_evaluate; the final summary is not a step
        window, self._window = self._window or [(0.0, 0.0)], []
        mean_time = sum(t for t, _ in window) / len(window)
        mean_data = sum(d for _, d in window) / len(window)
        average = self._run_seconds / max(self._run_iterations, 1)
        scalars = {"lr": logs.get("learning_rate"), "data_time": mean_data, "time": mean_time}
        parts = [self._epoch_and_iter(args, state)]
        if "learning_rate" in logs:
            parts.append(f"lr: {logs['learning_rate']:.4e}")
        parts += [f"eta: {_eta(average * (state.max_steps - state.global_step))}",
                  f"time: {mean_time:.4f}", f"data_time: {mean_data:.4f}"]
        if torch.cuda.is_available():
            scalars["memory"] = int(torch.cuda.max_memory_allocated() / 2**20)
            parts.append(f"memory: {scalars['memory']}")
            torch.cuda.reset_peak_memory_stats()
        parts.append(f"loss: {logs['loss']:.4f}")
        scalars["loss"] = logs["loss"]
        for key, value in logs.items():
            if key not in TRAIN_SKIPPED and isinstance(value, (int, float)):
                parts.append(f"{key}: {_number(value)}")
                scalars[key] = value
        if self._steps_per_epoch and args.max_steps <= 0:
            scalars["epoch"] = (state.global_step - 1) // self._steps_per_epoch + 1
        scalars.update(iter=state.global_step, step=state.global_step)
        self.write("  ".join(parts), {k: v for k, v in scalars.items() if v is not None})

    def on_evaluate(self, args, state, control, metrics=None, eval_dataloader=None, **kwargs):
        self._iteration_start = time.perf_counter()  # evaluation time is no part of the next iteration
        if not state.is_world_process_zero or not metrics:
            return
        prefix = next((key[:-len("_runtime")] for key in metrics if key.endswith("_runtime")), "eval")
        mode = "val" if prefix == "eval" else prefix
        # A streamed split has no length (shown as ?): it is read to its end.
        batches = len(eval_dataloader) if eval_dataloader is not None and has_length(eval_dataloader) else 0
        shown = batches or "?"
        epoch = max(1, math.ceil(round(state.epoch or 0, 6)))
        if mode == "val" and self._steps_per_epoch and args.max_steps <= 0:
            head = f"Epoch({mode}) [{epoch}][{shown}/{shown}]"
        else:
            head = f"{'Epoch' if args.max_steps <= 0 else 'Iter'}({mode}) [{shown}/{shown}]"
        accuracies, others, scalars = [], [], {}
        for key, value in metrics.items():
            name = key[len(prefix) + 1:] if key.startswith(prefix + "_") else key
            if name in EVAL_SKIPPED or not isinstance(value, (int, float)):
                continue
            if TOPK_KEY.match(name):
                name, value = mmpretrain_name(name), 100 * value
                accuracies.append(f"{name}: {value:.2f}")
            else:
                others.append(f"{name}: {_number(value)}")
            scalars[name] = value
        parts = [head] + accuracies + others
        if batches and f"{prefix}_runtime" in metrics:
            scalars["time"] = metrics[f"{prefix}_runtime"] / batches
            parts.append(f"time: {scalars['time']:.4f}")
        scalars["step"] = epoch if self._steps_per_epoch and args.max_steps <= 0 else state.global_step
        self.write("  ".join(parts), scalars if mode == "val" else None)  # as mmengine: curves of validation only


class QuietProgressCallback(ProgressCallback):
    """The Trainer's progress bars without the metrics dicts they print at each log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def install(trainer, work_dir: str, *, dict_lines: bool = False) -> MMEngineLogger:
    """Put mmengine-style logging on a Trainer; dict_lines keeps the Trainer's own dict lines (log_level debug)."""
    if not dict_lines:
        trainer.remove_callback(PrinterCallback)
        if trainer.pop_callback(ProgressCallback) is not None:
            trainer.add_callback(QuietProgressCallback)
    callback = MMEngineLogger(work_dir)
    trainer.add_callback(callback)
    return callback
