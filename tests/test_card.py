"""Model card: license, environment, per-epoch table, one row for one split, LR curve, normalised matrix."""

import json
import os
from importlib import metadata

import numpy as np
import pytest
import yaml

from hf_finetune.config import config_from_dict
from hf_finetune.hub.card import (ENVIRONMENT_FILE, MAX_CONFUSION_CLASSES, learning_rates, most_confused,
                                  normalised_rows, plot_confusion_matrix, recipe_facts, same_split, write_environment,
                                  write_model_card)

pytestmark = pytest.mark.floors  # every test here also runs at the declared floors (.ci/floors)

HISTORY = [
    {"loss": 2.3, "learning_rate": 0.01, "epoch": 0.5, "step": 1},
    {"loss": 2.2, "learning_rate": 0.01, "epoch": 1.0, "step": 2},
    {"eval_loss": 2.25, "eval_accuracy_top1": 0.2, "eval_accuracy_top5": 0.6, "epoch": 1.0, "step": 2},
    {"loss": 2.0, "learning_rate": 0.001, "epoch": 1.5, "step": 3},
    {"loss": 1.9, "learning_rate": 0.001, "epoch": 2.0, "step": 4},
    {"eval_loss": 2.1, "eval_accuracy_top1": 0.3125, "eval_accuracy_top5": 0.8, "epoch": 2.0, "step": 4},
    {"train_loss": 2.05, "train_runtime": 3723.4, "epoch": 2.0, "step": 4},
]
RESULTS = {"train_runtime": 3723.4, "eval_accuracy_top1": 0.3125, "eval_accuracy_top5": 0.8,
           "test_accuracy_top1": 0.3125, "test_accuracy_top5": 0.8}


def recipe(val_split="test"):
    def loader(split):
        return {"dataset": {"type": "CIFAR10", "split": split, "pipeline": [{"type": "PackClsInputs"}]}}

    return {"model": {"backbone": {"depth": 18}, "head": {"num_classes": 3}},
            "train_dataloader": loader("train"), "val_dataloader": loader(val_split), "test_dataloader": loader("test"),
            "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.1}},
            "train_cfg": {"max_epochs": 2, "total_batch_size": 8}}


def work_dir(tmp_path, val_split="test", results=RESULTS, environment=True):
    files = {"recipe.json": recipe(val_split), "config.json": {"depth": 18, "num_labels": 3},
             "all_results.json": results, "trainer_state.json": {"log_history": HISTORY},
             "confusion_matrix.json": {"labels": ["a", "b", "c"], "matrix": [[3, 1, 0], [0, 0, 0], [2, 2, 4]]}}
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    if environment:
        write_environment(str(tmp_path), num_processes=2)
    return str(tmp_path)


def read_card(path):
    text = open(path, encoding="utf-8").read()
    return yaml.safe_load(text.split("---\n")[1]), text


def evaluation_rows(text):
    section = text.split("## Evaluation")[1].split("\n\n")[1]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| split")]


def test_one_row_when_validation_reads_the_test_split(tmp_path):
    meta, text = read_card(write_model_card(work_dir(tmp_path)))
    assert evaluation_rows(text) == ["| test (split `test`) | 31.25 | 80.00 |"]
    assert "same split" in text


def test_two_rows_when_validation_is_its_own_split(tmp_path):
    results = dict(RESULTS, eval_accuracy_top1=0.5)
    _, text = read_card(write_model_card(work_dir(tmp_path, val_split="validation", results=results)))
    assert evaluation_rows(text) == ["| test (split `test`) | 31.25 | 80.00 |",
                                     "| validation (split `validation`) | 50.00 | 80.00 |"]
    assert "same split" not in text


def test_same_split_looks_at_the_images_not_the_pipeline():
    facts = recipe_facts(config_from_dict(recipe()), {})
    assert same_split(facts)
    other = recipe()
    other["val_dataloader"]["dataset"]["indices"] = 100  # a subset is other images
    assert not same_split(recipe_facts(config_from_dict(other), {}))
    default = recipe()
    del default["val_dataloader"]["dataset"]["split"]  # the loader's default split for validation is test
    assert same_split(recipe_facts(config_from_dict(default), {}))


def test_per_epoch_table_in_percent(tmp_path):
    _, text = read_card(write_model_card(work_dir(tmp_path)))
    table = text.split("Per validation during training:")[1].split("##")[0].strip().splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[:4] == ["Training Loss", "Epoch", "Step", "Validation Loss"]
    assert {"Top-1 Accuracy (%)", "Top-5 Accuracy (%)"} <= set(header)
    evals = [entry for entry in HISTORY if "eval_loss" in entry]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in table[2:]]
    assert len(rows) == len(evals)
    for row, entry in zip(rows, evals):
        assert float(row["Top-1 Accuracy (%)"]) == pytest.approx(100 * entry["eval_accuracy_top1"], abs=0.01)
        assert float(row["Validation Loss"]) == entry["eval_loss"] and int(row["Step"]) == entry["step"]


def test_license_environment_and_wall_time(tmp_path):
    meta, text = read_card(write_model_card(work_dir(tmp_path), license="apache-2.0"))
    assert meta["license"] == "apache-2.0" and "License: `apache-2.0`" in text
    environment = json.loads((tmp_path / ENVIRONMENT_FILE).read_text())
    assert environment["versions"]["torch"] == metadata.version("torch")
    assert environment["hardware"]["processes"] == 2
    for name in ("torch", "transformers", "datasets", "accelerate"):
        assert f"{name} {metadata.version(name)}" in text
    assert f"2 x {environment['hardware']['device']}" in text
    assert "training wall time: 1:02:03" in text  # 3723.4 s


