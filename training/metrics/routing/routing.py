"""Routing metric: how experts split the data against a ground-truth class (modality or report type)."""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import normalized_mutual_info_score

_KWARGS_DESCRIPTION = """
Args:
    predictions: the expert each sample was routed to.
    references: the sample's class (e.g. modality index).
    num_experts, num_classes: sizes of the confusion table (default: the largest index seen + 1).
Returns:
    purity (share of samples whose expert's majority class is their class), nmi (normalised mutual information,
    arithmetic) and confusion ([experts][classes] counts; its row sums are the expert usage).
"""


class Routing(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Routing purity, normalised mutual information and the expert-by-class table.",
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, num_experts=None, num_classes=None):
        experts, classes = np.asarray(predictions), np.asarray(references)
        num_experts = num_experts or int(experts.max()) + 1
        num_classes = num_classes or int(classes.max()) + 1
        confusion = np.zeros((num_experts, num_classes), dtype=np.int64)
        np.add.at(confusion, (experts, classes), 1)
        return {
            "purity": float(confusion.max(axis=1).sum() / len(experts)),
            "nmi": float(normalized_mutual_info_score(classes, experts)),
            "confusion": confusion.tolist(),
        }
