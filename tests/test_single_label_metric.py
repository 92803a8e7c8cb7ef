"""SingleLabelMetric (mmpretrain's precision / recall / F1 / support) as a shipped evaluate module and in compute_metrics."""

import pytest
import torch
from transformers import EvalPrediction

from hf_finetune.metrics import SingleLabelMetrics, confusion_matrix, load_single_label, ranked_classes


def test_macro_matches_mmpretrains_documented_example():
    # mmpretrain's docstring: SingleLabelMetric.calculate([0, 1, 1, 3], [0, 2, 1, 3], num_classes=4)
    # -> (62.5, 75.0, 66.6667, 4); here as fractions.
    result = load_single_label().compute(predictions=[0, 1, 1, 3], references=[0, 2, 1, 3], num_classes=4,
                                         thrs=None, items=["precision", "recall", "f1-score", "support"])
    assert result == pytest.approx({"single-label/precision": 0.625, "single-label/recall": 0.75,
                                    "single-label/f1-score": 2 / 3, "single-label/support": 4})


def test_micro_per_class_and_thresholds_by_hand():
    metric = load_single_label()
    predictions, references = [0, 1, 1, 2, 2], [0, 2, 1, 2, 0]
    scores = [0.9, 0.4, 0.8, 0.6, 0.3]
    # Per class: 0 predicted once (right), true twice; 1 predicted twice, right once; 2 predicted twice, right once.
    per_class = metric.compute(predictions=predictions, references=references, num_classes=3, average=None,
                               items=["precision", "recall", "support"])
    assert per_class == {"single-label/precision_classwise": pytest.approx([1.0, 0.5, 0.5]),
                         "single-label/recall_classwise": pytest.approx([0.5, 1.0, 0.5]),
                         "single-label/support_classwise": [2, 1, 2]}
    micro = metric.compute(predictions=predictions, references=references, num_classes=3, average="micro")
    assert micro == pytest.approx({"single-label/precision_micro": 3 / 5, "single-label/recall_micro": 3 / 5,
                                   "single-label/f1-score_micro": 3 / 5})
    # Above 0.5 only samples 0, 2 and 3 count as predicted (all right): class 1 loses its wrong prediction.
    both = metric.compute(predictions=predictions, references=references, num_classes=3, scores=scores,
                          thrs=[None, 0.5], items=["precision"], average=None)
    assert both == {"single-label/precision_no-thr_classwise": pytest.approx([1.0, 0.5, 0.5]),
                    "single-label/precision_thr-0.50_classwise": pytest.approx([1.0, 1.0, 1.0])}
    # Without scores thresholds do not apply (mmpretrain, given labels only).
    assert metric.compute(predictions=predictions, references=references, num_classes=3, thrs=0.99) == \
        metric.compute(predictions=predictions, references=references, num_classes=3, thrs=None)


def test_compute_metrics_takes_the_ranked_classes_and_the_top_probability():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 1.0, 2.0], [1.5, 0.0, 0.5]])
    labels = torch.tensor([0, 1, 1, 2])
    ranked, top = ranked_classes(2)((logits,), labels)
    assert ranked[:, 0].tolist() == [0, 1, 2, 0]
    assert torch.allclose(top, logits.softmax(-1).amax(-1))
    metrics = SingleLabelMetrics([1, 2], 3, [{"thrs": 0.5, "items": ["recall"], "average": "macro"}])
    result = metrics(EvalPrediction(predictions=(ranked.numpy(), top.numpy()), label_ids=labels.numpy()))
    assert result["accuracy_top1"] == 0.5 and result["accuracy_top2"] == 1.0 and result["num_samples"] == 4
    # Sample 1's right prediction has probability 0.36: below 0.5 it does not count, so class 1's
    # two images are both missed; class 0's one is found, class 2's one (predicted 0) missed.
    assert result["single-label/recall"] == pytest.approx((1.0 + 0.0 + 0.0) / 3)
    assert confusion_matrix(ranked[:, 0].numpy(), labels.numpy(), 3) == [[1, 0, 0], [0, 1, 1], [1, 0, 0]]