def test_license_from_the_recipe(tmp_path):
    directory = work_dir(tmp_path)
    with_license = dict(recipe(), model_card={"license": "mit"})
    (tmp_path / "recipe.json").write_text(json.dumps(with_license))
    meta, text = read_card(write_model_card(directory))
    assert meta["license"] == "mit" and "License: `mit`" in text


def test_no_license_and_no_environment_are_said(tmp_path):
    meta, text = read_card(write_model_card(work_dir(tmp_path, environment=False)))
    assert "license" not in meta and "License: not stated" in text
    assert f"hardware and framework versions: not recorded ({ENVIRONMENT_FILE} missing)" in text


def test_learning_rate_curve_and_normalised_matrix(tmp_path):
    epochs, rates = learning_rates(HISTORY)
    assert rates == [e["learning_rate"] for e in HISTORY if "learning_rate" in e]
    assert epochs == [e["epoch"] for e in HISTORY if "learning_rate" in e]
    write_model_card(work_dir(tmp_path))
    for png in ("training_curves.png", "confusion_matrix.png"):
        assert os.path.getsize(tmp_path / png) > 1000

    rows = normalised_rows([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    assert rows[0] == [0.75, 0.25, 0.0] and rows[1] == [0.0, 0.0, 0.0] and sum(rows[2]) == pytest.approx(1.0)


def test_multi_label_results_are_tabled_and_in_the_model_index(tmp_path):
    results = {"train_runtime": 12.0, "test_multilabel/mAP": 0.9277, "test_multilabel/f1-score": 0.8822}
    metadata, text = read_card(write_model_card(work_dir(tmp_path, results=results)))
    assert "| test (split `test`) | 88.22 | 92.77 |" in text
    metrics = {m["type"]: m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"f1-score": 0.8822, "mAP": 0.9277}


def test_single_label_metric_results_counts_and_per_class_table(tmp_path):
    results = dict(RESULTS, **{"test_single-label/f1-score": 0.5, "test_single-label/support": 16,
                               "test_single-label/precision_classwise": [0.5, 0.0, 1.0],
                               "test_single-label/support_classwise": [4, 0, 12]})
    history = HISTORY[:2] + [dict(HISTORY[2], **{"eval_single-label/precision_classwise": [0.1, 0.2, 0.3]})] + HISTORY[3:]
    directory = work_dir(tmp_path, results=results)
    (tmp_path / "config.json").write_text(json.dumps({"depth": 18, "num_labels": 3,
                                                      "id2label": {"0": "cat", "1": "dog", "2": "ship"}}))
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    metadata, text = read_card(write_model_card(directory))
    assert "| split | top-1 accuracy (%) | top-5 accuracy (%) | f1-score (%) | support |" in text
    assert evaluation_rows(text)[0] == "| test (split `test`) | 31.25 | 80.00 | 50.00 | 16 |"
    per_class = text.split("Per class (test):")[1].split("\n\n")[1].splitlines()
    assert per_class == ["| class | precision (%) | support |", "|---|---|---|",
                         "| cat | 50.00 | 4 |", "| dog | 0.00 | 0 |", "| ship | 100.00 | 12 |"]
    # A count is no quality metric for the model index; per-class lists stay out of the per-epoch table.
    types = {m["type"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert types == {"accuracy", "f1-score"}
    assert "0.1, 0.2" not in text.split("Per validation during training:")[1]


def test_the_confusion_figure_of_1000_classes_shows_the_most_confused(tmp_path):
    import time

    from PIL import Image

    rng = np.random.default_rng(0)
    classes = 1000
    matrix = np.diag(rng.integers(20, 50, classes))
    confused = [7, 123, 500, 998]  # 40 of their images predicted as 40 other classes
    for c in confused:
        matrix[c, rng.choice(np.delete(np.arange(classes), c), 40, replace=False)] += 1
    matrix[rng.integers(0, classes, 300), rng.integers(0, classes, 300)] += 1  # a little noise
    assert set(most_confused(matrix)[:4]) == set(confused)
    assert most_confused(matrix[:5, :5]) == [0, 1, 2, 3, 4]  # few classes: all, in order
    confusion = {"split": "test", "labels": [f"a rather long class name number {i}" for i in range(classes)],
                 "matrix": matrix.tolist()}
    start = time.perf_counter()
    assert plot_confusion_matrix(confusion, str(tmp_path / "matrix.png")) == MAX_CONFUSION_CLASSES
    assert time.perf_counter() - start < 60
    with Image.open(tmp_path / "matrix.png") as image:
        assert max(image.size) <= 100 * (0.5 * MAX_CONFUSION_CLASSES + 2)  # inches at 100 dpi
    assert os.path.getsize(tmp_path / "matrix.png") < 500_000

    directory = work_dir(tmp_path)
    (tmp_path / "confusion_matrix.json").write_text(json.dumps(confusion))
    _, text = read_card(write_model_card(directory))
    assert f"The {MAX_CONFUSION_CLASSES} of 1000 classes most often confused" in text
