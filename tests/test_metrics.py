"""The local evaluate modules match reference computations written here."""

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score, roc_auc_score

from medmoe.training.evaluation_metrics import expert_usage, retrieval_ranks
from medmoe.training.metrics import load_metric


@pytest.fixture(scope="module")
def generator():
    return np.random.default_rng(0)


def test_retrieval_recall_and_median_rank(generator):
    ranks = generator.integers(1, 40, size=200)
    result = load_metric("retrieval").compute(predictions=ranks)
    for k in (1, 5, 10):
        assert result[f"R@{k}"] == pytest.approx(np.mean(ranks <= k))
    assert result["median_rank"] == pytest.approx(np.median(ranks))


def test_retrieval_ties_count_their_expected_share():
    # true item tied with 3 others right after 2 better candidates: ranks 3..6 equally likely
    result = load_metric("retrieval").compute(predictions=[4.5], tie_spans=[4], ks=(1, 3, 4, 6))
    assert result == {"R@1": 0.0, "R@3": 0.25, "R@4": 0.5, "R@6": 1.0, "median_rank": 4.5}


def test_retrieval_ranks_strict_and_text_match():
    import torch

    similarity = torch.tensor([[0.9, 0.9, 0.1], [0.2, 0.5, 0.8], [0.3, 0.7, 0.6]])
    same_text = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    ranks = retrieval_ranks(similarity, same_text)
    assert ranks["strict"].tolist() == [1.5, 2.0, 2.0]
    assert ranks["text_match"].tolist() == [1, 2, 2]


def test_classification_matches_reference(generator):
    references = generator.integers(0, 4, size=300)
    scores = generator.random((300, 4)) + np.eye(4)[references] * 0.5
    predictions = scores.argmax(axis=1)
    result = load_metric("classification").compute(
        predictions=predictions, references=references, prediction_scores=scores.tolist(), class_names=list("abcd")
    )
    assert result["accuracy"] == pytest.approx(np.mean(predictions == references))
    per_class = [np.mean(predictions[references == c] == c) for c in range(4)]
    assert result["mean_per_class_accuracy"] == pytest.approx(np.mean(per_class))
    aurocs = [roc_auc_score(references == c, scores[:, c]) for c in range(4)]
    assert result["auroc"] == pytest.approx(np.mean(aurocs))
    assert result["per_class_accuracy"]["c"] == pytest.approx(per_class[2])


def test_routing_matches_reference(generator):
    classes = generator.integers(0, 3, size=120)
    experts = np.where(generator.random(120) < 0.8, classes, generator.integers(0, 4, size=120))
    result = load_metric("routing").compute(predictions=experts, references=classes, num_experts=4, num_classes=3)
    confusion = np.zeros((4, 3), int)
    for expert, label in zip(experts, classes):
        confusion[expert, label] += 1
    assert result["confusion"] == confusion.tolist()
    assert result["purity"] == pytest.approx(confusion.max(axis=1).sum() / 120)
    assert result["nmi"] == pytest.approx(normalized_mutual_info_score(classes, experts))


def test_expert_usage_is_the_share_of_rows_per_expert():
    usage = expert_usage(torch.tensor([0, 2, 2, 1, 2]), ["X-ray", "CT", "MRI", "fundus"])
    assert usage == pytest.approx({"X-ray": 0.2, "CT": 0.2, "MRI": 0.6, "fundus": 0.0})


def test_per_modality_retrieval_scores_each_modalitys_queries_against_the_whole_pool():
    """Two modalities whose own pairs are perfect for CT and never found for MRI: per-modality R@1 says so, and
    the pooled figure is their query-weighted mean."""
    from medmoe.training.evaluation_embeddings import EmbeddedSet
    from medmoe.training.evaluation_metrics import retrieval_metrics

    images = torch.eye(6)
    texts = torch.eye(6)[[0, 1, 2, 4, 5, 3]]  # rows 3-5 (MRI) point at each other's reports
    embedded = EmbeddedSet(images, texts, torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long),
                           [f"report {row}" for row in range(6)], {"modality": ["CT"] * 3 + ["MRI"] * 3})  # fmt: skip
    metrics, details = retrieval_metrics(embedded)
    ct, mri = details["per_modality"]["CT"], details["per_modality"]["MRI"]
    assert ct["queries"] == mri["queries"] == 3
    assert ct["image_to_text_R@1"] == ct["text_to_image_R@1"] == 1.0
    assert mri["image_to_text_R@1"] == mri["text_to_image_R@1"] == 0.0
    assert metrics["retrieval/image_to_text_R@1"] == pytest.approx(0.5)
