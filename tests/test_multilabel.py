"""Multi-label pieces: label layouts -> multi-hot targets, the metric module, the generated dataset."""

import datasets
import numpy as np
import pytest
import torch

from hf_finetune.data.labels import (
    class_lists_to_multi_hot,
    label_layout,
    label_names,
    multi_hot_to_tensor,
    num_label_classes,
    to_multi_hot,
)
from hf_finetune.data.synthetic_multilabel import SHAPES, synthetic_multilabel_arrays, synthetic_multilabel_dataset
from hf_finetune.errors import DataError
from hf_finetune.metrics import load_multilabel

pytestmark = pytest.mark.floors  # every test here also runs at the declared floors (.ci/floors)

NAMES = ["cat", "dog", "car"]


# ----------------------------------------------------------------------------- label layouts
@pytest.mark.parametrize("feature, layout, classes", [
    (datasets.ClassLabel(names=NAMES), "single_label", 3),
    (datasets.Value("int64"), "single_label", None),
    (datasets.Sequence(datasets.ClassLabel(names=NAMES)), "class_lists", 3),
    (datasets.Sequence(datasets.Value("int32")), "class_lists", None),
    (datasets.Sequence(datasets.Value("float32"), length=3), "multi_hot", 3),
    (datasets.Sequence(datasets.Value("bool"), length=4), "multi_hot", 4),
])
def test_label_layout_of_features(feature, layout, classes):
    assert label_layout(feature) == layout
    assert num_label_classes(feature) == classes


@pytest.mark.parametrize("feature", [
    datasets.Value("string"),
    datasets.Value("float32"),
    datasets.Sequence(datasets.Value("float32")),  # no length: cannot tell the classes
    datasets.Sequence(datasets.Value("string")),
])
def test_label_layout_refuses_other_features_in_one_line(feature):
    with pytest.raises(DataError, match="label column 'tags' has feature .*expected ClassLabel") as info:
        label_layout(feature, column="tags")
    assert "\n" not in str(info.value)


def test_label_names():
    assert label_names(datasets.Sequence(datasets.ClassLabel(names=NAMES))) == NAMES
    assert label_names(datasets.ClassLabel(names=NAMES)) == NAMES
    assert label_names(datasets.Sequence(datasets.Value("float32"), length=3)) is None


def test_class_lists_and_multi_hot_give_the_same_targets():
    lists = [[0, 2], [], [1]]
    expected = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    from_lists = to_multi_hot(lists, "class_lists", 3)
    from_rows = to_multi_hot([[1, 0, 1], [0, 0, 0], [0, 1, 0]], "multi_hot", 3)
    assert from_lists.dtype == from_rows.dtype == torch.float32
    assert torch.equal(from_lists, expected) and torch.equal(from_rows, expected)


def test_multi_hot_targets_from_a_dataset_column():
    features = datasets.Features({"label": datasets.Sequence(datasets.ClassLabel(names=NAMES))})
    ds = datasets.Dataset.from_dict({"label": [[1], [0, 2]]}, features=features)
    layout = label_layout(ds.features["label"])
    assert torch.equal(to_multi_hot(ds["label"], layout, 3), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]))


@pytest.mark.parametrize("call, message", [
    (lambda: class_lists_to_multi_hot([[0], [3]], 3, "tags"),
     "label column 'tags': sample 1 names class 3; expected class indices 0..2"),
    (lambda: multi_hot_to_tensor([[1, 0]], 3, "tags"), r"shape \[1, 2\]; expected one value per class \(3\)"),
    (lambda: multi_hot_to_tensor([[1, 0, 2]], 3, "tags"), "must be 0 or 1"),
    (lambda: to_multi_hot([0, 1], "single_label", 3, "tags"), "multi-label targets need"),
])
def test_bad_label_values(call, message):
    with pytest.raises(DataError, match=message):
        call()


