"""The benchmarks are runnable and compare like with like (their speed is measured by running them, not here)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.local_loss import inputs, per_caption_loop_loss
from modeling_medmoe.losses import local_contrastive_loss

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["local_loss", "moe_dispatch", "data_pipeline", "pretrain_throughput"])
def test_benchmark_has_help_and_quick(script):
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0 and "--quick" in completed.stdout


def test_the_loop_baseline_computes_the_same_loss_and_gradients():
    word_embeds, word_mask, regions = inputs(6, 7, 4, 16)
    loop = per_caption_loop_loss(word_embeds, word_mask, regions)
    loop_gradients = torch.autograd.grad(loop, (word_embeds, regions))
    ours = local_contrastive_loss(word_embeds, word_mask, regions, chunk_size=4)
    our_gradients = torch.autograd.grad(ours, (word_embeds, regions))
    torch.testing.assert_close(ours, loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_gradients, loop_gradients, atol=1e-5, rtol=1e-4)
