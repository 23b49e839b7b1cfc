"""Local `evaluate` metric modules (Hub metrics cannot be fetched offline); load them by path with `load_metric`."""

from pathlib import Path

import evaluate
import numpy as np

METRICS_DIR = Path(__file__).resolve().parent


def load_metric(name: str) -> evaluate.EvaluationModule:
    """`evaluate.load` of the module in training/metrics/NAME (classification, retrieval or routing)."""
    return evaluate.load(str(METRICS_DIR / name))


def classification_results(scores: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """The classification metric on the rows with a known label (label >= 0): scores [rows, classes] -> results."""
    known = labels >= 0
    return load_metric("classification").compute(
        predictions=scores.argmax(axis=1)[known],
        references=labels[known],
        prediction_scores=scores[known].tolist(),
        class_names=class_names,
    )