# ----------------------------------------------------------------------------- the metric
def test_metric_against_a_hand_computation():
    # Three samples, two classes.
    scores = [[0.9, 0.4], [0.3, 0.8], [0.6, 0.1]]
    targets = [[1, 0], [0, 1], [0, 1]]
    result = load_multilabel().compute(predictions=scores, references=targets)
    # Class 0 ranks samples 0 (pos), 2, 1: AP = 1/1. Class 1 ranks samples 1 (pos), 0, 2 (pos): AP = (1/1 + 2/3) / 2.
    assert result["multilabel/mAP"] == pytest.approx((1.0 + (1 + 2 / 3) / 2) / 2)
    # At 0.5: class 0 predicts samples 0, 2 (1 right of 2, 1 of 1 found); class 1 predicts sample 1 (1 of 1, 1 of 2).
    precision, recall = (0.5, 1.0), (1.0, 0.5)
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall)]
    assert result["multilabel/precision"] == pytest.approx(np.mean(precision))
    assert result["multilabel/recall"] == pytest.approx(np.mean(recall))
    assert result["multilabel/f1-score"] == pytest.approx(np.mean(f1))
    assert set(result) == {"multilabel/mAP", "multilabel/precision", "multilabel/recall", "multilabel/f1-score"}


def test_metric_threshold_and_topk():
    scores, targets = [[0.9, 0.4], [0.3, 0.8]], [[1, 1], [0, 1]]
    metric = load_multilabel()
    assert metric.compute(predictions=scores, references=targets, thr=0.3)["multilabel/recall"] == 1.0
    top1 = metric.compute(predictions=scores, references=targets, topk=1)
    assert top1["multilabel/recall"] == pytest.approx((1.0 + 0.5) / 2)  # class 1 misses sample 0
    with pytest.raises(ValueError, match="topk must be in 1..2"):
        metric.compute(predictions=scores, references=targets, topk=3)


def test_metric_perfect_and_reversed_rankings():
    targets = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1]]
    perfect = load_multilabel().compute(predictions=np.asarray(targets, dtype=float).tolist(), references=targets)
    assert all(value == 1.0 for value in perfect.values())
    reversed_scores = (1 - np.asarray(targets, dtype=float)).tolist()
    worst = load_multilabel().compute(predictions=reversed_scores, references=targets)
    assert worst["multilabel/mAP"] < 0.6 and worst["multilabel/recall"] == 0.0


# ----------------------------------------------------------------------------- the generated dataset
def test_synthetic_multilabel_dataset_layout_and_determinism():
    ds = synthetic_multilabel_dataset(40, seed=3)
    assert label_layout(ds.features["label"]) == "class_lists"
    assert label_names(ds.features["label"]) == list(SHAPES)
    assert isinstance(ds.features["img"], datasets.Image)
    image = ds[0]["img"]
    assert image.size == (32, 32) and image.mode == "RGB"
    counts = [len(labels) for labels in ds["label"]]
    assert min(counts) >= 1 and max(counts) <= 3
    images, labels = synthetic_multilabel_arrays(40, seed=3)
    assert labels == ds["label"] and np.array_equal(np.asarray(image), images[0])
    other_images, other_labels = synthetic_multilabel_arrays(40, seed=3, split="test")
    assert other_labels != labels


def test_synthetic_shapes_show_their_colour():
    images, labels = synthetic_multilabel_arrays(60, seed=0)
    targets = class_lists_to_multi_hot(labels, len(SHAPES))
    # Strongly red pixels (the square's colour) appear where the square is drawn, far less elsewhere.
    red = ((images[..., 0] > 190) & (images[..., 1] < 90) & (images[..., 2] < 90)).mean(axis=(1, 2))
    with_square, without = red[targets[:, 0] == 1], red[targets[:, 0] == 0]
    assert with_square.mean() > 5 * without.mean() + 0.01


def test_trainer_hooks_turn_logits_into_the_metric():
    from transformers import EvalPrediction

    from hf_finetune.metrics import MultiLabelMetrics, multilabel_scores

    logits = torch.tensor([[2.0, -1.0], [-3.0, 0.5], [0.1, -0.2]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    scores = multilabel_scores((logits,), targets)
    assert torch.allclose(scores, torch.sigmoid(logits))
    result = MultiLabelMetrics(thr=0.5)(EvalPrediction(predictions=scores.numpy(), label_ids=targets.numpy()))
    # Class 0 predicts samples 0 and 2 (sigmoid 0.52), one right; class 1 predicts sample 1, right.
    assert result["multilabel/precision"] == pytest.approx((0.5 + 1.0) / 2)
    assert result["multilabel/recall"] == 1.0 and result["multilabel/mAP"] == 1.0
    assert result["num_samples"] == 3
