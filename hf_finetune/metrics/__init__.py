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
