"""Metrics shipped with the package, loadable offline as `evaluate` modules."""

import os

ACCURACY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "accuracy")


def load_accuracy():
    """Top-k accuracy as an `evaluate` module, read from this package (no Hub needed)."""
    import evaluate

    return evaluate.load(ACCURACY_PATH)
