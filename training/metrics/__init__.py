"""Local `evaluate` metric modules (Hub metrics cannot be fetched offline); load them by path with `load_metric`."""

from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).resolve().parent


def load_metric(name: str) -> evaluate.EvaluationModule:
    """`evaluate.load` of the module in training/metrics/NAME (classification, retrieval or routing)."""
    return evaluate.load(str(METRICS_DIR / name))
