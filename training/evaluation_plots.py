"""Evaluation pictures: routing confusion matrix, word-region attention overlays, scale-attention maps."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from modeling_medmoe.processing_medmoe import NOT_A_WORD  # noqa: E402

MAX_WORD_PANELS = 15


def report_words(tokenizer, input_ids: torch.Tensor, word_ids: torch.Tensor) -> list[list[str]]:
    """The words of each report in `word_ids` order (word pieces joined): [batch, tokens] x2 -> word lists."""
    reports = []
    for ids, words in zip(input_ids.tolist(), word_ids.tolist()):
        pieces: dict[int, str] = {}
        for token, word in zip(tokenizer.convert_ids_to_tokens(ids), words):
            if word != NOT_A_WORD:
                pieces[word] = pieces.get(word, "") + token.removeprefix("##")
        reports.append([pieces[word] for word in sorted(pieces)])
    return reports


def display_image(pixel_values: torch.Tensor, image_mean, image_std) -> np.ndarray:
    """Undo the image processor's normalisation: [3, height, width] -> uint8 [height, width, 3]."""
    mean = torch.tensor(image_mean).view(3, 1, 1)
    std = torch.tensor(image_std).view(3, 1, 1)
    unit = (pixel_values.detach().float().cpu() * std + mean).clamp(0, 1)
    return (unit.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def plot_routing_confusion(
    confusion: np.ndarray, experts: list[str], classes: list[str], truth: str, path: Path
) -> None:
    """Counts of images per (expert, class); rows are experts."""
    figure, axis = plt.subplots(figsize=(1.2 + 0.7 * len(classes), 1.0 + 0.5 * len(experts)))
    axis.imshow(confusion, cmap="Blues")
    axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axis.set_yticks(range(len(experts)), experts)
    axis.set_xlabel(truth)
    axis.set_ylabel("routed expert")
    threshold = confusion.max() / 2 if confusion.size else 0
    for (row, column), count in np.ndenumerate(confusion):
        axis.text(column, row, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    axis.set_title("Routing: expert vs " + truth)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def upsample(attention_map: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """[h, w] -> [height, width] bilinear, for overlaying on the image."""
    return F.interpolate(attention_map[None, None].float(), size=size, mode="bilinear", align_corners=False)[
        0, 0
    ].numpy()


def plot_word_attention(
    image: np.ndarray, words: list[str], attention: torch.Tensor, report: str, expert: str, box, path: Path
) -> None:
    """The image, then one panel per word with its attention over regions; the true finding box when known.

    image: uint8 [height, width, 3]; attention: [words, h, w] (rows past len(words) are padding).
    """
    shown = words[:MAX_WORD_PANELS]
    columns = min(6, len(shown) + 1)
    rows = math.ceil((len(shown) + 1) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows + 0.5), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    height, width = image.shape[:2]
    panels = [("image", None)] + [(word, attention[index]) for index, word in enumerate(shown)]
    for axis, (title, word_map) in zip(axes.flat, panels):
        axis.imshow(image)
        if word_map is not None:
            axis.imshow(upsample(word_map, (height, width)), cmap="jet", alpha=0.5)
        if box is not None:
            x0, y0, x1, y1 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
            axis.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.2))
        axis.set_title(title, fontsize=9)
    figure.suptitle(f"[{expert} expert] {report}", fontsize=9, wrap=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_scale_attention(image: np.ndarray, scale_attention: torch.Tensor, expert: str, path: Path) -> None:
    """The chosen expert's softmax over pyramid levels at each location: one panel per level (H/4 ... H/32)."""
    levels = scale_attention.shape[0]
    figure, axes = plt.subplots(1, levels + 1, figsize=(2.3 * (levels + 1), 2.6))
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    height, width = image.shape[:2]
    for level, axis in enumerate(axes[1:]):
        shown = axis.imshow(upsample(scale_attention[level], (height, width)), cmap="viridis", vmin=0, vmax=1)
        axis.set_title(f"level {level + 1} (H/{4 * 2**level})", fontsize=9)
    for axis in axes:
        axis.axis("off")
    figure.colorbar(shown, ax=list(axes), shrink=0.8, label="scale attention")
    figure.suptitle(f"Scale attention of the {expert} expert", fontsize=10)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
