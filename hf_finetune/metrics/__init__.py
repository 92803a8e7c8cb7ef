"""Metrics shipped with the package, loadable offline as `evaluate` modules."""

import os

import numpy as np

ACCURACY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "accuracy")
MULTILABEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multilabel")
SINGLE_LABEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "single_label")
# mmpretrain's MultiLabelClsHead / MultiLabelMetric: with neither thr nor topk set, a class
# counts as predicted at this score.
DEFAULT_THR = 0.5


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


def multilabel_rule(cfg):
    """(thr, topk): when a multi-label model predicts a class. The recipe's MultiLabelMetric
    evaluator, else the head's thr; with neither thr nor topk, DEFAULT_THR."""
    evaluator = next((e for e in cfg.val_evaluator if e.type == "MultiLabelMetric"), None)
    thr = evaluator.thr if evaluator and evaluator.thr is not None else cfg.model.head.thr
    topk = evaluator.topk if evaluator else None
    topk = topk[0] if isinstance(topk, list) else topk
    return (DEFAULT_THR if thr is None and topk is None else thr), topk


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

    def __init__(self, thr: float = DEFAULT_THR, topk: int | None = None):
        self.metric = load_multilabel()
        self.thr, self.topk = thr, topk

    def __call__(self, eval_pred):
        scores, targets = eval_pred.predictions, eval_pred.label_ids
        results = self.metric.compute(predictions=scores.tolist(), references=(targets > 0.5).astype("int64").tolist(),
                                      thr=self.thr, topk=self.topk)
        results["num_samples"] = int(len(targets))
        return results
