"""Precision / recall / F1 / support of a single-label classifier (mmpretrain `SingleLabelMetric`) as an `evaluate` module.

predictions: the predicted (top-1) class per sample; references: the true class; scores: the
predicted class's probability per sample; num_classes: how many.
A prediction counts as positive for its class when its score is above thr (strictly, as in
mmpretrain); thr None counts every prediction, and so do all thresholds without scores (as
mmpretrain ignores thrs when it has labels only). Per class: precision = TP / predicted,
recall = TP / true, counts of zero dividing by one, F1 their harmonic mean.
average "macro": the mean over classes (F1 the mean of the per-class F1s); "micro": from the
counts summed over classes; None: every class's value, as a list.
Result keys (fractions in [0, 1]; mmpretrain prints the same values times 100, support a count):
  single-label/{item}{thr suffix}{average suffix}
with item in precision, recall, f1-score, support; the thr suffix "_thr-0.50" or "_no-thr"
only when several thresholds are asked for; the average suffix "" (macro), "_micro" or
"_classwise" (None), as mmpretrain names them.
"""

import datasets
import evaluate
import numpy as np

ITEMS = ("precision", "recall", "f1-score", "support")
AVERAGES = ("macro", "micro", None)

_DESCRIPTION = "Single-label classification: precision, recall, F1 and support, per class or averaged."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class per sample.
    references (list of int): true class per sample.
    num_classes (int): number of classes.
    scores (list of float, optional): the predicted class's probability per sample (without: thrs do not apply).
    thrs (float, None or list of them): score above which a prediction counts. Defaults to 0.0.
    items (list of str): from "precision", "recall", "f1-score", "support". Defaults to the first three.
    average (str or None): "macro", "micro" or None (per class). Defaults to "macro".
Returns:
    dict: {"single-label/precision": float in [0, 1], ...} (lists per class when average is None)
Example:
    >>> metric = evaluate.load("hf_finetune/metrics/single_label")
    >>> metric.compute(predictions=[0, 1, 1, 2], references=[0, 2, 1, 2], num_classes=3, thrs=None)
    {'single-label/precision': 0.8333333333333334, 'single-label/recall': 0.8333333333333334,
     'single-label/f1-score': 0.7777777777777777}
"""


def class_counts(predictions, references, num_classes, positive):
    """(true positives, predicted, true) per class; `positive` says which predictions count."""
    true_positive = np.bincount(predictions[positive & (predictions == references)], minlength=num_classes)
    predicted = np.bincount(predictions[positive], minlength=num_classes)
    actual = np.bincount(references, minlength=num_classes)
    return true_positive, predicted, actual


def precision_recall_f1(true_positive, predicted, actual):
    precision = true_positive / np.maximum(predicted, 1)
    recall = true_positive / np.maximum(actual, 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, np.finfo(np.float32).eps)
    return precision, recall, f1


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SingleLabel(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, num_classes, scores=None, thrs=0.0,
                 items=("precision", "recall", "f1-score"), average="macro"):
        predicted_class = np.asarray(predictions, dtype=np.int64)
        true_class = np.asarray(references, dtype=np.int64)
        thrs = list(thrs) if isinstance(thrs, (list, tuple)) else [thrs]
        if average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
        if set(items) - set(ITEMS):
            raise ValueError(f"items must be among {ITEMS}, got {list(items)}")
        for values in (predicted_class, true_class):
            if len(values) and not 0 <= values.min() <= values.max() < num_classes:
                raise ValueError(f"class indices must be in 0..{num_classes - 1}")
        if scores is None:
            thrs = [None]
        elif len(scores) != len(predicted_class):
            raise ValueError(f"{len(scores)} scores for {len(predicted_class)} predictions")
        else:
            scores = np.asarray(scores, dtype=np.float64)
        suffix = {"macro": "", "micro": "_micro", None: "_classwise"}[average]
        results = {}
        for thr in thrs:
            positive = np.ones(len(predicted_class), dtype=bool) if thr is None else scores > thr
            counts = class_counts(predicted_class, true_class, num_classes, positive)
            if average == "micro":
                counts = [c.sum() for c in counts]
            precision, recall, f1 = precision_recall_f1(*counts)
            values = {"precision": precision, "recall": recall, "f1-score": f1, "support": counts[2]}
            thr_suffix = "" if len(thrs) == 1 else "_no-thr" if thr is None else f"_thr-{thr:.2f}"
            for item in items:
                value = values[item]
                if average is None:
                    value = value.tolist()
                elif item == "support":
                    value = int(np.sum(value))
                else:
                    value = float(np.mean(value))
                results[f"single-label/{item}{thr_suffix}{suffix}"] = value
        return results
