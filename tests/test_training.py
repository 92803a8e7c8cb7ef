"""The main job end to end on generated data: the real entry point, 1 and 2 processes."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from conftest import free_port

from hf_finetune.run import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPE_TRAIN = [{"type": "RandomCrop", "crop_size": 32, "padding": 4},
              {"type": "RandomFlip", "prob": 0.5, "direction": "horizontal"},
              {"type": "PackClsInputs"}]
PIPE_TEST = [{"type": "PackClsInputs"}]


def tiny_recipe(tmp_path, **overrides):
    """cifar10.json shrunk: ResNet-18, 32 px, generated data, a few updates."""
    def dataset(n, seed, pipeline):
        return {"type": "SyntheticCIFAR10", "num_samples": n, "seed": seed, "pipeline": pipeline}

    recipe = {
        "_base_": [os.path.join(REPO, "recipes", "cifar10.json")],
        "model": {"backbone": {"depth": 18, "init_cfg": None},
                  "head": {"in_channels": 512}},
        "train_dataloader": {"num_workers": 0, "dataset": dataset(48, 0, PIPE_TRAIN)},
        "val_dataloader": {"num_workers": 0, "dataset": dataset(37, 1, PIPE_TEST)},
        "test_dataloader": {"num_workers": 0, "dataset": dataset(37, 1, PIPE_TEST)},
        "train_cfg": {"max_epochs": 3, "total_batch_size": 8},
        "param_scheduler": {"type": "MultiStepLR", "by_epoch": True, "milestones": [1, 2],
                            "gamma": 0.5},
        "default_hooks": {"logger": {"interval": 1}},
        "randomness": {"seed": 0},
    }
    for key, value in overrides.items():
        recipe[key] = value
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(recipe))
    return str(path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def lr_by_step(work_dir):
    state = read_json(os.path.join(work_dir, "trainer_state.json"))
    return {e["step"]: e["learning_rate"] for e in state["log_history"] if "learning_rate" in e}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One full single-process run through the entry point, shared by several tests."""
    tmp = tmp_path_factory.mktemp("run")
    work_dir = str(tmp / "work")
    assert main([tiny_recipe(tmp), "--work-dir", work_dir]) == 0
    return tmp, work_dir


