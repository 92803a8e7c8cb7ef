"""`hf-finetune predict`: the same predictions as the evaluation path, bad files on their line."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from hf_finetune.config import config_from_dict
from hf_finetune.data import build_dataloader, build_datasets
from hf_finetune.models import FinetuneResNetConfig, FinetuneResNetForImageClassification
from hf_finetune.devices import default_device
from hf_finetune.predict import main, predict

pytestmark = pytest.mark.floors  # every test here also runs at the declared floors (.ci/floors)

LABELS = ["cat", "dog", "ship"]
TEST_PIPELINE = [{"type": "Resize", "scale": 32}, {"type": "PackClsInputs"}]
# Mixed sizes, PNG and JPEG; same-size files share a batch in both paths.
# f.jpg is large: evaluation decodes it at reduced JPEG scale, and so must predict.
IMAGES = [("a.png", 40, 48), ("b.jpg", 32, 32), ("c.png", 64, 20), ("d.jpeg", 40, 48), ("e.png", 32, 32),
          ("f.jpg", 480, 640)]


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    """A random ResNet-18 saved as training saves it, with the recipe's test pipeline."""
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    config = FinetuneResNetConfig(depth=18, id2label=dict(enumerate(LABELS)),
                                  label2id={name: i for i, name in enumerate(LABELS)})
    model = FinetuneResNetForImageClassification(config).eval()
    out = root / "work"
    model.save_pretrained(out)
    recipe = {"model": {"backbone": {"depth": 18}, "head": {"num_classes": len(LABELS)}},
              "test_dataloader": {"dataset": {"type": "HFImageDataset", "data_root": str(root),
                                              "pipeline": TEST_PIPELINE}}}
    (out / "recipe.json").write_text(json.dumps(config_from_dict(recipe).to_dict()))
    return out


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """root/test/cat/<images>: an image folder the data API reads as a test split."""
    root = tmp_path_factory.mktemp("images")
    folder = root / "test" / "cat"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, height, width in IMAGES:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    return root


def eval_path_probabilities(work_dir, image_root, multi_label=False):
    """What evaluation computes: the test split through build_datasets + the whole-batch loader;
    softmax, or for a multi-label model sigmoids."""
    recipe = {"model": {"head": {}},  # the classes are the folder's; only the images matter here
              "test_dataloader": {"dataset": {"type": "HFImageDataset", "data_root": str(image_root),
                                              "split": "test", "pipeline": TEST_PIPELINE}}}
    dataset = build_datasets(config_from_dict(recipe))["test"]
    device = default_device()  # the device predict() picks, so both sides run the same kernels
    model = FinetuneResNetForImageClassification.from_pretrained(work_dir).to(device).eval()
    with torch.no_grad():
        logits = torch.cat([model(pixel_values=batch["pixel_values"].to(device)).logits.cpu()
                            for batch in build_dataloader(dataset, 2)])
    return logits.sigmoid() if multi_label else logits.softmax(-1)


def test_predictions_match_the_evaluation_path(work_dir, image_root):
    expected = eval_path_probabilities(work_dir, image_root)
    rows = predict(str(work_dir), [str(image_root)], topk=3, batch_size=4)
    assert [os.path.basename(row["file"]) for row in rows] == sorted(name for name, _, _ in IMAGES)
    for row, probabilities in zip(rows, expected):
        assert row["error"] is None
        got = {label: score for label, score in row["predictions"]}
        want = {label: probabilities[i].item() for i, label in enumerate(LABELS)}
        assert got == pytest.approx(want, abs=1e-4)  # batches differ: accelerator kernels may round differently
        scores = [score for _, score in row["predictions"]]
        assert scores == sorted(scores, reverse=True)


def test_a_checkpoint_folder_uses_the_recipe_of_its_work_dir(work_dir, image_root):
    checkpoint = work_dir / "checkpoint-6"
    FinetuneResNetForImageClassification.from_pretrained(work_dir).save_pretrained(checkpoint)
    from_checkpoint = predict(str(checkpoint), [str(image_root / "test" / "cat" / "*.png")], topk=2)
    from_work_dir = predict(str(work_dir), [str(image_root / "test" / "cat" / "*.png")], topk=2)
    assert len(from_checkpoint) == 3
    assert from_checkpoint == from_work_dir


