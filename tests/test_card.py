"""Model card: license, environment, per-epoch table, one row for one split, LR curve, normalised matrix."""

import json
import os
from importlib import metadata

import pytest
import yaml

from hf_finetune.config import config_from_dict
from hf_finetune.hub.card import (ENVIRONMENT_FILE, learning_rates, normalised_rows, recipe_facts, same_split,
                                  write_environment, write_model_card)

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
