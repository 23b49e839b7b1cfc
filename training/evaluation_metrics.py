"""The one definition of MedMoE's evaluation figures, used by pretraining's held-out check, finetune, the evaluation
CLI (training/run_evaluation.py), the model card and the benchmarks.

- Retrieval: the pool is the evaluated rows; row i's report is image i's true candidate and vice versa. Strict
  ranks are the expected rank when ties are broken at random (identical reports score identically, so they tie);
  text-match ranks count any candidate whose report equals the true report as a hit. R@K and median rank come
  from the local `retrieval` metric module.
- Routing: purity, NMI, expert usage and the expert-by-class table against a ground-truth column (modality), or
  the report type read from the text when the rows have none (local `routing` metric module).
- Zero-shot: `modeling_medmoe.zero_shot` (prompt templates and scoring live in the model package).
- The model card's entries: every metric as huggingface_hub `EvalResult` fields, one task type per metric family.

Images are always embedded on their own (see `embedding.embed_pairs`): no image is routed by its own report.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from medmoe.training.evaluation_embeddings import EmbeddedSet, embed_pairs
from medmoe.training.metrics import classification_results, load_metric
from modeling_medmoe.zero_shot import zero_shot_probabilities

DIRECTIONS = ("image_to_text", "text_to_image")
TASK_TYPES = {  # metric-name prefix -> EvalResult task type
    "zero_shot": "zero-shot-image-classification",
    "retrieval/image_to_text": "image-to-text",
    "retrieval/text_to_image": "text-to-image",
    "linear_probe": "image-classification",
    "routing": "image-classification",
    "attention": "image-classification",
}


def retrieval_ranks(similarity: torch.Tensor, same_text: torch.Tensor) -> dict[str, np.ndarray]:
    """Ranks of the true candidate (the diagonal) for every query row of `similarity` [queries, candidates].

    strict: expected 1-based rank when ties are broken at random, with tie_span (candidates tied with the true
    one, itself included) for R@K; text_match: 1 + the candidates scoring above the best candidate whose report
    equals the query's true report (`same_text` [queries, candidates] bool).
    """
    true_scores = similarity.diagonal().unsqueeze(1)
    better = (similarity > true_scores).sum(dim=1).double()
    ties = (similarity == true_scores).sum(dim=1).double()
    best_match = similarity.masked_fill(~same_text, float("-inf")).max(dim=1, keepdim=True).values
    text_match = 1 + (similarity.masked_fill(same_text, float("-inf")) > best_match).sum(dim=1)
    return {"strict": (better + (ties + 1) / 2).numpy(), "tie_span": ties.numpy(), "text_match": text_match.numpy()}


def retrieval_metrics(embedded: EmbeddedSet) -> tuple[dict[str, float], dict]:
    """Image->text and text->image retrieval over the whole embedded set (the pool).

    Returns (metrics named retrieval/DIRECTION_{R@1,R@5,R@10,median_rank} and
    retrieval/DIRECTION_text_match_..., details: pool size, distinct reports, chance R@K).
    """
    reports = embedded.texts
    pool = len(reports)
    report_ids = {report: index for index, report in enumerate(dict.fromkeys(reports))}
    report_index = torch.tensor([report_ids[report] for report in reports])
    same_text = report_index[:, None] == report_index[None, :]
    similarity = embedded.image_embeds.float() @ embedded.text_embeds.float().T
    metric = load_metric("retrieval")
    metrics, ranks = {}, {}
    for direction, scores in zip(DIRECTIONS, (similarity, similarity.T)):
        ranks[direction] = retrieval_ranks(scores, same_text)
        metrics.update(
            {f"retrieval/{direction}_{key}": value for key, value in ranked(metric, ranks[direction]).items()}
        )
    details = {
        "pool_size": pool,
        "distinct_reports": len(report_ids),
        "chance_R@1": 1 / pool,
        "chance_R@5": min(5 / pool, 1.0),
        "chance_R@10": min(10 / pool, 1.0),
        "ties": "strict ranks break ties at random (expected value); text_match counts identical reports as hits",
    }
    if "modality" in embedded.metadata:
        details["per_modality"] = per_modality_retrieval(metric, ranks, embedded.metadata["modality"])
    return metrics, details


def ranked(metric, ranks: dict[str, np.ndarray], rows: np.ndarray | None = None) -> dict[str, float]:
    """R@K and median rank, strict and text-match, of the queries `rows` (default: all) from their ranks."""
    rows = slice(None) if rows is None else rows
    strict = metric.compute(predictions=ranks["strict"][rows], tie_spans=ranks["tie_span"][rows])
    matched = metric.compute(predictions=ranks["text_match"][rows])
    return {**strict, **{f"text_match_{key}": value for key, value in matched.items()}}


def per_modality_retrieval(metric, ranks: dict, modalities: list) -> dict[str, dict]:
    """Each modality's queries scored against the whole pool (so that the figures of the modalities compare):
    {modality: {"queries": n, "DIRECTION_R@K": ..., ...}}, both directions, strict and text-match."""
    values = np.array([str(value) if value is not None else "" for value in modalities])
    figures = {}
    for modality in sorted(set(values) - {""}):
        rows = np.flatnonzero(values == modality)
        figures[modality] = {"queries": int(len(rows))}
        for direction in DIRECTIONS:
            figures[modality].update({f"{direction}_{key}": value for key, value in
                                      ranked(metric, ranks[direction], rows).items()})  # fmt: skip
    return figures


def class_labels(values: list, expert_names: list[str], class_names: list[str] | None = None):
    """(class names, class index per row) for a ground-truth column's `values`. Rows without a value, or with one
    outside `class_names`, get -1. Classes named like an expert come first, in expert order (so the routing
    table's diagonal is each expert's own class), then the rest alphabetically."""
    experts = [name.lower() for name in expert_names]

    def order(name: str) -> tuple[int, str]:
        return (experts.index(name.lower()) if name.lower() in experts else len(experts), name)

    names = class_names or sorted({str(value) for value in values if value is not None}, key=order)
    index = {name: position for position, name in enumerate(names)}
    return names, np.array([index.get(str(value), -1) if value is not None else -1 for value in values])


def routing_truth(embedded: EmbeddedSet, expert_names: list[str], label_column: str = "modality"):
    """(truth name, class names, class index per row): the label column when the rows have it, else the report
    type read from the text (an index into the expert names, -1 when unknown)."""
    if label_column in embedded.metadata:
        names, labels = class_labels(embedded.metadata[label_column], expert_names)
        return label_column, names, labels
    labels = embedded.report_type_labels.numpy().copy()
    labels[labels < 0] = -1
    return "report type", list(expert_names), labels


def expert_usage(expert_index: torch.Tensor, expert_names: list[str]) -> dict[str, float]:
    """Share of rows routed to each expert, by expert name."""
    counts = torch.bincount(expert_index.cpu(), minlength=len(expert_names)).tolist()
    return {name: count / max(len(expert_index), 1) for name, count in zip(expert_names, counts)}


def routing_metrics(
    embedded: EmbeddedSet, expert_names: list[str], label_column: str = "modality"
) -> tuple[dict[str, float], dict]:
    """Routing purity and NMI against `routing_truth`, on the rows whose truth is known.

    Returns (metrics routing/purity and routing/nmi, details: the routing metric's output with the expert and class
    names and the truth's name). Without any known row, the metrics are left out.
    """
    truth, names, labels = routing_truth(embedded, expert_names, label_column)
    known = labels >= 0
    details = {"experts": list(expert_names), "classes": names, "truth": truth, "rows_with_truth": int(known.sum())}
    if not known.any():
        return {}, details
    result = load_metric("routing").compute(
        predictions=embedded.expert_index.numpy()[known],
        references=labels[known],
        num_experts=len(expert_names),
        num_classes=len(names),
    )
    return {"routing/purity": result["purity"], "routing/nmi": result["nmi"]}, {**result, **details}


def zero_shot_metrics(
    image_embeds: torch.Tensor, class_embeds: torch.Tensor, logit_scale, labels: np.ndarray, names: list[str]
) -> tuple[dict[str, float], dict]:
    """Zero-shot classification of the rows with a known label (labels >= 0) by
    `modeling_medmoe.zero_shot_probabilities`: (zero_shot/{accuracy,mean_per_class_accuracy,auroc}, details)."""
    scores = zero_shot_probabilities(image_embeds, class_embeds, logit_scale).numpy()
    result = classification_results(scores, labels, names)
    metrics = {f"zero_shot/{key}": result[key] for key in ("accuracy", "mean_per_class_accuracy", "auroc")}
    return metrics, {**result, "classes": names}


def eval_results(metrics: dict[str, float], dataset: dict) -> list[dict]:
    """Every finite metric in huggingface_hub EvalResult fields (the model card's model-index)."""
    entries = []
    for name, value in metrics.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        task = next(task for prefix, task in TASK_TYPES.items() if name.startswith(prefix))
        entries.append(
            {
                "task_type": task,
                "dataset_type": dataset["type"],
                "dataset_name": dataset["name"],
                "dataset_split": dataset["split"],
                "metric_type": name,
                "metric_value": round(float(value), 4),
            }
        )
    return entries


LOCAL_DATASET = "local dataset"  # how a card names local data the user did not name


def public_dataset_name(dataset_name: str, files: str | None = None, card_name: str | None = None) -> str:
    """A dataset's name fit for a model card: "synthetic" or a Hub id as given; local data (a folder, files) as
    the user chose to name it (`card_name`, --dataset_card_name), else "local dataset": a hospital's folder and file
    names can be private, so none of them is written unless the user says so."""
    if files or dataset_name.startswith((".", "/", "~")) or Path(dataset_name).exists():
        return card_name or LOCAL_DATASET
    return dataset_name


def dataset_description(dataset_name: str, files: str | None, split: str | None, card_name: str | None) -> dict:
    """{"name", "type", "split"} of an evaluation dataset, with `public_dataset_name`."""
    name = public_dataset_name(dataset_name, files, card_name)
    return {"name": name, "type": name, "split": split or "eval"}


def results_document(embedded: EmbeddedSet, expert_names: list[str], metrics: dict, details: dict, dataset: dict):
    """The results every evaluation writes (results.json, eval_results.json, the card's input)."""
    return {
        "dataset": dataset,
        "num_samples": len(embedded.texts),
        "skipped_rows": dict(embedded.skipped),
        "metrics": metrics,
        "expert_usage": expert_usage(embedded.expert_index, expert_names),
        "details": details,
        "eval_results": eval_results(metrics, dataset),
    }


def evaluate_retrieval_and_routing(
    model, dataloader, device, expert_names: list[str], dataset: dict, label_column: str = "modality", progress=True
) -> dict:
    """The held-out check (pretraining, finetune): retrieval and routing on every row of `dataloader`."""
    embedded = embed_pairs(model, dataloader, device, description="evaluating", show_progress=progress)
    metrics, retrieval_details = retrieval_metrics(embedded)
    routing, routing_details = routing_metrics(embedded, expert_names, label_column)
    details = {"retrieval": retrieval_details, "routing": routing_details}
    return results_document(embedded, expert_names, {**metrics, **routing}, details, dataset)
