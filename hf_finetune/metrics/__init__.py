"""Metrics shipped with the package, loadable offline as `evaluate` modules."""

import os

ACCURACY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "accuracy")
MULTILABEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multilabel")


def load_accuracy():
    """Top-k accuracy as an `evaluate` module, read from this package (no Hub needed)."""
    import evaluate

    return evaluate.load(ACCURACY_PATH)


def load_multilabel():
    """Multi-label mAP and macro precision / recall / F1 as an `evaluate` module, read from this package."""
    import evaluate

    return evaluate.load(MULTILABEL_PATH)


def multilabel_scores(logits, labels):
    """Trainer `preprocess_logits_for_metrics` for multi-label models: per-class sigmoid scores."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.float().sigmoid()


class MultiLabelMetrics:
    """Trainer `compute_metrics` for multi-label models (mmpretrain MultiLabelLinearClsHead's thr / topk)."""

    def __init__(self, thr: float = 0.5, topk: int | None = None):
        self.metric = load_multilabel()
        self.thr, self.topk = thr, topk

    def __call__(self, eval_pred):
        scores, targets = eval_pred.predictions, eval_pred.label_ids
        results = self.metric.compute(predictions=scores.tolist(), references=(targets > 0.5).astype("int64").tolist(),
                                      thr=self.thr, topk=self.topk)
        results["num_samples"] = int(len(targets))
        return results
