"""Recipe loading: mmengine merge rules, --cfg-options, validation and the CLI's errors."""

import json
import os
import subprocess
import sys

import pytest

from hf_finetune import load_recipe
from hf_finetune.errors import RecipeError
from hf_finetune.run import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR10 = os.path.join(REPO, "recipes", "cifar10.json")


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


MODEL_BASE = {
    "model": {
        "type": "ImageClassifier",
        "backbone": {"type": "ResNet", "depth": 50, "out_indices": [3], "style": "pytorch"},
        "head": {"type": "LinearClsHead", "num_classes": 1000, "topk": [1, 5],
                 "loss": {"type": "CrossEntropyLoss", "loss_weight": 1.0}},
    }
}
SCHEDULE_BASE = {
    "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.1, "momentum": 0.9,
                                    "weight_decay": 0.0001}},
    "param_scheduler": {"type": "MultiStepLR", "milestones": [100, 150], "gamma": 0.1},
}


# --- merge rules -----------------------------------------------------------------------------


def test_child_dict_merges_key_by_key_and_lists_replace_whole(tmp_path):
    write(tmp_path / "base" / "model.json", MODEL_BASE)
    child = write(tmp_path / "child.json", {
        "_base_": ["base/model.json"],
        "model": {"backbone": {"frozen_stages": 2}, "head": {"num_classes": 10, "topk": [1]}},
    })
    recipe = load_recipe(child)
    backbone = recipe["model"]["backbone"]
    assert backbone["frozen_stages"] == 2 and backbone["depth"] == 50  # merged
    assert recipe["model"]["head"]["num_classes"] == 10
    assert recipe["model"]["head"]["topk"] == [1]  # list replaced, not merged
    assert recipe["model"]["head"]["loss"] == {"type": "CrossEntropyLoss", "loss_weight": 1.0}


def test_delete_replaces_the_base_dict(tmp_path):
    write(tmp_path / "schedule.json", SCHEDULE_BASE)
    child = write(tmp_path / "child.json", {
        "_base_": "schedule.json",
        "optim_wrapper": {"optimizer": {"_delete_": True, "type": "AdamW", "lr": 0.001}},
    })
    optimizer = load_recipe(child)["optim_wrapper"]["optimizer"]
    assert optimizer == {"type": "AdamW", "lr": 0.001}


def test_without_delete_a_type_switch_keeps_base_keys_and_says_how_to_fix(tmp_path):
    write(tmp_path / "schedule.json", SCHEDULE_BASE)
    child = write(tmp_path / "child.json", {
        "_base_": "schedule.json",
        "optim_wrapper": {"optimizer": {"type": "AdamW", "lr": 0.001}},
    })
    with pytest.raises(RecipeError) as err:
        load_recipe(child)
    message = str(err.value)
    assert "optim_wrapper.optimizer.momentum" in message and "_delete_" in message


def test_bases_are_relative_to_the_including_file_and_recursive(tmp_path):
    write(tmp_path / "a" / "b" / "deep.json", {"log_level": "DEBUG"})
    write(tmp_path / "a" / "mid.json", {"_base_": ["b/deep.json"], "load_from": None})
    top = write(tmp_path / "top" / "recipe.json", {"_base_": ["../a/mid.json"], "resume": True})
    recipe = load_recipe(top)
    assert recipe == {"log_level": "DEBUG", "load_from": None, "resume": True}


def test_same_top_level_key_in_two_bases_is_an_error(tmp_path):
    write(tmp_path / "one.json", {"log_level": "INFO"})
    write(tmp_path / "two.json", {"log_level": "DEBUG"})
    child = write(tmp_path / "child.json", {"_base_": ["one.json", "two.json"]})
    with pytest.raises(RecipeError) as err:
        load_recipe(child)
    message = str(err.value)
    assert "log_level" in message and "one.json" in message and "two.json" in message


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.json", {"_base_": ["b.json"]})
    write(tmp_path / "b.json", {"_base_": ["a.json"]})
    with pytest.raises(RecipeError, match="cycle.*a.json -> .*b.json -> .*a.json"):
        load_recipe(str(tmp_path / "a.json"))


