"""A TimmClassifier run downstream, where timm is installed (.ci/timm's venv; skipped elsewhere):
a tiny random timm model saved as transformers' TimmWrapper saves it trains 2 updates from a
recipe (its stem frozen), and its work dir and export load in plain transformers (pipeline(),
no remote code, no hf_finetune) with `hf-finetune predict`'s predictions. The core's timm
cases (reload, frozen_stages 1, layer-decay groups) are in test_hub_models.py; .ci/timm runs
them too."""

import json
import os

import pytest
import yaml

from test_hub_downstream import TEST_PIPELINE, hub_recipe, load_elsewhere, sample_images


def timm_usable():
    """None when timm imports, else why not (the main venv has no timm; see .ci/timm)."""
    try:
        import timm  # noqa: F401
    except Exception as exc:  # ImportError, or torchvision failing to import beside this torch
        return f"timm is not usable here ({type(exc).__name__}: {exc}); .ci/timm runs these tests in a venv with it"
    return None


pytestmark = [pytest.mark.timm, pytest.mark.skipif(timm_usable() is not None, reason=str(timm_usable()))]
LABELS = [f"class{i}" for i in range(10)]


def save_tiny_timm(folder):
    """timm's `test_vit` at 32 px with a 10-class head, saved as TimmWrapper saves a Hub timm repo:
    config.json (model_type timm_wrapper, architecture, pretrained_cfg: timm's preprocessing) + weights."""
    import timm
    import torch
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    pretrained_cfg = dict(timm.create_model("test_vit", pretrained=False).pretrained_cfg,
                          input_size=[3, 32, 32], mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3], crop_pct=1.0)
    config = TimmWrapperConfig(architecture="test_vit", model_args={"img_size": 32}, pretrained_cfg=pretrained_cfg,
                               num_labels=10, id2label=dict(enumerate(LABELS)))
    torch.manual_seed(0)
    TimmWrapperForImageClassification(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    from hf_finetune.run import main

    root = tmp_path_factory.mktemp("timm")
    source = save_tiny_timm(root / "tiny_timm")
    work_dir = str(root / "work_dir")
    recipe = hub_recipe(root, source, TEST_PIPELINE, type="TimmClassifier", frozen_stages=0)
    assert main([recipe, "--work-dir", work_dir]) == 0
    weights = os.path.join(work_dir, "model.safetensors")
    state = load_file(weights)  # a larger head: confident predictions (see test_hub_downstream.trained)
    save_file({k: v * 40 if k.startswith("timm_model.head.") else v for k, v in state.items()}, weights,
              metadata={"format": "pt"})
    return source, work_dir, sample_images(str(root / "images"))


def test_timm_work_dir_is_a_timm_wrapper_with_the_data_s_labels_and_the_source_s_normalisation(trained):
    _, work_dir, _ = trained
    config = json.load(open(os.path.join(work_dir, "config.json")))
    assert config["model_type"] == "timm_wrapper" and config["architecture"] == "test_vit"
    assert config["label_names"][0] == "airplane" and "auto_map" not in config
    recipe = json.load(open(os.path.join(work_dir, "recipe.json")))
    assert recipe["data_preprocessor"]["mean"] == pytest.approx([127.5, 102.0, 76.5])  # pretrained_cfg's, 0-255


def test_timm_frozen_stem_kept_its_weights_and_the_blocks_trained(trained):
    from safetensors.torch import load_file

    source, work_dir, _ = trained
    before = load_file(os.path.join(source, "model.safetensors"))
    after = load_file(os.path.join(work_dir, "model.safetensors"))
    stem_prefixes = ("timm_model.cls_token", "timm_model.pos_embed", "timm_model.patch_embed.")
    stem = [k for k in after if k.startswith(stem_prefixes)]
    blocks = [k for k in after if k.startswith("timm_model.blocks.")]
    assert stem and blocks
    assert all(after[k].equal(before[k]) for k in stem)  # frozen_stages 0: timm's stem group
    assert any(not after[k].equal(before[k]) for k in blocks)


def test_timm_work_dir_and_export_load_without_hf_finetune_with_predict_s_predictions(trained, tmp_path):
    from hf_finetune.hub import main as hub_main
    from hf_finetune.predict import predict

    _, work_dir, paths = trained
    expected = [row["predictions"][0] for row in predict(work_dir, paths, topk=1)]
    assert len({label for label, _ in expected}) > 1
    exported = str(tmp_path / "exported")
    assert hub_main(["export", work_dir, exported]) == 0
    for folder in (work_dir, exported):
        got = load_elsewhere(folder, paths, tmp_path, family="timm_wrapper")
        assert [label for label, _ in got] == [label for label, _ in expected], folder
        assert [score for _, score in got] == pytest.approx([score for _, score in expected], abs=1e-4), folder


def test_timm_card_tags_and_base_model(trained, tmp_path):
    import shutil

    from hf_finetune.hub import write_model_card

    _, work_dir, _ = trained
    work_dir = shutil.copytree(work_dir, str(tmp_path / "work_dir"))
    text = open(write_model_card(work_dir), encoding="utf-8").read()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert {"timm", "timm_wrapper", "test_vit"} <= set(meta["tags"]) and "custom_code" not in meta["tags"]
    assert "base_model" not in meta  # a local folder
    assert "`timm`" in text  # the usage note: loading needs timm
