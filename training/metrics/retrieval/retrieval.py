"""Retrieval metric: recall at K and median rank from the 1-based rank of each query's true item."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """R@K is the share of queries whose true item ranks K or better; the median rank is over all queries.
Ranks may be fractional (expected rank under random tie-breaking); R@K then uses the expected hit probability."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: the 1-based rank of the true item for each query (float, may be an expected rank).
    ks: the K of each R@K (default 1, 5, 10).
    tie_spans: optional, per query the number of candidates tied with the true item (itself included); with
        fractional ranks, R@K counts the probability that random tie-breaking puts the true item within K.
Returns:
    {"R@1": ..., "R@5": ..., "R@10": ..., "median_rank": ...}
"""


class Retrieval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64")}),
        )

    def _compute(self, predictions, ks=(1, 5, 10), tie_spans=None):
        ranks = np.asarray(predictions, dtype=np.float64)
        spans = np.ones_like(ranks) if tie_spans is None else np.asarray(tie_spans, dtype=np.float64)
        better = ranks - (spans + 1) / 2  # candidates strictly better than the tied group
        results = {}
        for k in ks:
            hit_probability = np.clip((k - better) / spans, 0.0, 1.0)
            results[f"R@{k}"] = float(hit_probability.mean())
        results["median_rank"] = float(np.median(ranks))
        return results