def test_missing_base_names_the_including_file(tmp_path):
    child = write(tmp_path / "child.json", {"_base_": ["nope/missing.json"]})
    with pytest.raises(RecipeError) as err:
        load_recipe(child)
    message = str(err.value)
    assert "missing.json" in message and "child.json" in message and "not found" in message


def test_malformed_json_reports_line_and_column(tmp_path):
    bad = write(tmp_path / "bad.json", '{\n  "log_level": "INFO",\n  "resume": tru\n}')
    with pytest.raises(RecipeError, match=r"bad\.json:3:\d+: malformed JSON"):
        load_recipe(bad)


# --- --cfg-options ----------------------------------------------------------------------------


def test_cfg_options_parse_json_values_strings_and_list_indices():
    recipe = load_recipe(CIFAR10, [
        "optim_wrapper.optimizer.lr=0.02",
        "train_dataloader.dataset.pipeline.0.padding=2",
        "model.backbone.norm_eval=true",
        "param_scheduler.milestones=[5,8]",
        "work_dir=runs/x",
        "training_args.bf16=true",
    ])
    assert recipe["optim_wrapper"]["optimizer"]["lr"] == 0.02
    assert recipe["train_dataloader"]["dataset"]["pipeline"][0]["padding"] == 2
    assert recipe["model"]["backbone"]["norm_eval"] is True
    assert recipe["param_scheduler"]["milestones"] == [5, 8]
    assert recipe["work_dir"] == "runs/x"
    assert recipe["training_args"] == {"bf16": True}


@pytest.mark.parametrize("option, expected", [
    ("optim_wrapper.optimizer.lr", "not KEY=VALUE"),
    ("train_dataloader.dataset.pipeline.9.padding=2", "index 9 out of range"),
    ("train_dataloader.dataset.pipeline.first.padding=2", "is a list"),
    ("optim_wrapper.optimizer.lr.scale=2", "has no key 'scale'"),
    ("model.backbone.frozen_stage=1", "did you mean 'frozen_stages'"),
    ("training_args.bf17=true", "did you mean 'bf16'"),
])
def test_bad_cfg_options_name_the_option(option, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe(CIFAR10, [option])
    assert expected in str(err.value)
    assert "--cfg-options" in str(err.value)


# --- validation ---------------------------------------------------------------------------------


def test_unknown_key_names_the_file_and_the_closest_key(tmp_path):
    write(tmp_path / "base.json", MODEL_BASE)
    child = write(tmp_path / "child.json",
                  {"_base_": ["base.json"], "model": {"backbone": {"frozen_stagse": 2}}})
    with pytest.raises(RecipeError) as err:
        load_recipe(child)
    message = str(err.value)
    assert message.startswith(os.path.relpath(child)) or message.startswith(child)
    assert "model.backbone.frozen_stagse" in message
    assert "did you mean 'frozen_stages'" in message


def test_unknown_top_level_section(tmp_path):
    bad = write(tmp_path / "r.json", {"optim_wraper": {}})
    with pytest.raises(RecipeError, match="did you mean 'optim_wrapper'"):
        load_recipe(bad)


def test_wrong_type_names_expected_and_found(tmp_path):
    write(tmp_path / "base.json", MODEL_BASE)
    child = write(tmp_path / "child.json",
                  {"_base_": ["base.json"], "model": {"head": {"num_classes": "ten"}}})
    with pytest.raises(RecipeError) as err:
        load_recipe(child)
    message = str(err.value)
    assert "child.json" in message and "model.head.num_classes" in message
    assert "expected an integer" in message and '"ten"' in message


def test_bool_is_not_accepted_as_a_number(tmp_path):
    bad = write(tmp_path / "r.json", {"train_cfg": {"max_epochs": True}})
    with pytest.raises(RecipeError, match="train_cfg.max_epochs: expected an integer"):
        load_recipe(bad)


@pytest.mark.parametrize("section, value, known", [
    ("optim_wrapper", {"optimizer": {"type": "SGDD", "lr": 0.1}}, "SGD"),
    ("param_scheduler", {"type": "CosineLR"}, "CosineAnnealingLR"),
    ("model", {"type": "ImageClassifier", "backbone": {"type": "ResNeXt"}}, "ResNet"),
    ("val_evaluator", {"type": "F1"}, "Accuracy"),
])
def test_unknown_type_lists_known_types(tmp_path, section, value, known):
    bad = write(tmp_path / "r.json", {section: value})
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)
    message = str(err.value)
    assert "unknown type" in message and known in message and "r.json" in message


