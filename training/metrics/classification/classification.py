"""Classification metric: accuracy, per-class accuracy, mean per-class accuracy and one-vs-rest AUROC."""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import roc_auc_score

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class index per sample.
    references: true class index per sample.
    prediction_scores: optional, per sample a score for every class (for AUROC).
    class_names: optional names of the classes, used as keys of the per-class results.
Returns:
    accuracy, mean_per_class_accuracy, per_class_accuracy (dict), and with scores auroc (macro one-vs-rest over the
    classes present in references; each class's AUROC in per_class_auroc).
"""


class Classification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Accuracy, per-class accuracy and one-vs-rest AUROC.",
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, prediction_scores=None, class_names=None):
        predictions, references = np.asarray(predictions), np.asarray(references)
        classes = np.unique(references)
        names = class_names if class_names is not None else [str(c) for c in range(int(classes.max()) + 1)]
        per_class = {names[c]: float((predictions[references == c] == c).mean()) for c in classes}
        results = {
            "accuracy": float((predictions == references).mean()),
            "mean_per_class_accuracy": float(np.mean(list(per_class.values()))),
            "per_class_accuracy": per_class,
        }
        if prediction_scores is not None:
            scores = np.asarray(prediction_scores, dtype=np.float64)
            per_class_auroc = {
                names[c]: float(roc_auc_score(references == c, scores[:, c]))
                for c in classes
                if 0 < (references == c).sum() < len(references)
            }
            results["per_class_auroc"] = per_class_auroc
            results["auroc"] = float(np.mean(list(per_class_auroc.values()))) if per_class_auroc else float("nan")
        return results
