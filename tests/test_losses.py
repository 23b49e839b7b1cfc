"""Each loss against a straightforward reference written here (the local loss against GLoRIA's per-caption loop)."""

import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.local_loss import TEMPERATURES
from modeling_medmoe import UNKNOWN_REPORT_TYPE
from modeling_medmoe.losses import (
    caption_image_scores,
    global_contrastive_loss,
    load_balancing_loss,
    local_contrastive_loss,
    report_type_cross_entropy,
    uses_region_gram,
)
from modeling_medmoe.processing_medmoe import NOT_A_WORD
from modeling_medmoe.text import merge_word_pieces


def reference_global_loss(image_embeds, text_embeds, scale):
    logits = scale * image_embeds @ text_embeds.T
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def reference_local_loss(words_per_caption, regions, temp1, temp2, temp3):
    """GLoRIA's loop: caption by caption, image by image; words_per_caption holds only real words [W_i, P]."""
    batch = len(words_per_caption)
    similarities = torch.zeros(batch, batch, dtype=regions.dtype)  # [image, caption]
    for caption, words in enumerate(words_per_caption):
        for image in range(batch):
            context = regions[image]
            attention = (words @ context.T).softmax(dim=0)
            attention = (temp1 * attention).softmax(dim=1)
            weighted_context = attention @ context
            cosine = F.cosine_similarity(words, weighted_context, dim=1, eps=1e-8)
            similarities[image, caption] = torch.log(torch.exp(temp2 * cosine).sum())
    logits = temp3 * similarities
    labels = torch.arange(batch)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_global_loss_matches_reference():
    torch.manual_seed(0)
    image_embeds = F.normalize(torch.randn(6, 16, dtype=torch.float64), dim=-1)
    text_embeds = F.normalize(torch.randn(6, 16, dtype=torch.float64), dim=-1)
    scale = torch.tensor(14.3, dtype=torch.float64)
    expected = reference_global_loss(image_embeds, text_embeds, scale)
    torch.testing.assert_close(global_contrastive_loss(image_embeds, text_embeds, scale), expected)


@pytest.fixture
def padded_words():
    """Captions of 3, 7, 1, 5 and 4 words, padded to 7 with garbage that the loss must ignore."""
    torch.manual_seed(1)
    lengths = [3, 7, 1, 5, 4]
    words = torch.randn(len(lengths), max(lengths), 12, dtype=torch.float64)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    words = torch.where(mask[..., None], words, 1e3 * torch.randn_like(words))
    regions = torch.randn(len(lengths), 9, 12, dtype=torch.float64)
    return words, mask, regions, lengths


@pytest.mark.parametrize("chunk_size", [0, 1, 2, 5])
def test_local_loss_matches_per_caption_loop_with_padding(padded_words, chunk_size):
    words, mask, regions, lengths = padded_words
    expected = reference_local_loss([words[i, :n] for i, n in enumerate(lengths)], regions, 4.0, 5.0, 10.0)
    loss = local_contrastive_loss(words, mask, regions, *TEMPERATURES, chunk_size=chunk_size)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("regions", [9, 40])  # few regions: norms via the Gram matrix; many: via context vectors
@pytest.mark.parametrize("recompute", [False, True])
def test_caption_image_scores_backward_matches_finite_differences(padded_words, regions, recompute):
    words, mask, _, _ = padded_words
    assert uses_region_gram(words.shape[0] * words.shape[1], regions, words.shape[2]) == (regions == 9)
    region_embeds = torch.randn(4, regions, words.shape[2], dtype=torch.float64, requires_grad=True)
    words = words.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda w, r: caption_image_scores(w, mask, r, *TEMPERATURES[:2], recompute=recompute), (words, region_embeds)
    )


def test_caption_image_scores_keep_full_precision_under_autocast(padded_words):
    words, mask, regions, _ = (
        tensor.float() if torch.is_tensor(tensor) and tensor.is_floating_point() else tensor for tensor in padded_words
    )
    expected = caption_image_scores(words, mask, regions, *TEMPERATURES[:2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = caption_image_scores(words, mask, regions, *TEMPERATURES[:2])
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected)


def test_chunked_local_loss_has_the_same_gradients(padded_words):
    words, mask, regions, _ = padded_words
    gradients = []
    for chunk_size in (0, 2):
        words_leaf, regions_leaf = words.clone().requires_grad_(), regions.clone().requires_grad_()
        local_contrastive_loss(words_leaf, mask, regions_leaf, *TEMPERATURES, chunk_size=chunk_size).backward()
        gradients.append((words_leaf.grad, regions_leaf.grad))
    torch.testing.assert_close(gradients[0], gradients[1])
    assert torch.all(gradients[0][0][~mask] == 0)


def test_local_loss_leaves_out_captions_without_words(padded_words):
    words, mask, regions, lengths = padded_words
    mask = mask.clone()
    mask[2] = False
    kept = [0, 1, 3, 4]
    expected = reference_local_loss([words[i, : lengths[i]] for i in kept], regions[kept], 4.0, 5.0, 10.0)
    torch.testing.assert_close(local_contrastive_loss(words, mask, regions, *TEMPERATURES), expected)


def test_word_pieces_are_summed_into_words():
    torch.manual_seed(2)
    token_features = torch.randn(2, 6, 4)
    # [CLS] pneu ##mo ##thorax . [SEP]  /  [CLS] ct scan [SEP] [PAD] [PAD]
    word_ids = torch.tensor([[NOT_A_WORD, 0, 0, 0, NOT_A_WORD, NOT_A_WORD], [NOT_A_WORD, 0, 1, NOT_A_WORD, -1, -1]])
    words, mask = merge_word_pieces(token_features, word_ids)
    assert words.shape == (2, 2, 4)
    assert mask.tolist() == [[True, False], [True, True]]
    torch.testing.assert_close(words[0, 0], token_features[0, 1:4].sum(dim=0))
    torch.testing.assert_close(words[1, 1], token_features[1, 2])
    assert torch.all(words[0, 1] == 0)


def test_report_type_loss_ignores_unknown_types():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    labels = torch.tensor([0, UNKNOWN_REPORT_TYPE, 2])
    expected = (F.cross_entropy(logits[[0]], labels[[0]]) + F.cross_entropy(logits[[2]], labels[[2]])) / 2
    torch.testing.assert_close(report_type_cross_entropy(logits, labels), expected)
    all_unknown = report_type_cross_entropy(logits, torch.full((3,), UNKNOWN_REPORT_TYPE))
    assert all_unknown.item() == 0.0


def test_load_balancing_loss_is_one_when_balanced_and_larger_when_not():
    uniform = torch.zeros(4, 2)
    assert load_balancing_loss(uniform, torch.tensor([0, 1, 0, 1])).item() == pytest.approx(1.0)
    confident = torch.tensor([[5.0, 0.0]] * 4)
    collapsed = load_balancing_loss(confident, torch.tensor([0, 0, 0, 0])).item()
    assert collapsed == pytest.approx(2 * 1.0 * (math.exp(5) / (math.exp(5) + 1)))


def test_local_loss_without_any_words_is_zero_with_finite_gradients(padded_words):
    words, _, regions, _ = padded_words
    words = words.clone().requires_grad_()
    loss = local_contrastive_loss(words, torch.zeros(words.shape[:2], dtype=torch.bool), regions, *TEMPERATURES)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(words.grad).all()
