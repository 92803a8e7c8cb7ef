"""Multi-label metrics (mmpretrain `AveragePrecision` and `MultiLabelMetric`, macro) as an `evaluate` module.

predictions: for each sample, one score per class (sigmoid probabilities, as mmpretrain's
MultiLabelLinearClsHead predicts); references: for each sample, 0/1 per class (multi-hot).
Result keys, fractions in [0, 1] (mmpretrain prints the same values times 100):
  multilabel/mAP        mean over classes of the average precision of the ranked scores
  multilabel/precision  macro precision of the predicted positives
  multilabel/recall     macro recall
  multilabel/f1-score   mean over classes of each class's F1
A class is predicted positive when its score >= thr (default 0.5), or, with topk, when it is
among the sample's k best scores. A class with no positive reference counts 0 in mAP, and
per-class counts of zero divide by one, as in mmpretrain.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Multi-label classification: mean average precision and macro precision / recall / F1."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of float): per-class scores (probabilities) per sample.
    references (list of list of int): per-class 0/1 targets per sample.
    thr (float): score at or above which a class counts as predicted. Defaults to 0.5.
    topk (int, optional): count each sample's k best classes as predicted instead of using thr.
Returns:
    dict: {"multilabel/mAP", "multilabel/precision", "multilabel/recall", "multilabel/f1-score": float in [0, 1]}
Example:
    >>> metric = evaluate.load("hf_finetune/metrics/multilabel")
    >>> metric.compute(predictions=[[0.9, 0.2], [0.6, 0.7]], references=[[1, 0], [0, 1]])
    {'multilabel/mAP': 1.0, 'multilabel/precision': 0.75, 'multilabel/recall': 1.0,
     'multilabel/f1-score': 0.8333333333333333}
"""


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class AP: the mean, over the positives, of the precision at each positive's rank."""
    order = np.argsort(-scores, axis=0, kind="stable")
    ranked = np.take_along_axis(targets, order, axis=0) == 1
    hits = np.cumsum(ranked, axis=0)
    precision_at_rank = hits / np.arange(1, len(scores) + 1)[:, None]
    return (precision_at_rank * ranked).sum(axis=0) / np.maximum(ranked.sum(axis=0), 1)


def predicted_positive(scores: np.ndarray, thr: float, topk: int | None) -> np.ndarray:
    if topk is None:
        return scores >= thr
    best = np.argsort(-scores, axis=1, kind="stable")[:, :topk]
    positive = np.zeros_like(scores, dtype=bool)
    np.put_along_axis(positive, best, True, axis=1)
    return positive


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MultiLabel(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references, thr=0.5, topk=None):
        scores = np.asarray(predictions, dtype=np.float64)
        targets = np.asarray(references, dtype=np.int64)
        if scores.ndim != 2 or scores.shape != targets.shape:
            raise ValueError(f"predictions and references must both be [samples, classes]; got {scores.shape} "
                             f"and {targets.shape}")
        if topk is not None and not 1 <= topk <= scores.shape[1]:
            raise ValueError(f"topk must be in 1..{scores.shape[1]}, got {topk}")
        positive, actual = predicted_positive(scores, thr, topk), targets == 1
        true_positive = (positive & actual).sum(axis=0)
        precision = true_positive / np.maximum(positive.sum(axis=0), 1)
        recall = true_positive / np.maximum(actual.sum(axis=0), 1)
        f1 = 2 * precision * recall / np.maximum(precision + recall, np.finfo(np.float32).eps)
        return {
            "multilabel/mAP": float(average_precision(scores, targets).mean()),
            "multilabel/precision": float(precision.mean()),
            "multilabel/recall": float(recall.mean()),
            "multilabel/f1-score": float(f1.mean()),
        }