def test_bad_file_on_its_line_and_the_run_goes_on(work_dir, image_root, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    good = image_root / "test" / "cat" / "b.jpg"
    assert main([str(work_dir), str(good), str(bad), "--topk", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["file", "top-1", "top-2"]
    assert lines[1].startswith(str(good)) and lines[1].count("%)") == 2
    assert lines[2].startswith(str(bad)) and "ERROR: cannot read the image" in lines[2]

    assert main([str(work_dir), str(bad)]) != 0  # nothing could be read


def test_out_csv_and_json(work_dir, image_root, tmp_path):
    inputs = [str(image_root / "test" / "cat" / "a.png"), str(image_root / "test" / "cat" / "d.jpeg")]
    expected = predict(str(work_dir), inputs, topk=2)
    assert main([str(work_dir), *inputs, "--topk", "2", "--out", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [row["file"] for row in table] == inputs
    for row, want in zip(table, expected):
        assert [row["label_1"], row["label_2"]] == [label for label, _ in want["predictions"]]
        assert float(row["score_1"]) == pytest.approx(want["predictions"][0][1], abs=1e-6)
        assert row["error"] == ""

    assert main([str(work_dir), *inputs, "--topk", "2", "--out", str(tmp_path / "p.json")]) == 0
    content = json.loads((tmp_path / "p.json").read_text())
    assert [[p["label"] for p in row["predictions"]] for row in content] == \
        [[label for label, _ in row["predictions"]] for row in expected]


def test_exported_folder_uses_its_image_processor(work_dir, image_root, tmp_path):
    from hf_finetune.hub.export import export_transformers
    from hf_finetune.hub.processor import write_image_processor_config

    write_image_processor_config(work_dir)
    out = export_transformers(str(work_dir), str(tmp_path / "native"))
    square = [str(image_root / "test" / "cat" / name) for name in ("b.jpg", "e.png")]  # already 32 px
    native = predict(out, square, topk=3)
    ours = predict(str(work_dir), square, topk=3)
    for a, b in zip(native, ours):
        assert [label for label, _ in a["predictions"]] == [label for label, _ in b["predictions"]]
        assert [s for _, s in a["predictions"]] == pytest.approx([s for _, s in b["predictions"]], abs=1e-4)


def test_hub_id_downloads_the_pushed_work_dir(work_dir, image_root, tmp_path, monkeypatch):
    import subprocess
    import sys

    from huggingface_hub import constants

    from hf_finetune.hub import push_work_dir
    from hub_server import HubServer

    hub = HubServer(token="hf_predict_test").start()
    try:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        push_work_dir(str(work_dir), "test-user/predict", token="hf_predict_test", endpoint=hub.url,
                      include_native=False)
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
                   HF_HOME=str(tmp_path / "hf_home"))
        env.pop("HF_TOKEN", None)
        out = tmp_path / "hub.json"
        run = subprocess.run([sys.executable, "-m", "hf_finetune.predict", "test-user/predict", str(image_root),
                              "--topk", "2", "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    finally:
        hub.stop()
    assert run.returncode == 0, run.stderr[-2000:]
    local = predict(str(work_dir), [str(image_root)], topk=2)
    from_hub = json.loads(out.read_text())
    assert [row["file"] for row in from_hub] == [row["file"] for row in local]
    for got, want in zip(from_hub, local):
        assert [p["label"] for p in got["predictions"]] == [label for label, _ in want["predictions"]]
        assert [p["score"] for p in got["predictions"]] == pytest.approx([s for _, s in want["predictions"]], abs=1e-6)


def test_unknown_model_and_offline_hub_fail_in_one_line(image_root, capsys):
    assert main(["no/such-model-here", str(image_root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot download 'no/such-model-here'") and "\n" not in err
    assert main([str(image_root / "missing"), str(image_root)]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_a_truncated_jpeg_is_reported_on_its_line(work_dir, image_root, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = (image_root / "test" / "cat" / "d.jpeg").read_bytes()
    (folder / "good.jpeg").write_bytes(good)
    (folder / "truncated.jpeg").write_bytes(good[: len(good) // 2])
    rows = predict(str(work_dir), [str(folder)], topk=1)
    assert [row["error"] is None for row in rows] == [True, False]
    assert "cannot read the image" in rows[1]["error"]


@pytest.fixture(scope="module")
def multi_label_dir(tmp_path_factory):
    """A multi-label ResNet-18 (label 0 scores high, label 2 low, label 1 in between) saved with a
    recipe whose head predicts at a score of 0.4."""
    out = tmp_path_factory.mktemp("multi") / "work"
    torch.manual_seed(0)
    config = FinetuneResNetConfig(depth=18, id2label=dict(enumerate(LABELS)), problem_type="multi_label_classification",
                                  label2id={name: i for i, name in enumerate(LABELS)})
    model = FinetuneResNetForImageClassification(config).eval()
    with torch.no_grad():
        model.head.fc.bias.copy_(torch.tensor([2.0, 0.0, -2.0]))
    model.save_pretrained(out)
    recipe = {"model": {"backbone": {"depth": 18},
                        "head": {"type": "MultiLabelLinearClsHead", "num_classes": len(LABELS), "thr": 0.4}},
              "val_evaluator": {"type": "MultiLabelMetric"}, "test_evaluator": {"type": "MultiLabelMetric"},
              "test_dataloader": {"dataset": {"type": "HFImageDataset", "data_root": str(out),
                                              "pipeline": TEST_PIPELINE}}}
    (out / "recipe.json").write_text(json.dumps(config_from_dict(recipe).to_dict()))
    return out


def test_multi_label_scores_are_independent_sigmoids_and_the_threshold_marks_labels(
        multi_label_dir, image_root, tmp_path, capsys):
    expected = eval_path_probabilities(multi_label_dir, image_root, multi_label=True)
    rows = predict(str(multi_label_dir), [str(image_root)], topk=3)
    predicted = set()
    for row, scores in zip(rows, expected):
        got = dict(row["predictions"])
        assert got == pytest.approx(dict(zip(LABELS, scores.tolist())), abs=1e-4)
        assert sum(got.values()) > 1.2  # each label on its own, no softmax
        assert row["predicted"] == [label for label in LABELS if got[label] >= 0.4]  # the recipe's head thr
        predicted.update(row["predicted"])
    assert "cat" in predicted and "ship" not in predicted  # the threshold separates

    files = [row["file"] for row in rows[:3]]

    assert main([str(multi_label_dir), *files, "--topk", "2", "--out", str(tmp_path / "p.csv")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[1:4] == ["cat", f"({100 * rows[0]['predictions'][0][1]:.1f}%)", "*"]
    assert lines[-1] == "* predicted by the multi-label model (score >= 0.4)"
    with open(tmp_path / "p.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [row["predicted"] for row in table] == [";".join(row["predicted"]) for row in rows[:3]]


def test_multi_label_without_a_recipe_uses_the_default_threshold(multi_label_dir):
    from hf_finetune.config import MULTI_LABEL_THR as DEFAULT_THR
    from hf_finetune.predict import Classifier

    model = FinetuneResNetForImageClassification.from_pretrained(multi_label_dir)
    classifier = Classifier(model, steps=[step.op for step in config_from_dict(
        {"model": {"head": {}}, "test_dataloader": {"dataset": {"type": "HFImageDataset", "data_root": ".",
                                                                "pipeline": TEST_PIPELINE}}}).test_dataloader.dataset.pipeline])
    assert classifier.multi_label and classifier.rule == (DEFAULT_THR, None)
    assert classifier.predicted(torch.tensor([0.9, DEFAULT_THR, 0.2])) == ["cat", "dog"]
    classifier.rule = (None, 1)  # a recipe's MultiLabelMetric topk: the k best
    assert classifier.predicted(torch.tensor([0.3, 0.1, 0.2])) == ["cat"]


def test_single_label_scores_are_a_softmax_and_nothing_is_marked(work_dir, image_root, capsys):
    rows = predict(str(work_dir), [str(image_root / "test" / "cat" / "b.jpg")], topk=3)
    assert sum(score for _, score in rows[0]["predictions"]) == pytest.approx(1.0, abs=1e-5)
    assert "predicted" not in rows[0]
    assert main([str(work_dir), str(image_root / "test" / "cat" / "b.jpg")]) == 0
    out = capsys.readouterr().out
    assert "*" not in out and "multi-label" not in out


def test_a_phone_photo_stored_sideways_is_predicted_upright(work_dir, tmp_path):
    """EXIF orientation 6 (as load_image and datasets apply it): the same scores as the upright pixels."""
    from hf_finetune.data.decode import decode_image

    stored = np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)  # too small for reduced decoding
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    upright = decode_image({"bytes": None, "path": str(tmp_path / "sideways.jpg")})
    assert upright.shape == (48, 40, 3)
    Image.fromarray(upright).save(tmp_path / "upright.png")
    Image.fromarray(np.rot90(upright)).save(tmp_path / "wrong.png")  # the pixels as stored
    sideways, straight, wrong = predict(str(work_dir), [str(tmp_path / n) for n in ("sideways.jpg", "upright.png",
                                                                                 "wrong.png")], topk=3)
    sideways, straight, wrong = (dict(row["predictions"]) for row in (sideways, straight, wrong))
    assert sideways == pytest.approx(straight, abs=1e-5)
    assert sideways != pytest.approx(wrong, abs=1e-5)  # the orientation matters to this model
