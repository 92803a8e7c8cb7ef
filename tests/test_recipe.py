"""Recipe loading: mmengine merge rules, --cfg-options, validation and the CLI's errors."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from hf_finetune.config import (AdamWCfg, Config, SGDCfg, config_from_dict, load_config,
                                read_config)
from hf_finetune.errors import RecipeError
from hf_finetune.recipe import load_recipe
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
SMOKE = os.path.join(REPO, "recipes", "cifar10_smoke.json")


def merged(path, cfg_options=None):
    """The merged recipe dict, before typing."""
    return load_recipe(path, cfg_options)[0]


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
    recipe = merged(child)
    backbone = recipe["model"]["backbone"]
    assert backbone["frozen_stages"] == 2 and backbone["depth"] == 50  # merged
    assert recipe["model"]["head"]["num_classes"] == 10
    assert recipe["model"]["head"]["topk"] == [1]  # list replaced, not merged
    assert recipe["model"]["head"]["loss"] == {"type": "CrossEntropyLoss", "loss_weight": 1.0}
    cfg = load_config(child)
    assert cfg.model.backbone.frozen_stages == 2 and cfg.model.backbone.depth == 50
    assert cfg.model.head.num_classes == 10 and cfg.model.head.topk == [1]


def test_delete_replaces_the_base_dict(tmp_path):
    write(tmp_path / "schedule.json", {**MODEL_BASE, **SCHEDULE_BASE})
    child = write(tmp_path / "child.json", {
        "_base_": "schedule.json",
        "optim_wrapper": {"optimizer": {"_delete_": True, "type": "AdamW", "lr": 0.001}},
    })
    optimizer = merged(child)["optim_wrapper"]["optimizer"]
    assert optimizer == {"type": "AdamW", "lr": 0.001}
    assert load_config(child).optim_wrapper.optimizer == AdamWCfg(lr=0.001)


def test_without_delete_a_type_switch_keeps_base_keys_and_says_how_to_fix(tmp_path):
    write(tmp_path / "schedule.json", {**MODEL_BASE, **SCHEDULE_BASE})
    child = write(tmp_path / "child.json", {
        "_base_": "schedule.json",
        "optim_wrapper": {"optimizer": {"type": "AdamW", "lr": 0.001}},
    })
    with pytest.raises(RecipeError) as err:
        load_config(child)
    message = str(err.value)
    assert "optim_wrapper.optimizer.momentum" in message and "_delete_" in message


def test_bases_are_relative_to_the_including_file_and_recursive(tmp_path):
    write(tmp_path / "a" / "b" / "deep.json", {"log_level": "DEBUG"})
    write(tmp_path / "a" / "mid.json", {"_base_": ["b/deep.json"], "load_from": None})
    top = write(tmp_path / "top" / "recipe.json", {"_base_": ["../a/mid.json"], "resume": True})
    recipe = merged(top)
    assert recipe == {"log_level": "DEBUG", "load_from": None, "resume": True}


def test_same_top_level_key_in_two_bases_is_an_error(tmp_path):
    write(tmp_path / "one.json", {"log_level": "INFO"})
    write(tmp_path / "two.json", {"log_level": "DEBUG"})
    child = write(tmp_path / "child.json", {"_base_": ["one.json", "two.json"]})
    with pytest.raises(RecipeError) as err:
        load_config(child)
    message = str(err.value)
    assert "log_level" in message and "one.json" in message and "two.json" in message


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.json", {"_base_": ["b.json"]})
    write(tmp_path / "b.json", {"_base_": ["a.json"]})
    with pytest.raises(RecipeError, match="cycle.*a.json -> .*b.json -> .*a.json"):
        load_config(str(tmp_path / "a.json"))


def test_missing_base_names_the_including_file(tmp_path):
    child = write(tmp_path / "child.json", {"_base_": ["nope/missing.json"]})
    with pytest.raises(RecipeError) as err:
        load_config(child)
    message = str(err.value)
    assert "missing.json" in message and "child.json" in message and "not found" in message


def test_malformed_json_reports_line_and_column(tmp_path):
    bad = write(tmp_path / "bad.json", '{\n  "log_level": "INFO",\n  "resume": tru\n}')
    with pytest.raises(RecipeError, match=r"bad\.json:3:\d+: malformed JSON"):
        load_config(bad)


# --- --cfg-options ----------------------------------------------------------------------------


def test_cfg_options_parse_json_values_strings_and_list_indices():
    cfg = load_config(CIFAR10, [
        "optim_wrapper.optimizer.lr=0.02",
        "train_dataloader.dataset.pipeline.0.padding=2",
        "model.backbone.norm_eval=true",
        "param_scheduler.milestones=[5,8]",
        "work_dir=runs/x",
        "training_args.bf16=true",
    ])
    assert cfg.optim_wrapper.optimizer.lr == 0.02
    crop = cfg.train_dataloader.dataset.pipeline[0]
    assert crop.args["padding"] == 2 and crop.op.padding == (2, 2, 2, 2)
    assert cfg.model.backbone.norm_eval is True
    assert cfg.param_scheduler[0].milestones == [5, 8]
    assert cfg.work_dir == "runs/x"
    assert cfg.training_args == {"bf16": True}


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
        load_config(CIFAR10, [option])
    assert expected in str(err.value)
    assert "--cfg-options" in str(err.value)


# --- validation ---------------------------------------------------------------------------------


def with_model(**sections):
    """A recipe that sets a model, so checking reaches the sections under test."""
    return {**MODEL_BASE, **sections}


def test_unknown_key_names_the_file_and_the_closest_key(tmp_path):
    write(tmp_path / "base.json", MODEL_BASE)
    child = write(tmp_path / "child.json",
                  {"_base_": ["base.json"], "model": {"backbone": {"frozen_stagse": 2}}})
    with pytest.raises(RecipeError) as err:
        load_config(child)
    message = str(err.value)
    assert message.startswith(os.path.relpath(child)) or message.startswith(child)
    assert "model.backbone.frozen_stagse" in message
    assert "did you mean 'frozen_stages'" in message


def test_unknown_top_level_section(tmp_path):
    bad = write(tmp_path / "r.json", with_model(optim_wraper={}))
    with pytest.raises(RecipeError, match="did you mean 'optim_wrapper'"):
        load_config(bad)


def test_missing_model_names_the_file(tmp_path):
    bad = write(tmp_path / "r.json", {"log_level": "INFO"})
    with pytest.raises(RecipeError) as err:
        load_config(bad)
    assert "r.json" in str(err.value) and "model" in str(err.value)


def test_wrong_type_names_expected_and_found(tmp_path):
    write(tmp_path / "base.json", MODEL_BASE)
    child = write(tmp_path / "child.json",
                  {"_base_": ["base.json"], "model": {"head": {"num_classes": "ten"}}})
    with pytest.raises(RecipeError) as err:
        load_config(child)
    message = str(err.value)
    assert "child.json" in message and "model.head.num_classes" in message
    assert "expected an integer" in message and "'ten'" in message


def test_bool_is_not_accepted_as_a_number(tmp_path):
    bad = write(tmp_path / "r.json", with_model(train_cfg={"max_epochs": True}))
    with pytest.raises(RecipeError, match="train_cfg.max_epochs: expected an integer"):
        load_config(bad)


@pytest.mark.parametrize("section, value, key, bad_type, known", [
    ("optim_wrapper", {"optimizer": {"type": "SGDD", "lr": 0.1}}, "optim_wrapper.optimizer.type",
     "SGDD", "SGD"),
    ("param_scheduler", {"type": "CosineLR"}, "param_scheduler.0.type", "CosineLR",
     "CosineAnnealingLR"),
    ("model", {"type": "ImageClassifier", "backbone": {"type": "ResNeXt"},
               "head": {"num_classes": 10}}, "model.backbone.type", "ResNeXt", "ResNet"),
    ("val_evaluator", {"type": "F1"}, "val_evaluator.0.type", "F1", "Accuracy"),
])
def test_unknown_type_lists_known_types(tmp_path, section, value, key, bad_type, known):
    bad = write(tmp_path / "r.json", with_model(**{section: value}))
    with pytest.raises(RecipeError) as err:
        load_config(bad)
    message = str(err.value)
    assert "unknown type" in message or "is not allowed" in message
    assert key in message and f"'{bad_type}'" in message
    assert known in message and "r.json" in message


def test_unknown_pipeline_step_and_argument(tmp_path):
    def recipe_with(step):
        return with_model(train_dataloader={"dataset": {"type": "CIFAR10", "pipeline": [step]}})

    bad = write(tmp_path / "a.json", recipe_with({"type": "RandomCorp", "crop_size": 32}))
    with pytest.raises(RecipeError) as err:
        load_config(bad)
    assert "did you mean 'RandomCrop'" in str(err.value)
    assert "train_dataloader.dataset.pipeline.0.type" in str(err.value)

    bad = write(tmp_path / "b.json", recipe_with({"type": "RandomFlip", "probability": 0.5}))
    with pytest.raises(RecipeError) as err:
        load_config(bad)
    assert "train_dataloader.dataset.pipeline.0.probability" in str(err.value)
    assert "prob" in str(err.value)


def test_tutorial_recipe_translates_key_for_key():
    cfg = load_config(CIFAR10)
    backbone = cfg.model.backbone
    assert backbone.depth == 50 and backbone.frozen_stages == 2
    assert backbone.init_cfg.prefix == "backbone"
    assert backbone.init_cfg.checkpoint.endswith("resnet50_8xb32_in1k_20210831-ea4938fc.pth")
    assert cfg.model.head.num_classes == 10
    assert cfg.model.head.in_channels == 2048
    train_steps = [s.type for s in cfg.train_dataloader.dataset.pipeline]
    assert train_steps == ["RandomCrop", "RandomFlip", "Resize", "PackClsInputs"]
    for split in (cfg.val_dataloader, cfg.test_dataloader):
        assert [s.to_dict() for s in split.dataset.pipeline] == [
            {"type": "Resize", "scale": 224}, {"type": "PackClsInputs"}]
        assert split.dataset.split == "test"
    assert merged(CIFAR10)["optim_wrapper"]["optimizer"] == {
        "type": "SGD", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0001}
    assert cfg.optim_wrapper.optimizer == SGDCfg(lr=0.01, momentum=0.9, weight_decay=0.0001)
    assert cfg.param_scheduler[0].milestones == [15]
    assert cfg.train_cfg.max_epochs == 200 and cfg.train_cfg.total_batch_size == 128
    assert cfg.train_dataloader.batch_size == 16
    assert cfg.data_preprocessor.mean == [125.307, 122.961, 113.8575]


@pytest.mark.parametrize("key, value, accepted", [
    ("train_cfg.max_epochs", 0, ">= 1"),
    ("train_cfg.max_epochs", -1, ">= 1"),
    ("train_dataloader.batch_size", 0, ">= 1"),
    ("train_dataloader.num_workers", -1, ">= 0"),
    ("optim_wrapper.optimizer.lr", 0, "> 0"),
    ("default_hooks.logger.interval", 0, ">= 1"),
    ("default_hooks.checkpoint.interval", 0, ">= 1"),
])
def test_out_of_range_values_name_the_key_value_and_range(tmp_path, key, value, accepted):
    section = value
    for part in reversed(key.split(".")):
        section = {part: section}
    bad = write(tmp_path / "r.json", {"_base_": [os.path.relpath(CIFAR10, tmp_path)], **section})
    with pytest.raises(RecipeError) as err:
        load_config(bad)
    message = str(err.value)
    # The file is named (relative to the working directory when that is shorter).
    assert os.path.abspath(message.split(": ", 1)[0]) == os.path.abspath(bad)
    assert f"{key}: {value}" in message and accepted in message and "\n" not in message


def deep_json(levels):
    return '{"a": ' * levels + "0" + "}" * levels


def test_deeply_nested_recipe_is_one_recipe_error(tmp_path, capsys):
    deep = write(tmp_path / "deep.json", '{"model": ' + deep_json(5000) + "}")
    assert main([deep, "--print-recipe"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "deep.json" in err and "nested deeper" in err
    assert "RecursionError" not in err

    with pytest.raises(RecipeError, match="--cfg-options.*model.backbone.x.*nested deeper") as err:
        load_config(CIFAR10, ["model.backbone.x=" + deep_json(5000)])
    assert "\n" not in str(err.value)
    nested = json.loads(deep_json(500))
    with pytest.raises(RecipeError, match="nested deeper"):
        config_from_dict({"model": nested})


@pytest.mark.parametrize("where", ["top level", "model.backbone", "training_args",
                                   "train_dataloader.dataset.pipeline.0"])
def test_a_huge_unknown_key_gives_a_short_message(where):
    key = "k" * 5_000_000
    option = key if where == "top level" else f"{where}.{key}"
    with pytest.raises(RecipeError) as err:
        load_config(CIFAR10, [option + "=1"])
    message = str(err.value)
    assert len(message) < 1024 and "kkkk" in message and "\n" not in message
    if where != "top level":
        assert where in message
    with pytest.raises(RecipeError) as err:
        config_from_dict({**MODEL_BASE, key: 1})
    assert len(str(err.value)) < 1024 and "unknown key" in str(err.value)


# --- the saved recipe round-trips --------------------------------------------------------------


EVERY_SECTION = {
    "model": {
        "type": "ImageClassifier",
        "backbone": {"type": "ResNet", "depth": 18, "frozen_stages": 1, "norm_eval": True,
                     "style": "caffe", "with_cp": True,
                     "init_cfg": {"type": "Pretrained", "checkpoint": "weights.pth",
                                  "prefix": "backbone"}},
        "neck": {"type": "GlobalAveragePooling"},
        "head": {"type": "LinearClsHead", "num_classes": 10, "in_channels": 512, "topk": [1, 3],
                 "loss": {"type": "LabelSmoothLoss", "label_smooth_val": 0.1, "loss_weight": 2.0}},
        "train_cfg": {"augments": [{"type": "Mixup", "alpha": 0.8}, {"type": "CutMix", "alpha": 1.0}],
                      "probs": [0.3, 0.7]},
    },
    "data_preprocessor": {"num_classes": 10, "mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0],
                          "to_rgb": True},
    "train_dataloader": {
        "batch_size": 8, "num_workers": 2, "persistent_workers": False, "pin_memory": False,
        "prefetch_factor": 3, "drop_last": True, "sampler": {"type": "DefaultSampler",
                                                             "shuffle": False},
        "dataset": {"type": "HFImageDataset", "hub_id": "user/images", "revision": "main",
                    "image_column": "image", "label_column": "fine_label", "download": False,
                    "indices": 100, "on_corrupt": "skip",
                    "pipeline": [{"type": "RandomCrop", "crop_size": 28, "padding": [2, 3]},
                                 {"type": "RandomFlip", "prob": 0.25, "direction": "horizontal"},
                                 {"type": "PackClsInputs"}]},
    },
    "val_dataloader": {"batch_size": 4, "dataset": {
        "type": "SyntheticCIFAR10", "num_samples": 64, "seed": 3,
        "pipeline": [{"type": "Resize", "scale": [40, 48]}, {"type": "CenterCrop", "crop_size": 32},
                     {"type": "PackClsInputs"}]}},
    "test_dataloader": {"batch_size": 4, "dataset": {
        "type": "CIFAR10", "data_root": "data/c10", "split": "test", "indices": [0, 5, 9],
        "pipeline": [{"type": "PackClsInputs"}]}},
    "val_evaluator": [{"type": "Accuracy", "topk": [1, 3]}],
    "test_evaluator": {"type": "Accuracy", "topk": 1},
    "optim_wrapper": {
        "type": "AmpOptimWrapper", "dtype": "bfloat16", "accumulative_counts": 2,
        "optimizer": {"type": "AdamW", "lr": 0.001, "betas": [0.8, 0.99], "weight_decay": 0.05},
        "paramwise_cfg": {"custom_keys": {"head": {"decay_mult": 0.5}}, "norm_decay_mult": 0.0,
                          "bias_decay_mult": 0.0, "layer_decay_rate": 0.9},
        "constructor": "LearningRateDecayOptimWrapperConstructor",
        "clip_grad": {"max_norm": 5.0},
    },
    "param_scheduler": [
        {"type": "LinearLR", "start_factor": 0.1, "by_epoch": False, "begin": 0, "end": 10},
        {"type": "CosineAnnealingLR", "by_epoch": True, "begin": 1, "eta_min_ratio": 0.01,
         "convert_to_iter_based": True},
    ],
    "train_cfg": {"type": "EpochBasedTrainLoop", "max_epochs": 7, "val_interval": 2,
                  "total_batch_size": 16},
    "val_cfg": {"type": "ValLoop"},
    "test_cfg": {"type": "TestLoop"},
    "auto_scale_lr": {"enable": True, "base_batch_size": 256},
    "default_scope": "mmcls",
    "default_hooks": {"logger": {"type": "LoggerHook", "interval": 5},
                      "checkpoint": {"type": "CheckpointHook", "interval": 2, "max_keep_ckpts": -1,
                                     "save_best": "accuracy/top1", "rule": "greater"},
                      "visualization": None},
    "env_cfg": {"cudnn_benchmark": True, "channels_last": False,
                "dist_cfg": {"backend": "nccl"}},
    "visualizer": {"type": "ClsVisualizer", "vis_backends": [{"type": "TensorboardVisBackend"}]},
    "log_level": "DEBUG",
    "load_from": "whole_model.pth",
    "resume": True,
    "randomness": {"seed": 7, "deterministic": True},
    "work_dir": "runs/every",
    "training_args": {"bf16": True, "report_to": "none"},
    "hub": {"push": True, "model_id": "user/model", "private": True, "strategy": "checkpoint"},
    "custom_hooks": [{"type": "EMAHook", "momentum": 0.001}],
    "model_card": {"license": "apache-2.0"},
    "sync_bn": "torch",
    "name": "every_section",
}


def test_every_section_example_sets_every_section():
    assert set(EVERY_SECTION) == {f.name for f in dataclasses.fields(Config)
                                  if not f.metadata.get("secret")}


@pytest.mark.parametrize("source", ["cifar10", "cifar10_smoke", "every_section"])
def test_saved_recipe_round_trips(tmp_path, source):
    if source == "every_section":
        cfg = config_from_dict(EVERY_SECTION)
        assert cfg.to_dict() != config_from_dict({"model": EVERY_SECTION["model"]}).to_dict()
    else:
        cfg = load_config(os.path.join(REPO, "recipes", source + ".json"))
    assert config_from_dict(cfg.to_dict()) == cfg
    saved = write(tmp_path / "recipe.json", json.dumps(cfg.to_dict()))
    assert read_config(saved) == cfg
    again = read_config(saved)
    assert [s.op.__class__ for s in again.train_dataloader.dataset.pipeline] == \
        [s.op.__class__ for s in cfg.train_dataloader.dataset.pipeline]


def test_saved_recipe_differs_when_a_value_differs():
    cfg = load_config(SMOKE)
    changed = load_config(SMOKE, ["train_dataloader.dataset.pipeline.0.padding=2"])
    assert config_from_dict(changed.to_dict()) != cfg


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


def test_missing_data_root_exits_2_with_one_line_naming_it(capsys):
    assert main([SMOKE, "--data-root", "/does/not/exist", "--print-recipe"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "/does/not/exist" in captured.err
    assert captured.err.startswith("error: ")


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


# --- values derived once, while parsing or once per run ---------------------------------------


def test_the_loop_type_sets_by_epoch_while_parsing():
    cfg = config_from_dict({**MODEL_BASE, "train_cfg": {"type": "IterBasedTrainLoop", "max_iters": 10}})
    assert cfg.train_cfg.by_epoch is False and cfg.to_dict()["train_cfg"]["by_epoch"] is False
    assert config_from_dict(MODEL_BASE).train_cfg.by_epoch is True
    with pytest.raises(RecipeError, match=r"^recipe: train_cfg\.by_epoch: True contradicts type IterBased"):
        config_from_dict({**MODEL_BASE, "train_cfg": {"type": "IterBasedTrainLoop", "by_epoch": True,
                                                      "max_iters": 10}})


@pytest.mark.parametrize("depth, width", [(18, 512), (34, 512), (50, 2048), (101, 2048)])
def test_head_in_channels_is_the_backbones_width(depth, width):
    from hf_finetune.models import FinetuneResNetConfig

    assert FinetuneResNetConfig(depth=depth).feature_channels == width  # the model's, the one owner
    head = {"num_classes": 10, "in_channels": width}
    assert config_from_dict({"model": {"backbone": {"depth": depth}, "head": head}}).model.head.in_channels == width
    wrong = 2560 - width
    with pytest.raises(RecipeError, match=rf"model\.head\.in_channels: {wrong} does not match the backbone's "
                                          rf"output \({width} channels\)"):
        config_from_dict({"model": {"backbone": {"depth": depth}, "head": dict(head, in_channels=wrong)}})


def test_pipeline_order_is_one_rule_for_recipes_and_build_pipeline():
    from hf_finetune.data.transforms import build_pipeline

    steps = [{"type": "PackClsInputs"}, {"type": "PackClsInputs"}]
    rule = "step 0 is PackClsInputs, which must be the last step"
    dataset = {"type": "SyntheticCIFAR10", "pipeline": steps}
    with pytest.raises(RecipeError, match=f"^recipe: val_dataloader.dataset.pipeline: {rule}$"):
        config_from_dict({**MODEL_BASE, "val_dataloader": {"batch_size": 2, "dataset": dataset}})
    with pytest.raises(RecipeError, match=f"^pipeline: {rule}$"):
        build_pipeline(steps)


def test_topk_and_threshold_defaults_have_one_owner():
    from hf_finetune.trainer import topk_of

    cfg = config_from_dict({**MODEL_BASE, "val_evaluator": {"type": "Accuracy"},
                            "test_evaluator": {"type": "Accuracy", "topk": 3}})
    assert cfg.topk() == [1, 3, 5] and topk_of(cfg, 4) == ([1, 3, 5], 4)
    multi = {"model": {"head": {"type": "MultiLabelLinearClsHead", "num_classes": 5}},
             "val_evaluator": {"type": "MultiLabelMetric"}, "test_evaluator": {"type": "MultiLabelMetric"}}
    assert config_from_dict(multi).multi_label_decision() == (0.5, None)
    multi["val_evaluator"]["topk"] = 2
    assert config_from_dict(multi).multi_label_decision() == (None, 2)


def test_a_null_seed_is_drawn_once_and_handed_on_with_the_config():
    from hf_finetune.training import process_state, resolve_seed

    cfg = config_from_dict(MODEL_BASE)
    resolved = resolve_seed(cfg, process_state())
    assert cfg.randomness.seed is None  # the parsed config is not written into
    assert isinstance(resolved.randomness.seed, int) and resolved.model is cfg.model
    assert resolve_seed(resolved, process_state()) is resolved
    assert resolved.to_dict()["randomness"]["seed"] == resolved.randomness.seed  # what recipe.json records


SEED_PROBE = """
from hf_finetune.config import config_from_dict
from hf_finetune.training import process_state, resolve_seed
print("seed", resolve_seed(config_from_dict({"model": {"head": {"num_classes": 10}}}), process_state()).randomness.seed)
"""


def test_a_drawn_seed_is_the_same_on_every_rank():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", SEED_PROBE], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [proc.communicate(timeout=240) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs[0][1][-2000:]
    seeds = [[line for line in out.splitlines() if line.startswith("seed ")] for out, _ in outputs]
    assert len(seeds[0]) == 1 and seeds[0] == seeds[1]


def test_a_run_without_seed_records_the_seed_it_drew(tmp_path, capsys, caplog):
    data = {"type": "SyntheticCIFAR10", "num_samples": 8, "pipeline": [{"type": "PackClsInputs"}]}
    recipe = write(tmp_path / "r.json", {
        "_base_": [os.path.relpath(SMOKE, tmp_path)], "model": {"backbone": {"depth": 18}, "head": {"in_channels": 512}},
        "train_dataloader": {"dataset": data}, "val_dataloader": None, "test_dataloader": None,
        "train_cfg": {"max_epochs": 1, "total_batch_size": 8}, "randomness": {"seed": None}})
    assert json.loads(_printed(recipe, capsys))["randomness"]["seed"] is None  # --print-recipe: as merged
    work_dir = tmp_path / "w"
    assert main([recipe, "--work-dir", str(work_dir)]) == 0
    seed = json.loads((work_dir / "recipe.json").read_text())["randomness"]["seed"]
    assert isinstance(seed, int) and f"seed {seed}" in caplog.text  # the seed the Trainer used


def _printed(recipe, capsys):
    assert main([recipe, "--print-recipe"]) == 0
    return capsys.readouterr().out


def test_reentrant_checkpointing_of_a_frozen_stem_is_refused():
    """A reentrant checkpoint whose input needs no gradient would silently stop every block
    before the head from learning; use_reentrant false, or nothing frozen, is accepted."""
    kwargs = 'training_args.gradient_checkpointing_kwargs={"use_reentrant": true}'
    with pytest.raises(RecipeError, match="use_reentrant: true with model.backbone.frozen_stages"):
        load_config(CIFAR10, ["model.backbone.with_cp=true", "model.backbone.frozen_stages=0", kwargs])
    load_config(CIFAR10, ["model.backbone.with_cp=true", "model.backbone.frozen_stages=-1", kwargs])
    load_config(CIFAR10, ["model.backbone.with_cp=true", "model.backbone.frozen_stages=2",
                          'training_args.gradient_checkpointing_kwargs={"use_reentrant": false}'])


# --- the best-checkpoint metric is one the evaluators report -------------------------------------

SINGLE_LABEL = {"val_evaluator": [{"type": "Accuracy", "topk": [1, 5]},
                                  {"type": "SingleLabelMetric", "items": ["precision", "f1-score"]}],
                "test_evaluator": [{"type": "Accuracy"}, {"type": "SingleLabelMetric", "average": "micro",
                                                          "thrs": [None, 0.5]},
                                   {"type": "SingleLabelMetric", "average": None}]}


def _best(name, sections=SINGLE_LABEL, **hook):
    return config_from_dict({**MODEL_BASE, **sections, "default_hooks": {"checkpoint": {"save_best": name, **hook}}})


@pytest.mark.parametrize("name, hint", [
    ("accuracy/top9", "(did you mean 'accuracy/top"), ("acc/top1", "(did you mean 'accuracy/top1'?)"),
    ("single-label/recall", ""),  # an item this recipe's SingleLabelMetric does not report
    ("single-label/precision_micro", ""),  # with several thrs, each key names its threshold
    ("single-label/precision_classwise", "per-class values (average null) are lists"),
    ("multilabel/mAP", ""),  # a single-label head
])
def test_a_best_metric_the_evaluators_do_not_report_is_refused(name, hint):
    with pytest.raises(RecipeError) as error:
        _best(name)
    message = str(error.value)
    assert message.startswith(f"recipe: default_hooks.checkpoint.save_best: {name!r} is not a metric the "
                              f"evaluators report") and hint in message and "\n" not in message
    assert message.endswith("known: auto, loss, accuracy/top1, accuracy/top5, single-label/precision, "
                            "single-label/f1-score, single-label/precision_no-thr_micro, "
                            "single-label/recall_no-thr_micro, single-label/f1-score_no-thr_micro, "
                            "single-label/precision_thr-0.50_micro, single-label/recall_thr-0.50_micro, "
                            "single-label/f1-score_thr-0.50_micro")
    with pytest.raises(RecipeError, match=r"^recipe: custom_hooks\.0\.monitor: 'acc/top1' is not a metric"):
        config_from_dict({**MODEL_BASE, "custom_hooks": [{"type": "EarlyStoppingHook", "monitor": "acc/top1"}],
                          "val_dataloader": {"batch_size": 2, "dataset": {"type": "SyntheticCIFAR10"}}})


def test_every_metric_the_evaluators_report_can_pick_the_best_checkpoint():
    """The names the config accepts are the keys the metric modules report (but per-class lists)."""
    from hf_finetune.metrics import SingleLabelMetrics, load_multilabel, mmpretrain_name, reported_names
    from transformers import EvalPrediction
    import numpy as np

    cfg = _best("auto")
    metrics = SingleLabelMetrics(cfg.topk(), 10, cfg.single_label_metrics())
    ranked = np.tile(np.arange(5), (4, 1))
    keys = metrics(EvalPrediction(predictions=(ranked, np.full(4, 0.7)), label_ids=np.array([0, 1, 2, 3])))
    reported = {mmpretrain_name(k) for k, v in keys.items() if k != "num_samples" and not isinstance(v, list)}
    assert sorted(reported_names(cfg.topk(), False, cfg.single_label_metrics())) == sorted(reported | {"loss"})
    for name in ["auto", "loss", "accuracy_top5", *reported]:  # accuracy_top5: the key as reported
        assert _best(name, rule="greater").default_hooks.checkpoint.save_best == name
    multi = {"model": {"head": {"type": "MultiLabelLinearClsHead", "num_classes": 5}},
             "val_evaluator": {"type": "AveragePrecision"}, "test_evaluator": {"type": "MultiLabelMetric"}}
    multilabel = load_multilabel().compute(predictions=[[0.9, 0.1]], references=[[1, 0]], thr=0.5, topk=None)
    assert reported_names([1], True) == ["loss", *multilabel]
    for name in reported_names([1], True):
        config_from_dict({**multi, "default_hooks": {"checkpoint": {"save_best": name, "rule": "greater"}}})
    with pytest.raises(RecipeError, match="'accuracy/top1' is not a metric the evaluators report"):
        config_from_dict({**multi, "default_hooks": {"checkpoint": {"save_best": "accuracy/top1"}}})