def test_unknown_pipeline_step_and_argument(tmp_path):
    def recipe_with(step):
        return {"train_dataloader": {"dataset": {"type": "CIFAR10", "pipeline": [step]}}}

    bad = write(tmp_path / "a.json", recipe_with({"type": "RandomCorp", "crop_size": 32}))
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)
    assert "did you mean 'RandomCrop'" in str(err.value)
    assert "train_dataloader.dataset.pipeline.0.type" in str(err.value)

    bad = write(tmp_path / "b.json", recipe_with({"type": "RandomFlip", "probability": 0.5}))
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)
    assert "train_dataloader.dataset.pipeline.0.probability" in str(err.value)
    assert "prob" in str(err.value)


def test_tutorial_recipe_translates_key_for_key():
    recipe = load_recipe(CIFAR10)
    backbone = recipe["model"]["backbone"]
    assert backbone["depth"] == 50 and backbone["frozen_stages"] == 2
    assert backbone["init_cfg"]["prefix"] == "backbone"
    assert backbone["init_cfg"]["checkpoint"].endswith("resnet50_8xb32_in1k_20210831-ea4938fc.pth")
    assert recipe["model"]["head"]["num_classes"] == 10
    assert recipe["model"]["head"]["in_channels"] == 2048
    train_steps = [s["type"] for s in recipe["train_dataloader"]["dataset"]["pipeline"]]
    assert train_steps == ["RandomCrop", "RandomFlip", "Resize", "PackClsInputs"]
    for split in ("val_dataloader", "test_dataloader"):
        assert recipe[split]["dataset"]["pipeline"] == [
            {"type": "Resize", "scale": 224}, {"type": "PackClsInputs"}]
        assert recipe[split]["dataset"]["split"] == "test"
    assert recipe["optim_wrapper"]["optimizer"] == {
        "type": "SGD", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0001}
    assert recipe["param_scheduler"]["milestones"] == [15]
    assert recipe["train_cfg"]["max_epochs"] == 200 and recipe["train_cfg"]["total_batch_size"] == 128
    assert recipe["train_dataloader"]["batch_size"] == 16
    assert recipe["data_preprocessor"]["mean"] == [125.307, 122.961, 113.8575]


# --- the entry point -----------------------------------------------------------------------------


def test_print_recipe_prints_only_the_merged_json(capsys):
    assert main([CIFAR10, "--print-recipe", "--cfg-options", "train_cfg.max_epochs=3"]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out)
    assert printed["train_cfg"]["max_epochs"] == 3
    assert printed["work_dir"] == os.path.join("work_dirs", "cifar10")


def test_print_recipe_hides_the_hub_token(capsys):
    assert main([CIFAR10, "--print-recipe", "--cfg-options", "training_args.hub_token=hf_secret123"]) == 0
    assert "hf_secret123" not in capsys.readouterr().out


def test_cli_flags_fold_into_the_recipe(capsys, tmp_path):
    assert main([CIFAR10, "--print-recipe", "--data-root", str(tmp_path), "--work-dir",
                 str(tmp_path / "out"), "--auto-scale-lr"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for split in ("train_dataloader", "val_dataloader", "test_dataloader"):
        assert printed[split]["dataset"]["data_root"] == str(tmp_path)
    assert printed["work_dir"] == str(tmp_path / "out")
    assert printed["auto_scale_lr"]["enable"] is True


def test_bad_recipe_exits_2_with_one_line_and_no_traceback(tmp_path):
    bad = write(tmp_path / "r.json", {"_base_": [os.path.relpath(CIFAR10, tmp_path)],
                                      "model": {"head": {"num_clases": 10}}})
    proc = subprocess.run([sys.executable, "-m", "hf_finetune.run", bad],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "num_classes" in proc.stderr
    assert proc.stdout == ""


def test_run_py_works_as_a_script(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "hf_finetune", "run.py"), CIFAR10,
                           "--print-recipe"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"]["head"]["num_classes"] == 10
