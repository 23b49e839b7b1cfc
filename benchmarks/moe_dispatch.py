"""MoE dispatch: sparse (each sample runs its own expert) vs dense (all K experts run, one kept, as the authors do).

    python -m benchmarks.moe_dispatch [--quick] [--preset swin-tiny] [--batch_size 4]

1. The image side of a training step: backbone + MoE head forward and backward, with the global and local losses
   against precomputed text embeddings, sparse vs dense; and the full step with the text tower too.
2. Inference image-embedding latency of the K-expert model vs the same model built with K=1 (the routing and
   dispatch overhead).
Routing is forced to spread the batch over distinct experts (the realistic mixed-modality case). Last line: JSON
with moe_sparse_vs_dense_train_speedup and moe_routing_overhead.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import median_seconds, print_json, print_table
from modeling_medmoe import MedMoEConfig, MedMoEModel
from modeling_medmoe.losses import global_contrastive_loss, local_contrastive_loss


def build(preset: str, dispatch: str, num_experts: int | None = None) -> MedMoEModel:
    overrides = {"num_experts": num_experts} if num_experts else {}
    config = MedMoEConfig.from_preset(preset, **overrides)
    config.vision_config.expert_dispatch = dispatch
    torch.manual_seed(0)
    return MedMoEModel(config).train()


def image_side_step(model, pixels, experts, text_embeds, word_embeds, word_mask):
    """Backbone + MoE head forward and backward with both losses against fixed text-side tensors."""

    def run():
        image = model.vision_model(pixels, expert_index=experts)
        regions = model.region_projection(image.regions)
        config = model.config
        loss = global_contrastive_loss(F.normalize(image.image_embeds, dim=-1), text_embeds, model.logit_scale.exp())
        loss = loss + local_contrastive_loss(
            word_embeds,
            word_mask,
            regions,
            config.local_temperature_attention,
            config.local_temperature_word,
            config.local_temperature_logits,
            config.local_loss_chunk_size,
        )
        loss.backward()
        model.zero_grad(set_to_none=True)

    return run


def full_step(model, batch):
    def run():
        model(**batch, return_loss=True).loss.backward()
        model.zero_grad(set_to_none=True)

    return run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a few minutes here)")
    parser.add_argument("--preset", default="swin-tiny")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--words", type=int, default=25)
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else 5
    sparse, dense = build(args.preset, "sparse"), build(args.preset, "dense")
    dense.load_state_dict(sparse.state_dict())
    config = sparse.config
    side, batch = config.vision_config.image_size, args.batch_size
    pixels = torch.randn(batch, 3, side, side)
    experts = torch.arange(batch) % config.num_experts
    text_embeds = F.normalize(torch.randn(batch, config.projection_dim), dim=-1)
    word_embeds = torch.randn(batch, args.words, config.projection_dim)
    word_mask = torch.ones(batch, args.words, dtype=torch.bool)
    timings = {}
    for name, model in (("sparse", sparse), ("dense", dense)):
        timings[name] = median_seconds(
            image_side_step(model, pixels, experts, text_embeds, word_embeds, word_mask), repeats
        )
    text_batch = {
        "pixel_values": pixels,
        "input_ids": torch.randint(5, config.text_config.vocab_size, (batch, 64)),
        "attention_mask": torch.ones(batch, 64, dtype=torch.long),
        "word_ids": torch.arange(64).clamp(max=args.words - 1).repeat(batch, 1),
        "expert_index": experts,
    }
    full = {
        name: median_seconds(full_step(model, text_batch), repeats)
        for name, model in (("sparse", sparse), ("dense", dense))
    }
    rows = [("step", "sparse (s)", "dense (s)", "dense / sparse")]
    rows.append(
        (
            "image side, fwd+bwd",
            f"{timings['sparse']:.3f}",
            f"{timings['dense']:.3f}",
            f"{timings['dense'] / timings['sparse']:.2f}x",
        )
    )
    rows.append(
        (
            "full step with text tower",
            f"{full['sparse']:.3f}",
            f"{full['dense']:.3f}",
            f"{full['dense'] / full['sparse']:.2f}x",
        )
    )
    print_table(f"{args.preset}, K={config.num_experts}, {side} px, batch {batch}", rows)

    single = build(args.preset, "sparse", num_experts=1).eval()
    sparse.eval()
    with torch.no_grad():
        latency_k = median_seconds(lambda: sparse.get_image_features(pixel_values=pixels), repeats + 2)
        latency_1 = median_seconds(lambda: single.get_image_features(pixel_values=pixels), repeats + 2)
    print_table(
        "Inference image embedding latency (routed by the image router)",
        [
            ("model", "s per batch"),
            (f"K={config.num_experts}", f"{latency_k:.3f}"),
            ("K=1", f"{latency_1:.3f}"),
            ("ratio", f"{latency_k / latency_1:.3f}"),
        ],
    )
    results = {
        "moe_sparse_vs_dense_train_speedup": timings["dense"] / timings["sparse"],
        "moe_sparse_vs_dense_full_step_speedup": full["dense"] / full["sparse"],
        "moe_routing_overhead": latency_k / latency_1,
    }
    print_json(results)
    return results


if __name__ == "__main__":
    main()
