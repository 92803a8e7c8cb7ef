"""Top-k accuracy (mmcls `Accuracy` evaluator) as an `evaluate` module.

predictions: for each sample, class indices ranked best first (at least max(topk) of them,
or all classes when there are fewer); references: the true class index.
Result keys: accuracy_top1, accuracy_top5, ... as fractions in [0, 1]. A k larger than the
number of ranked classes is clipped to it (so top-5 on a 3-class problem is top-3).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-k classification accuracy: the share of samples whose true class is among the k best predictions."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of int): class indices ranked best first, per sample.
    references (list of int): true class index per sample.
    topk (int or list of int): the k values to report. Defaults to (1,).
Returns:
    dict: {"accuracy_top{k}": float in [0, 1] for each k}
Example:
    >>> metric = evaluate.load("hf_finetune/metrics/accuracy")
    >>> metric.compute(predictions=[[2, 0, 1]], references=[0], topk=[1, 2])
    {'accuracy_top1': 0.0, 'accuracy_top2': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, topk=(1,)):
        ks = [topk] if isinstance(topk, int) else list(topk)
        if any(k < 1 for k in ks):
            raise ValueError(f"topk values must be >= 1, got {ks}")
        ranked = np.asarray(predictions, dtype=np.int64)
        labels = np.asarray(references, dtype=np.int64)
        if ranked.ndim != 2 or len(ranked) != len(labels):
            raise ValueError("predictions must be one ranked list of class indices per reference")
        hits = ranked == labels[:, None]
        results = {}
        for k in ks:
            kk = min(k, ranked.shape[1])
            correct = hits[:, :kk].any(axis=1)
            results[f"accuracy_top{k}"] = float(correct.mean()) if len(labels) else 0.0
        return results