@pytest.mark.floors
def test_single_process_run_writes_the_work_dir(finished_run):
    _, work_dir = finished_run
    for name in ("model.safetensors", "config.json", "recipe.json", "all_results.json",
                 "trainer_state.json", "confusion_matrix.json"):
        assert os.path.isfile(os.path.join(work_dir, name)), name
    results = read_json(os.path.join(work_dir, "all_results.json"))
    for key in ("eval_accuracy_top1", "eval_accuracy_top5", "test_accuracy_top1", "train_loss"):
        assert key in results
        assert 0.0 <= results[key] <= (1.0 if "accuracy" in key else 1e9)
    # Every test image counted exactly once (37 is not a multiple of the batch).
    assert results["test_num_samples"] == 37
    matrix = read_json(os.path.join(work_dir, "confusion_matrix.json"))["matrix"]
    assert sum(map(sum, matrix)) == 37
    # Checkpoints every epoch (6 updates each), the recipe saved with the seed it ran with.
    checkpoints = sorted(d for d in os.listdir(work_dir) if d.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-12", "checkpoint-18", "checkpoint-6"]
    assert read_json(os.path.join(work_dir, "recipe.json"))["randomness"]["seed"] == 0


def test_lr_follows_the_epoch_schedule(finished_run):
    _, work_dir = finished_run
    lrs = lr_by_step(work_dir)
    # 48 images / batch 8 = 6 updates per epoch; LR halves at the start of epochs 1 and 2.
    # The Trainer logs, at `step`, the LR that update (1-based) ran with.
    assert sorted(lrs) == list(range(1, 19))
    for step, lr in lrs.items():
        epoch = (step - 1) // 6
        assert lr == pytest.approx(0.01 * 0.5 ** epoch), step


def test_frozen_stages_do_not_change(finished_run):
    tmp, work_dir = finished_run
    from transformers import set_seed

    from hf_finetune import build_model, load_config

    set_seed(0)  # the run seeds model initialisation the same way
    cfg = load_config(tiny_recipe(tmp))
    initial = build_model(cfg.model, cfg.data_preprocessor).state_dict()
    trained = load_file(os.path.join(work_dir, "model.safetensors"))
    frozen = [k for k in trained if k.startswith(("backbone.embedder.", "backbone.encoder.stages.0.",
                                                  "backbone.encoder.stages.1."))]
    trainable = [k for k in trained if k.startswith("backbone.encoder.stages.3.")]
    assert frozen and trainable
    for key in frozen:  # weights and BatchNorm statistics of stem + stages 1-2
        assert torch.equal(trained[key], initial[key]), key
    assert any(not torch.equal(trained[k], initial[k]) for k in trainable)


@pytest.mark.floors
def test_eval_only_reproduces_the_test_metrics(finished_run, capsys):
    tmp, work_dir = finished_run
    results = read_json(os.path.join(work_dir, "all_results.json"))
    assert main([tiny_recipe(tmp), "--work-dir", work_dir, "--eval-only"]) == 0
    evaluated = read_json(os.path.join(work_dir, "test_results.json"))
    assert evaluated["test_accuracy_top1"] == pytest.approx(results["test_accuracy_top1"])
    assert evaluated["test_num_samples"] == 37
    # A checkpoint folder and a bare weights file (load_from) give the same numbers.
    for source in (os.path.join(work_dir, "checkpoint-18"), os.path.join(work_dir, "model.safetensors")):
        os.remove(os.path.join(work_dir, "test_results.json"))
        assert main([tiny_recipe(tmp), "--work-dir", work_dir, "--eval-only", source]) == 0
        again = read_json(os.path.join(work_dir, "test_results.json"))
        assert again["test_accuracy_top1"] == pytest.approx(results["test_accuracy_top1"]), source
    assert main([tiny_recipe(tmp), "--work-dir", work_dir, "--eval-only", str(tmp / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.floors
def test_resume_continues_exactly(finished_run, tmp_path):
    tmp, work_dir = finished_run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(work_dir, "checkpoint-6"), os.path.join(resumed, "checkpoint-6"))
    # An interrupted save: a newer folder without its state must be skipped, not trusted.
    os.makedirs(os.path.join(resumed, "checkpoint-9"))
    (tmp_path / "resumed" / "checkpoint-9" / "config.json").write_text("{}")
    assert main([tiny_recipe(tmp), "--work-dir", resumed, "--resume"]) == 0
    full = load_file(os.path.join(work_dir, "model.safetensors"))
    again = load_file(os.path.join(resumed, "model.safetensors"))
    for key in full:
        assert torch.allclose(full[key].float(), again[key].float(), atol=1e-5), key
    assert lr_by_step(resumed).items() >= {k: v for k, v in lr_by_step(work_dir).items() if k > 6}.items()


def test_resume_from_another_architecture_is_refused(finished_run, tmp_path, capsys):
    tmp, work_dir = finished_run
    other = str(tmp_path / "other")
    shutil.copytree(os.path.join(work_dir, "checkpoint-6"), os.path.join(other, "checkpoint-6"))
    code = main([tiny_recipe(tmp), "--work-dir", other, "--resume",
                 "--cfg-options", "model.backbone.depth=34"])
    assert code == 2
    err = capsys.readouterr().err
    assert "depth" in err and "18" in err and "34" in err


def test_num_classes_must_match_the_dataset(tmp_path, capsys):
    code = main([tiny_recipe(tmp_path), "--work-dir", str(tmp_path / "w"),
                 "--cfg-options", "model.head.num_classes=5", "model.head.topk=[1]"])
    assert code == 2
    err = capsys.readouterr().err
    assert "5" in err and "10" in err and "num_classes" in err


def test_training_args_may_not_override_recipe_keys(tmp_path, capsys):
    code = main([tiny_recipe(tmp_path), "--cfg-options", "training_args.learning_rate=0.1"])
    assert code == 2
    assert "optim_wrapper.optimizer.lr" in capsys.readouterr().err


def test_unwritable_work_dir(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code = main([tiny_recipe(tmp_path), "--work-dir", str(blocker / "out")])
    assert code == 2
    assert "not writable" in capsys.readouterr().err


@pytest.mark.floors
def test_nan_loss_stops_with_the_step_and_keeps_good_checkpoints(tmp_path, capsys):
    work_dir = str(tmp_path / "nan")
    code = main([tiny_recipe(tmp_path), "--work-dir", work_dir, "--cfg-options",
                 "param_scheduler={\"type\":\"MultiStepLR\",\"milestones\":[1],\"gamma\":1e30}"])
    assert code == 1
    err = capsys.readouterr().err
    assert "NaN/inf" in err and "update" in err
    # Epoch 0 was healthy and its checkpoint is complete; nothing later was written.
    assert sorted(d for d in os.listdir(work_dir) if d.startswith("checkpoint-")) == ["checkpoint-6"]
    weights = load_file(os.path.join(work_dir, "checkpoint-6", "model.safetensors"))
    assert all(torch.isfinite(t.float()).all() for t in weights.values())


def run_launch(args, tmp_path, processes):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if processes > 1:
        command += ["--multi_gpu", "--num_processes", str(processes)]
    else:
        command += ["--num_processes", "1"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()), os.path.join(REPO, "hf_finetune", "run.py")] + args
    return subprocess.run(command, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)


def test_two_process_ddp_on_cpu_matches_the_single_process_schedule(finished_run, tmp_path):
    tmp, single_dir = finished_run
    work_dir = str(tmp_path / "ddp")
    proc = run_launch([tiny_recipe(tmp), "--work-dir", work_dir], tmp_path, processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Same total batch: 8 = 4 per device x 2 processes, so the same updates and LR per step.
    assert "batch: 8 total = 4 per device x 2 process(es)" in proc.stderr
    assert lr_by_step(work_dir) == pytest.approx(lr_by_step(single_dir))
    results = read_json(os.path.join(work_dir, "all_results.json"))
    assert results["test_num_samples"] == 37  # no sample counted twice by the padding
    state = read_json(os.path.join(work_dir, "trainer_state.json"))
    assert state["global_step"] == 18


def test_killed_mid_epoch_then_resume(tmp_path):
    """SIGKILL during epoch 2 (as the OOM killer sends it): the epoch-1 checkpoint survives, the
    loader workers it leaves running for seconds do not hold the work dir, and --resume at once
    finishes the run."""
    import signal
    import time

    from hf_finetune.workdir import WorkDirLock

    recipe = tiny_recipe(tmp_path)
    work_dir = str(tmp_path / "killed")
    options = ["--cfg-options", "train_dataloader.num_workers=2", "train_dataloader.persistent_workers=true"]
    proc = subprocess.Popen([sys.executable, "-m", "hf_finetune.run", recipe, "--work-dir", work_dir, *options],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = os.path.join(work_dir, "checkpoint-6", "trainer_state.json")
    deadline = time.time() + 240
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 2
    workers = [int(pid) for task in os.listdir(f"/proc/{proc.pid}/task")
               for pid in open(f"/proc/{proc.pid}/task/{task}/children").read().split()]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(first)
    assert not os.path.exists(os.path.join(work_dir, "model.safetensors"))  # it did not finish
    assert any(os.path.exists(f"/proc/{pid}") for pid in workers), "the workers outlive the run"
    with WorkDirLock(work_dir, wait_s=0):  # free at once, while the orphaned workers still run
        pass

    assert main([recipe, "--work-dir", work_dir, "--resume", *options]) == 0
    state = read_json(os.path.join(work_dir, "trainer_state.json"))
    assert state["global_step"] == 18
    assert os.path.isfile(os.path.join(work_dir, "model.safetensors"))


def test_loader_workers_train_the_same_with_or_without_shared_slots(tmp_path, monkeypatch):
    """Two loader workers, a Resize at the end of the pipeline: batches handed over in shared
    slots (the default) train exactly as batches sent torch's usual way
    (train_dataloader.shared_slots=false, which makes no slots)."""
    from hf_finetune.data.ring import BatchRing

    made = []
    for_loader = BatchRing.for_loader.__func__

    def recording(cls, *args):
        made.append(for_loader(cls, *args))
        return made[-1]

    monkeypatch.setattr(BatchRing, "for_loader", classmethod(recording))
    losses, rings = {}, {}
    for shared in (True, False):
        work_dir = str(tmp_path / f"shared_{shared}")
        pipeline = json.dumps(PIPE_TRAIN[:-1] + [{"type": "Resize", "scale": 40}, {"type": "PackClsInputs"}])
        before = len(made)
        assert main([tiny_recipe(tmp_path), "--work-dir", work_dir, "--cfg-options", "train_cfg.max_epochs=1",
                     "train_dataloader.num_workers=2", f"train_dataloader.shared_slots={str(shared).lower()}",
                     f"train_dataloader.dataset.pipeline={pipeline}"]) == 0
        rings[shared] = made[before:]
        history = read_json(os.path.join(work_dir, "trainer_state.json"))["log_history"]
        losses[shared] = [e["loss"] for e in history if "loss" in e]
    assert rings[True] and rings[True][0].memory[:40 * 40 * 3].any()  # the workers wrote the batches into the slots
    assert rings[False] == []
    assert len(losses[True]) == 6 and losses[True] == losses[False]


def test_each_split_loads_as_its_section_says(tmp_path, monkeypatch):
    """The train, val and test loaders follow their own dataloader sections: evaluate() with
    metric_key_prefix "test" loads the test split as test_dataloader says, validation as
    val_dataloader says."""
    from hf_finetune import data
    from hf_finetune.config import apply_overrides, load_config
    from hf_finetune.training import build_trainer

    built = []
    real = data.build_dataloader

    def recording(dataset, batch_size, **kwargs):
        built.append((len(dataset), kwargs["num_workers"], kwargs["shared_slots"]))
        return real(dataset, batch_size, **kwargs)

    monkeypatch.setattr(data, "build_dataloader", recording)
    cfg = apply_overrides(load_config(tiny_recipe(tmp_path), [
        "val_dataloader.num_workers=1", "val_dataloader.shared_slots=false", "val_dataloader.persistent_workers=false",
        "test_dataloader.dataset.num_samples=21"]), work_dir=str(tmp_path / "work"))
    datasets = data.build_datasets(cfg)
    trainer = build_trainer(cfg, datasets)
    trainer.get_train_dataloader()
    assert trainer.evaluate()["eval_num_samples"] == 37
    assert trainer.evaluate(datasets["test"], metric_key_prefix="test")["test_num_samples"] == 21
    assert built == [(48, 0, True), (37, 1, False), (21, 0, True)]
    # predict follows metric_key_prefix too; a loader kept for its workers serves only its dataset.
    assert len(trainer.predict(datasets["val"], metric_key_prefix="eval").label_ids) == 37
    assert built[-1] == (37, 1, False)
    monkeypatch.setattr(type(cfg.test_dataloader), "keep_workers", lambda self: True)
    assert len(trainer.predict(datasets["test"]).label_ids) == 21
    assert len(trainer.predict(datasets["val"]).label_ids) == 37
    assert built[-2:] == [(21, 0, True), (37, 0, True)]


def test_resume_restores_the_ema_average(tmp_path):
    """EMAHook's average (ema.safetensors) comes back on --resume: the resumed run ends on the
    same averaged weights as the run that was not interrupted."""
    hooks = ["custom_hooks=[{\"type\": \"EMAHook\", \"momentum\": 0.1}]", "train_cfg.max_epochs=2",
             "train_dataloader.dataset.num_samples=24"]
    full = str(tmp_path / "full")
    assert main([tiny_recipe(tmp_path), "--work-dir", full, "--cfg-options", *hooks]) == 0
    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(full, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    assert main([tiny_recipe(tmp_path), "--work-dir", resumed, "--resume", "--cfg-options", *hooks]) == 0
    expected = load_file(os.path.join(full, "model.safetensors"))
    again = load_file(os.path.join(resumed, "model.safetensors"))
    assert all(torch.equal(again[name], tensor) for name, tensor in expected.items())


def test_the_private_trainer_method_overridden_is_unchanged():
    """FinetuneTrainer overrides Trainer._get_grad_norm, which is private (no public hook skips
    the norm computed only for the logs): this fails when transformers changes it."""
    import inspect

    import transformers.trainer
    from transformers import Trainer

    assert list(inspect.signature(Trainer._get_grad_norm).parameters) == ["self", "model", "grad_norm"]
    source = inspect.getsource(transformers.trainer)
    assert "grad_norm = None\n" in source and "grad_norm = self._get_grad_norm(model, grad_norm=grad_norm)" in source


@pytest.mark.floors
def test_speed_knobs_bf16_and_channels_last_run_on_cpu(tmp_path):
    work_dir = str(tmp_path / "fast")
    assert main([tiny_recipe(tmp_path), "--work-dir", work_dir, "--cfg-options",
                 "train_cfg.max_epochs=1", "training_args.bf16=true", "env_cfg.channels_last=true"]) == 0
    results = read_json(os.path.join(work_dir, "all_results.json"))
    assert results["test_num_samples"] == 37


def test_the_final_evaluations_are_logged_once(finished_run):
    """The last update's validation is reused, confusion matrix included (no second entry, no
    second pass), and the test split, the same images, reuses its numbers."""
    _, work_dir = finished_run
    history = read_json(os.path.join(work_dir, "trainer_state.json"))["log_history"]
    assert [e["step"] for e in history if "eval_loss" in e] == [6, 12, 18]
    assert not any("test_loss" in e or any(k.endswith("confusion_matrix") for k in e) for e in history)
    logs = sorted(os.path.join(root, name) for root, _, names in os.walk(work_dir) for name in names
                  if name.endswith(".log"))
    assert open(logs[0]).read().count("Epoch(test)") == 0  # the training's (--eval-only runs log after it)
    results = read_json(os.path.join(work_dir, "all_results.json"))
    assert results["test_accuracy_top1"] == results["eval_accuracy_top1"] == history[-2]["eval_accuracy_top1"]
    confusion = read_json(os.path.join(work_dir, "confusion_matrix.json"))
    matrix = confusion["matrix"]
    assert confusion["split"] == "test" and sum(map(sum, matrix)) == 37
    assert sum(matrix[i][i] for i in range(len(matrix))) / 37 == pytest.approx(results["test_accuracy_top1"])


def test_load_best_model_at_end_results_describe_the_saved_weights(tmp_path):
    """The best validation is not the last one (save_best "loss" with rule "greater" picks the
    first epoch's): with load_best_model_at_end and EMA, all_results, the card and --eval-only
    all describe the saved weights, per-class results included."""
    recipe = tiny_recipe(tmp_path)
    work_dir = str(tmp_path / "best")
    evaluators = json.dumps([{"type": "Accuracy", "topk": [1, 5]},
                             {"type": "SingleLabelMetric", "average": None, "items": ["precision", "support"]}])
    options = ["training_args.load_best_model_at_end=true", "default_hooks.checkpoint.save_best=loss",
               "default_hooks.checkpoint.rule=greater", 'custom_hooks=[{"type": "EMAHook", "momentum": 0.5}]',
               f"val_evaluator={evaluators}", f"test_evaluator={evaluators}"]
    assert main([recipe, "--work-dir", work_dir, "--cfg-options", *options]) == 0
    state = read_json(os.path.join(work_dir, "trainer_state.json"))
    assert (state["best_global_step"], state["global_step"]) == (6, 18)  # the premise of this test
    validations = {e["step"]: e for e in state["log_history"] if "eval_loss" in e}
    assert sorted(validations) == [6, 12, 18]  # the best checkpoint's evaluation is no point of the curve
    results = read_json(os.path.join(work_dir, "all_results.json"))
    assert results["eval_loss"] == pytest.approx(validations[6]["eval_loss"], abs=1e-5)
    assert results["eval_loss"] != pytest.approx(validations[18]["eval_loss"], abs=1e-5)
    assert results["test_loss"] == results["eval_loss"]  # test reads the validation images
    # The saved weights are the best checkpoint's (EMA: its averaged weights).
    saved = load_file(os.path.join(work_dir, "model.safetensors"))
    best = load_file(os.path.join(work_dir, "checkpoint-6", "model.safetensors"))
    assert saved.keys() == best.keys() and all(torch.equal(saved[k], best[k]) for k in best)
    # Per class: ten lists' entries, every test image counted once.
    assert len(results["test_single-label/precision_classwise"]) == 10
    assert sum(results["test_single-label/support_classwise"]) == 37
    card = open(os.path.join(work_dir, "README.md")).read()
    assert "the best checkpoint's, `checkpoint-6` (update 6" in card
    assert "Per class (test):" in card and "| class | precision (%) | support |" in card

    # The saved model's own evaluation: the same numbers.
    assert main([recipe, "--work-dir", work_dir, "--eval-only", "--cfg-options", *options]) == 0
    evaluated = read_json(os.path.join(work_dir, "test_results.json"))
    for key in ("test_loss", "test_accuracy_top1", "test_accuracy_top5", "test_single-label/precision_classwise",
                "test_single-label/support_classwise"):
        assert evaluated[key] == pytest.approx(results[key], abs=1e-5), key


def test_load_best_model_at_end_needs_a_validation_before_every_checkpoint(tmp_path, capsys):
    work_dir = tmp_path / "refused"
    code = main([tiny_recipe(tmp_path), "--work-dir", str(work_dir), "--cfg-options",
                 "training_args.load_best_model_at_end=true", "train_cfg.val_interval=2"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "training_args.load_best_model_at_end: needs a validation before every checkpoint: " \
           "default_hooks.checkpoint.interval (1) must be a multiple of train_cfg.val_interval (2)" in err
    assert "\n" not in err and not work_dir.exists()  # refused before any data or model is built


def test_sync_bn_converts_batchnorm_and_keeps_frozen_stages_frozen():
    """sync_bn "torch" with more than one process: every BatchNorm becomes SyncBatchNorm; the
    frozen stem and stage 1 stay in eval mode with frozen parameters, and their statistics do
    not move in a training step (no process group here, so SyncBatchNorm runs as BatchNorm)."""
    from hf_finetune.errors import RecipeError
    from hf_finetune.models import FinetuneResNetConfig, FinetuneResNetForImageClassification
    from hf_finetune.training import sync_batchnorm

    torch.manual_seed(0)
    model = FinetuneResNetForImageClassification(FinetuneResNetConfig(depth=18, num_labels=3, frozen_stages=1))
    assert sync_batchnorm(model, None, 8, "cuda") is model  # off
    assert sync_batchnorm(model, "torch", 1, "cuda") is model  # one process: nothing to synchronise
    with pytest.raises(RecipeError, match=r'sync_bn: "torch" needs GPUs \(torch.nn.SyncBatchNorm does not run on '
                                          r'the CPU\); set it to null'):
        sync_batchnorm(model, "torch", 2, None)

    converted = sync_batchnorm(model, "torch", 2, "cuda").train()
    norms = [m for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    frozen = {id(m) for stage in converted.frozen_modules() for m in stage.modules()}
    frozen_norms = [m for m in norms if id(m) in frozen]
    trained_norms = [m for m in norms if id(m) not in frozen]
    assert frozen_norms and trained_norms
    assert not any(m.training or m.weight.requires_grad for m in frozen_norms)
    assert all(m.training and m.weight.requires_grad for m in trained_norms)
    before = [m.running_mean.clone() for m in norms]
    converted(pixel_values=torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)).logits.sum().backward()
    for m, mean in zip(norms, before):
        assert torch.equal(m.running_mean, mean) == (id(m) in frozen)


def test_a_single_label_metric_picks_the_best_checkpoint(tmp_path):
    """save_best names a SingleLabelMetric key: the Trainer finds it in every validation."""
    data = {"type": "SyntheticCIFAR10", "num_samples": 16, "seed": 0, "pipeline": PIPE_TEST}
    evaluators = [{"type": "Accuracy"}, {"type": "SingleLabelMetric", "average": "micro"}]
    recipe = tiny_recipe(tmp_path, train_dataloader={"num_workers": 0, "dataset": data},
                         val_dataloader={"num_workers": 0, "dataset": data}, test_dataloader=None,
                         val_evaluator=evaluators, test_evaluator=evaluators,
                         train_cfg={"max_epochs": 2, "total_batch_size": 8}, param_scheduler=[],
                         default_hooks={"checkpoint": {"save_best": "single-label/precision_micro"}})
    work_dir = str(tmp_path / "work")
    assert main([recipe, "--work-dir", work_dir]) == 0
    state = read_json(os.path.join(work_dir, "trainer_state.json"))
    validations = [e["eval_single-label/precision_micro"] for e in state["log_history"]
                   if "eval_single-label/precision_micro" in e]
    assert len(validations) == 2 and state["best_metric"] == max(validations)
    assert os.path.isdir(state["best_model_checkpoint"])
