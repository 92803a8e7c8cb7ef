"""mmengine-style log lines, log file and scalars.json from a short real Trainer run."""

import json
import logging
import os
import re

import pytest
import torch
from torch import nn
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments

from hf_finetune import logs

TRAIN_LINE = re.compile(
    r"^Epoch\(train\) \[(\d+)\]\[ *(\d+)/(\d+)\]  lr: \d\.\d{4}e[-+]\d\d  eta: \d+:\d\d:\d\d  "
    r"time: \d+\.\d{4}  data_time: \d+\.\d{4}  loss: \d+\.\d{4}")
VAL_LINE = re.compile(r"^Epoch\(val\) \[(\d+)\]\[(\d+)/(\d+)\]  accuracy/top1: (\d+\.\d\d)  "
                      r"accuracy/top2: (\d+\.\d\d)  loss: \d+\.\d{4}  time: \d+\.\d{4}$")
TEST_LINE = re.compile(r"^Epoch\(test\) \[(\d+)/(\d+)\]  accuracy/top1: (\d+\.\d\d)")
FILE_PREFIX = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d - hf_finetune - (INFO|WARNING) - ")


class TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, pixel_values, labels=None):
        logits = self.linear(pixel_values)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Rows(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=generator)
        self.y = torch.randint(0, 3, (n,), generator=generator)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def top_k(eval_pred):
    logits, labels = torch.as_tensor(eval_pred.predictions), torch.as_tensor(eval_pred.label_ids)
    ranked = logits.topk(2, dim=-1).indices
    return {f"accuracy_top{k}": (ranked[:, :k] == labels[:, None]).any(-1).float().mean().item() for k in (1, 2)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """2 epochs of 5 updates (batch 4 over 20 rows), a log line every 2 updates, validation each epoch."""
    work_dir = str(tmp_path_factory.mktemp("logs"))
    args = TrainingArguments(output_dir=work_dir, per_device_train_batch_size=4, per_device_eval_batch_size=3,
                             num_train_epochs=2, learning_rate=0.05, logging_steps=2, eval_strategy="epoch",
                             save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=logs.progress_bars_disabled())
    trainer = Trainer(model=TinyClassifier(), args=args, train_dataset=Rows(20, 0), eval_dataset=Rows(7, 1),
                      compute_metrics=top_k)
    callback = logs.install(trainer, work_dir)
    # Under pytest stdout is not a terminal: no bars, and no dict lines from the Trainer either.
    assert not any(isinstance(cb, (PrinterCallback, ProgressCallback)) for cb in trainer.callback_handler.callbacks)
    printed = []
    original = logs.tqdm.write
    logs.tqdm.write = lambda line, file=None: printed.append(line)
    try:
        trainer.train()
        test_metrics = trainer.evaluate(metric_key_prefix="test")
        logging.getLogger("hf_finetune").warning("a package message")
    finally:
        logs.tqdm.write = original
        callback.close()
    return callback, printed, trainer.state.log_history, test_metrics


def test_train_lines_at_the_logging_interval(run):
    _, printed, history, _ = run
    train = [TRAIN_LINE.match(line) for line in printed if line.startswith("Epoch(train)")]
    assert all(train), printed
    # global steps 2, 4, 6, 8, 10 -> epoch 1 iters 2 and 4, epoch 2 iters 1, 3, 5 of 5
    assert [(int(m[1]), int(m[2]), int(m[3])) for m in train] == [(1, 2, 5), (1, 4, 5), (2, 1, 5), (2, 3, 5), (2, 5, 5)]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert [float(re.search(r"loss: (\S+)", m[0])[1]) for m in train] == pytest.approx(losses, abs=1e-4)


def test_val_and_test_lines_in_percent(run):
    _, printed, history, test_metrics = run
    val = [VAL_LINE.match(line) for line in printed if line.startswith("Epoch(val)")]
    assert all(val) and len(val) == 2, printed
    assert [(int(m[1]), int(m[2]), int(m[3])) for m in val] == [(1, 3, 3), (2, 3, 3)]  # 7 rows, batches of 3
    evals = [entry for entry in history if "eval_accuracy_top1" in entry]
    assert [float(m[4]) for m in val] == pytest.approx([100 * e["eval_accuracy_top1"] for e in evals], abs=0.005)
    test = [TEST_LINE.match(line) for line in printed if line.startswith("Epoch(test)")]
    assert len(test) == 1 and test[0] and float(test[0][3]) == pytest.approx(100 * test_metrics["test_accuracy_top1"],
                                                                             abs=0.005)


def test_log_file_holds_the_lines_and_package_messages(run):
    callback, printed, _, _ = run
    assert re.fullmatch(r"\d{8}_\d{6}", callback.timestamp)
    assert os.path.basename(callback.log_dir) == callback.timestamp
    assert callback.log_file == os.path.join(callback.log_dir, callback.timestamp + ".log")
    assert callback.scalars_file == os.path.join(callback.log_dir, "vis_data", "scalars.json")
    with open(callback.log_file) as handle:
        lines = handle.read().splitlines()
    assert all(FILE_PREFIX.match(line) for line in lines)
    assert [FILE_PREFIX.sub("", line) for line in lines] == printed + ["a package message"]


def test_scalars_json_one_object_per_line(run):
    callback, _, history, _ = run
    with open(callback.scalars_file) as handle:
        records = [json.loads(line) for line in handle]
    train = [r for r in records if "lr" in r]
    assert [(r["epoch"], r["iter"], r["step"]) for r in train] == [(1, 2, 2), (1, 4, 4), (2, 6, 6), (2, 8, 8),
                                                                   (2, 10, 10)]
    assert [r["lr"] for r in train] == [e["learning_rate"] for e in history if "learning_rate" in e]
    assert all(r["time"] >= r["data_time"] >= 0 for r in train)
    val = [r for r in records if "accuracy/top1" in r]
    assert [r["step"] for r in val] == [1, 2]  # validations only: test results are not a curve (as mmengine)
    assert all(0 <= r["accuracy/top1"] <= r["accuracy/top2"] <= 100 for r in val)


def test_progress_bars_follow_the_terminal(monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert logs.progress_bars_disabled() is False
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert logs.progress_bars_disabled() is True


# --------------------------------------------------------------------------- visualizer -> report_to
def test_visualizer_backends_map_to_trainer_integrations():
    from hf_finetune.config import config_from_dict, report_to
    from hf_finetune.errors import RecipeError

    def cfg(*backends):
        return config_from_dict({"model": {"head": {"num_classes": 10}},
                                 "visualizer": {"type": "UniversalVisualizer",
                                                "vis_backends": [{"type": b} for b in backends]}})

    assert report_to(cfg("LocalVisBackend")) == "none"
    assert report_to(cfg("LocalVisBackend", "TensorboardVisBackend")) == ["tensorboard"]
    assert report_to(cfg("WandbVisBackend", "MLflowVisBackend")) == ["mlflow", "wandb"]
    with pytest.raises(RecipeError, match="did you mean 'TensorboardVisBackend'"):
        cfg("TensorbordVisBackend")


def test_a_missing_integration_is_one_line_naming_what_to_install():
    from transformers.integrations import is_tensorboard_available

    from hf_finetune.errors import RecipeError
    from hf_finetune.training import check_integrations

    check_integrations("none")
    if is_tensorboard_available():
        pytest.skip("tensorboard is installed here")
    with pytest.raises(RecipeError, match=r'pip install "hf_finetune\[tensorboard\]"'):
        check_integrations(["tensorboard"])
