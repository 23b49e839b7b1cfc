"""Local (GLoRIA) loss: our vectorised, chunked loss vs the authors' per-caption loop.

    python -m benchmarks.local_loss [--quick]

Speed at B=32, 25 words, D=256 on 14x14 and 28x28 region grids (forward + backward, median after warm-up), the
path our loss took there (context norms from the regions' Gram matrix or from the context vectors), the largest
difference from the loop in the loss and in its gradients, and the peak memory (RSS, each variant in its own
process) of the chunked loss vs the unchunked one at B=64 on the 28x28 grid. Last line: JSON with
local_loss_vectorised_speedup (the smaller of the two grids), local_loss_chunked_memory_ratio and the largest loss
and gradient differences.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import median_seconds, print_json, print_table
from modeling_medmoe import MedMoEConfig
from modeling_medmoe.losses import local_contrastive_loss, uses_region_gram

TEMPERATURES = (  # GLoRIA's temp1, temp2, temp3, as MedMoEConfig holds them
    MedMoEConfig.local_temperature_attention,
    MedMoEConfig.local_temperature_word,
    MedMoEConfig.local_temperature_logits,
)


def per_caption_loop_loss(words, word_mask, regions, temp1, temp2, temp3):
    """The authors' loop: one caption at a time, batched over all images (GLoRIA's local_loss)."""
    batch = regions.shape[0]
    context = regions.transpose(1, 2)  # [images, P, regions]
    similarities = []
    for caption in range(batch):
        count = int(word_mask[caption].sum())
        word = words[caption, :count].T.unsqueeze(0).repeat(batch, 1, 1)  # [images, P, words]
        attention = torch.bmm(context.transpose(1, 2), word)  # [images, regions, words]
        attention = attention.softmax(dim=-1).transpose(1, 2)  # softmax over words -> [images, words, regions]
        attention = (temp1 * attention).softmax(dim=-1)
        weighted_context = torch.bmm(context, attention.transpose(1, 2))  # [images, P, words]
        cosine = F.cosine_similarity(word.transpose(1, 2), weighted_context.transpose(1, 2), dim=2, eps=1e-8)
        similarities.append(torch.log(torch.exp(temp2 * cosine).sum(dim=1, keepdim=True)))
    logits = temp3 * torch.cat(similarities, dim=1)  # [images, captions]
    labels = torch.arange(batch)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def inputs(batch: int, words: int, grid: int, width: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    word_embeds = torch.randn(batch, words, width, generator=generator, requires_grad=True)
    lengths = torch.randint(words // 2, words + 1, (batch,), generator=generator)
    word_mask = torch.arange(words)[None, :] < lengths[:, None]
    regions = torch.randn(batch, grid * grid, width, generator=generator, requires_grad=True)
    return word_embeds, word_mask, regions


def loss_and_gradients(loss_fn, word_embeds, word_mask, regions, **kwargs) -> list[torch.Tensor]:
    loss = loss_fn(word_embeds, word_mask, regions, *TEMPERATURES, **kwargs)
    return [loss, *torch.autograd.grad(loss, (word_embeds, regions))]


def step(loss_fn, word_embeds, word_mask, regions, **kwargs):
    """A timed call: forward and backward of `loss_fn` at GLoRIA's temperatures."""

    def run():
        loss = loss_fn(word_embeds, word_mask, regions, *TEMPERATURES, **kwargs)
        loss.backward()
        return loss

    return run


def peak_rss_megabytes(chunk_size: int, batch: int, grid: int) -> float:
    """One forward + backward in a fresh process: its peak RSS (VmHWM, reset after the inputs are made) minus the
    RSS before the loss, in MB."""
    code = (
        "import torch\n"
        "from benchmarks.local_loss import TEMPERATURES, inputs\n"
        "from modeling_medmoe.losses import local_contrastive_loss\n"
        "def status(key):\n"
        "    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(key))\n"
        f"w, m, r = inputs({batch}, 25, {grid}, 256)\n"
        "open('/proc/self/clear_refs', 'w').write('5'); before = status('VmRSS:')\n"
        f"local_contrastive_loss(w, m, r, *TEMPERATURES, chunk_size={chunk_size}).backward()\n"
        "print((status('VmHWM:') - before) / 1024)\n"
    )
    root = Path(__file__).resolve().parents[1]  # `benchmarks` importable, as under python -m
    completed = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    return float(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (under a minute here)")
    parser.add_argument(
        "--chunk_size", type=int, default=MedMoEConfig().local_loss_chunk_size, help="captions per chunk"
    )
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 7
    torch.manual_seed(0)
    rows = [
        (
            "grid",
            "per-caption loop (s)",
            "vectorised (s)",
            f"chunked {args.chunk_size} (s)",
            "speedup",
            "context norms via",
            "max |diff| loss, gradients",
        )
    ]
    speedups, largest_differences = [], [0.0, 0.0]
    for grid in (14, 28):
        word_embeds, word_mask, regions = inputs(32, 25, grid, 256)
        reference = loss_and_gradients(per_caption_loop_loss, word_embeds, word_mask, regions)
        differences = [0.0, 0.0]  # loss, gradients: the largest over the unchunked and the chunked loss
        for chunk_size in (0, args.chunk_size):
            ours = loss_and_gradients(local_contrastive_loss, word_embeds, word_mask, regions, chunk_size=chunk_size)
            for index, (value, expected) in enumerate(zip(ours, reference)):
                differences[min(index, 1)] = max(
                    differences[min(index, 1)], float((value - expected).detach().abs().max())
                )
        loop = median_seconds(step(per_caption_loop_loss, word_embeds, word_mask, regions), repeats)
        vectorised = median_seconds(
            step(local_contrastive_loss, word_embeds, word_mask, regions, chunk_size=0), repeats
        )
        chunked = median_seconds(
            step(local_contrastive_loss, word_embeds, word_mask, regions, chunk_size=args.chunk_size), repeats
        )
        best = min(vectorised, chunked)
        speedups.append(loop / best)
        largest_differences = [max(pair) for pair in zip(largest_differences, differences)]
        rows.append(
            (
                f"{grid}x{grid}",
                f"{loop:.3f}",
                f"{vectorised:.3f}",
                f"{chunked:.3f}",
                f"{loop / best:.2f}x",
                "Gram matrix" if uses_region_gram(25 * 32, grid * grid, 256) else "context vectors",
                f"{differences[0]:.1e}, {differences[1]:.1e}",
            )
        )
    print_table("Local loss, B=32, 25 words, D=256, forward + backward (median)", rows)

    unchunked = peak_rss_megabytes(0, 64, 28)
    chunked = peak_rss_megabytes(args.chunk_size, 64, 28)
    print_table(
        "Peak memory of one forward + backward, B=64, 28x28 regions (RSS growth, own process)",
        [
            ("variant", "MB"),
            ("unchunked", f"{unchunked:.0f}"),
            (f"chunked ({args.chunk_size} captions)", f"{chunked:.0f}"),
        ],
    )
    results = {
        "local_loss_vectorised_speedup": min(speedups),
        "local_loss_chunked_memory_ratio": chunked / unchunked,
        "local_loss_max_loss_difference": largest_differences[0],
        "local_loss_max_gradient_difference": largest_differences[1],
    }
    print_json(results)
    return results


if __name__ == "__main__":
    main()
