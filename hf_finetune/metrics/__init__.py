"""Metrics shipped with the package, loadable offline as `evaluate` modules."""

import os
import re

# Top-k accuracy is reported as accuracy_top{k} (the accuracy module writes these keys); mmpretrain,
# and so recipes (save_best, EarlyStoppingHook.monitor) and mmengine-style logs, name it accuracy/top{k}.
TOPK_PATTERN = r"accuracy_top(?P<k>\d+)"
TOPK_KEY = re.compile(rf"^{TOPK_PATTERN}$")


def metric_key(name: str) -> str:
    """A recipe's (mmpretrain's) metric name -> the key our evaluation reports: accuracy/top1 ->
    accuracy_top1; other names are the same."""
    return name.replace("accuracy/top", "accuracy_top")


def mmpretrain_name(key: str) -> str:
    """Our metric key -> mmpretrain's name of it (accuracy_top1 -> accuracy/top1)."""
    match = TOPK_KEY.match(key)
    return f"accuracy/top{match['k']}" if match else key


def reported_names(topk, multi_label, single_label=()):
    """The metric names (as recipes write them) that an evaluation reports as one number each,
    so that can pick the best checkpoint: the loss, then the multi-label metrics, or the top-k
    accuracies and each SingleLabelMetric's averaged items. topk: the ks reported;
    single_label: the SingleLabelMetric options (thrs, items, average), as SingleLabelMetrics
    takes them. Per-class values (average None) are lists, never a best metric."""
    if multi_label:  # MultiLabelMetrics reports all four for either evaluator type
        return ["loss"] + [f"multilabel/{item}" for item in ("mAP", "precision", "recall", "f1-score")]
    names = ["loss"] + [f"accuracy/top{k}" for k in topk]
    for options in single_label:
        if options["average"] is None:
            continue
        # The keys single_label/single_label.py writes (see its docstring); that module is
        # loaded by `evaluate` and imports it, too heavy to parse a recipe.
        thrs = options["thrs"] if isinstance(options["thrs"], (list, tuple)) else [options["thrs"]]
        average = "" if options["average"] == "macro" else "_micro"
        for thr in thrs:
            thr_suffix = "" if len(thrs) == 1 else "_no-thr" if thr is None else f"_thr-{thr:.2f}"
            names += [f"single-label/{item}{thr_suffix}{average}" for item in options["items"]]
    return names


def in_percent(name: str) -> bool:
    """Whether mmpretrain reports the metric in percent (ours are fractions): all but the loss."""
    return metric_key(name) != "loss"


import numpy as np

ACCURACY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "accuracy")
MULTILABEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multilabel")
SINGLE_LABEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "single_label")


def load_accuracy():
    """Top-k accuracy as an `evaluate` module, read from this package (no Hub needed)."""
    import evaluate

    return evaluate.load(ACCURACY_PATH)


def load_multilabel():
    """Multi-label mAP and macro precision / recall / F1 as an `evaluate` module, read from this package."""
    import evaluate

    return evaluate.load(MULTILABEL_PATH)


def load_single_label():
    """Precision / recall / F1 / support (mmpretrain SingleLabelMetric) as an `evaluate` module, read from this package."""
    import evaluate

    return evaluate.load(SINGLE_LABEL_PATH)


CONFUSION_KEY = "confusion_matrix"  # [true class][predicted class] counts, in evaluate()'s results


def confusion_matrix(predicted, references, num_classes):
    """[true class][predicted class] counts."""
    cells = np.asarray(references, dtype=np.int64) * num_classes + np.asarray(predicted, dtype=np.int64)
    return np.bincount(cells, minlength=num_classes * num_classes).reshape(num_classes, num_classes).tolist()


class SingleLabelMetrics:
    """Trainer `compute_metrics` for single-label models: top-k accuracy (mmcls Accuracy) and the
    recipe's SingleLabelMetric evaluators, through the shipped `evaluate` modules.

    Predictions are (ranked classes [N, k], the top class's probability [N]), as
    `ranked_classes` keeps them; single_label: the SingleLabelMetric options (thrs, items, average)."""

    def __init__(self, topk, num_classes, single_label=()):
        self.accuracy = load_accuracy()
        self.per_class = load_single_label() if single_label else None
        self.topk, self.num_classes, self.single_label = topk, num_classes, list(single_label)

    def __call__(self, eval_pred):
        (ranked, top_score), labels = eval_pred.predictions, eval_pred.label_ids
        results = self.accuracy.compute(predictions=ranked.tolist(), references=labels.tolist(), topk=self.topk)
        for options in self.single_label:
            results.update(self.per_class.compute(
                predictions=ranked[:, 0].tolist(), references=labels.tolist(), scores=top_score.tolist(),
                num_classes=self.num_classes, **options))
        results["num_samples"] = int(len(labels))
        # Returned with the metrics so evaluate() hands it over; FinetuneTrainer.log keeps it out
        # of the log history (a million numbers per evaluation at 1,000 classes).
        results[CONFUSION_KEY] = confusion_matrix(ranked[:, 0], labels, self.num_classes)
        return results


def ranked_classes(k):
    """Trainer `preprocess_logits_for_metrics` for single-label models: the k best classes and
    the best one's probability; less to gather across processes than the logits."""

    def keep(logits, labels):
        if isinstance(logits, tuple):
            logits = logits[0]
        top_probability = logits.float().softmax(-1).amax(-1)
        return logits.topk(k, dim=-1).indices, top_probability

    return keep


def multilabel_scores(logits, labels):
    """Trainer `preprocess_logits_for_metrics` for multi-label models: per-class sigmoid scores."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.float().sigmoid()


class MultiLabelMetrics:
    """Trainer `compute_metrics` for multi-label models (mmpretrain MultiLabelLinearClsHead's thr / topk)."""

    def __init__(self, thr: float | None, topk: int | None = None):
        self.metric = load_multilabel()
        self.thr, self.topk = thr, topk

    def __call__(self, eval_pred):
        scores, targets = eval_pred.predictions, eval_pred.label_ids
        results = self.metric.compute(predictions=scores.tolist(), references=(targets > 0.5).astype("int64").tolist(),
                                      thr=self.thr, topk=self.topk)
        results["num_samples"] = int(len(targets))
        return results
