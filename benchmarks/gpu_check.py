"""One-call GPU check: the figures a GPU user needs, in one JSON file (run through benchmarks/gpu_check.sh).

    bash benchmarks/gpu_check.sh [--output outputs/gpu_check.json]     # on a GPU machine, after the README install
    bash benchmarks/gpu_check.sh --device cpu                          # dry run: tiny sizes, every step exercised

Measures, on one device: swin-tiny (224 px, K=6 experts, batch 32, bf16 autocast, fused AdamW) training images/s
with sparse and with dense expert dispatch and the peak device memory of each; the local loss (B=32, 25 words,
D=256, 28x28 regions) forward + backward time unchunked and chunked and the peak memory of each; a short FSDP2 run
(benchmarks/fsdp2_sharding.py under torchrun, one process per device); accelerate's FSDP path
(training/configs/fsdp.yaml with training/pretrain.py for a few nano steps: its exit status, the lines that name
FSDP, its log); and the archive's image side (medmoe-index on the device: bfloat16 autocast, pinned batches):
images/s, peak memory and agreement with float32 on the CPU. A failing part is recorded in the JSON with its error;
the rest still runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.local_loss import TEMPERATURES, inputs
from medmoe.training.loop import build_optimizer
from modeling_medmoe import MedMoEConfig, MedMoEModel
from modeling_medmoe.losses import local_contrastive_loss

ROOT = Path(__file__).resolve().parents[1]
FULL = {"preset": "swin-tiny", "batch": 32, "steps": 10, "words": 25, "grid": 28, "loss_batch": 32, "width": 256}
DRY_RUN = {"preset": "nano", "batch": 4, "steps": 2, "words": 6, "grid": 4, "loss_batch": 4, "width": 16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run at tiny sizes)")
    parser.add_argument("--output", type=Path, default=Path("outputs/gpu_check.json"))
    parser.add_argument("--fsdp_worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class PeakMemory:
    """Peak device memory (MB) of the block; on CPU, None (the dry run checks the code path, not memory). Entering
    synchronises the device, so timing can start right after."""

    def __init__(self, device: torch.device):
        self.device, self.megabytes = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.megabytes = torch.cuda.max_memory_allocated(self.device) / 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batch(config: MedMoEConfig, batch: int, device: torch.device) -> dict:
    side = config.vision_config.image_size
    words = 24
    return {
        "pixel_values": torch.randn(batch, 3, side, side, device=device),
        "input_ids": torch.randint(5, config.text_config.vocab_size, (batch, words), device=device),
        "attention_mask": torch.ones(batch, words, dtype=torch.long, device=device),
        "word_ids": torch.arange(words, device=device).repeat(batch, 1),
        "report_type_labels": torch.arange(batch, device=device) % config.num_experts,
    }


def bf16_training_step(model, optimizer, batch: dict, before_optimizer_step=None) -> float:
    """One optimizer step under bf16 autocast on the batch's device; returns the loss."""
    with torch.autocast(batch["pixel_values"].device.type, dtype=torch.bfloat16):
        loss = model(**batch, return_loss=True).loss
    loss.backward()
    if before_optimizer_step is not None:
        before_optimizer_step()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def training_images_per_s(sizes: dict, dispatch: str, device: torch.device) -> dict:
    config = MedMoEConfig.from_preset(sizes["preset"])
    config.vision_config.expert_dispatch = dispatch
    model = MedMoEModel(config).to(device).train()
    optimizer = build_optimizer(model, 1e-4, 0.05)
    batch = random_batch(config, sizes["batch"], device)
    bf16_training_step(model, optimizer, batch)  # warm-up
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        for _ in range(sizes["steps"]):
            bf16_training_step(model, optimizer, batch)
        synchronize(device)
        seconds = time.perf_counter() - start
    return {"images_per_s": sizes["batch"] * sizes["steps"] / seconds, "peak_memory_mb": peak.megabytes}


def local_loss_figures(sizes: dict, device: torch.device) -> dict:
    words, mask, regions = (
        tensor.to(device) for tensor in inputs(sizes["loss_batch"], sizes["words"], sizes["grid"], sizes["width"])
    )
    words, regions = words.detach().requires_grad_(), regions.detach().requires_grad_()
    figures = {}
    for name, chunk_size in (("unchunked", 0), ("chunked", MedMoEConfig().local_loss_chunk_size)):
        local_contrastive_loss(words, mask, regions, *TEMPERATURES, chunk_size=chunk_size).backward()  # warm-up
        with PeakMemory(device) as peak:
            start = time.perf_counter()
            local_contrastive_loss(words, mask, regions, *TEMPERATURES, chunk_size=chunk_size).backward()
            synchronize(device)
        figures[name] = {"seconds": time.perf_counter() - start, "peak_memory_mb": peak.megabytes}
    return figures


def archive_embedding_figures(sizes: dict, device: torch.device) -> dict:
    """medmoe-index's image side on the device (modeling_medmoe.ImageEncoder: pinned host batches, bfloat16
    autocast), batches of 4 x the training batch: images/s, peak device memory, and agreement with float32 on the CPU
    for the same images (the least cosine similarity of the embeddings, the share routed to the same expert)."""
    from modeling_medmoe.image_encoder import ImageEncoder

    config = MedMoEConfig.from_preset(sizes["preset"])
    torch.manual_seed(0)
    model = MedMoEModel(config).eval()
    pixels = random_batch(config, 4 * sizes["batch"], torch.device("cpu"))["pixel_values"]
    reference, reference_experts = ImageEncoder(model)(pixels)
    encoder = ImageEncoder(model.to(device), autocast_dtype=torch.bfloat16)
    encoder(pixels)  # warm-up
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        for _ in range(sizes["steps"]):
            embeddings, experts = encoder(pixels)
        seconds = time.perf_counter() - start
    cosine = torch.nn.functional.cosine_similarity(embeddings, reference, dim=-1)
    return {
        "batch": len(pixels),
        "images_per_s": len(pixels) * sizes["steps"] / seconds,
        "peak_memory_mb": memory.megabytes,
        "least_cosine_vs_cpu_float32": float(cosine.min()),
        "same_expert_share": float((experts == reference_experts).float().mean()),
    }


def fsdp_worker(sizes: dict, device_type: str) -> None:
    """Under torchrun: FSDP2 (benchmarks/fsdp2_sharding.py) for a few steps; rank 0 prints a JSON line."""
    import torch.distributed as dist

    from benchmarks.fsdp2_sharding import average_replicated_gradients, shard_with_fsdp2

    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    rank = dist.get_rank()
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    config = MedMoEConfig.from_preset(sizes["preset"])
    model = shard_with_fsdp2(MedMoEModel(config).to(device).train())
    optimizer = build_optimizer(model, 1e-4, 0.05)
    batch = random_batch(config, sizes["batch"], device)
    start = time.perf_counter()
    losses = [
        bf16_training_step(model, optimizer, batch, lambda: average_replicated_gradients(model))
        for _ in range(sizes["steps"])
    ]
    seconds = time.perf_counter() - start
    if rank == 0:
        images_per_s = sizes["batch"] * sizes["steps"] * dist.get_world_size() / seconds
        print(json.dumps({"losses": losses, "images_per_s": images_per_s}))
    dist.destroy_process_group()


def run_json_line(command: list[str]) -> dict:
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    if completed.returncode != 0:
        raise RuntimeError((completed.stderr or completed.stdout).strip().splitlines()[-1])
    return json.loads(completed.stdout.strip().splitlines()[-1])


def fsdp_figures(device: torch.device) -> dict:
    processes = torch.cuda.device_count() if device.type == "cuda" else 1
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += ["--module", "benchmarks.gpu_check", "--fsdp_worker", "--device", device.type]
    return {"processes": processes, **run_json_line(command)}


def accelerate_fsdp_run(output_dir: Path) -> dict:
    """training/pretrain.py under accelerate with training/configs/fsdp.yaml for 3 nano steps, one process."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "training/configs/fsdp.yaml"]
    command += ["--num_processes", "1", "training/pretrain.py", "--max_steps", "3", "--eval_steps", "0"]
    command += ["--max_eval_samples", "16", "--report_to", "none", "--output_dir", str(output_dir)]
    command += ["--overwrite_output_dir"]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    output = completed.stdout + completed.stderr
    log = output_dir.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(output)
    fsdp_lines = [line.strip() for line in output.splitlines() if "FSDP" in line][:5]
    return {"exit_status": completed.returncode, "lines_naming_fsdp": fsdp_lines, "log": str(log)}


def guarded(results: dict, name: str, measure) -> None:
    """results[name] = measure(), or {"error": ...} when it fails (the other parts still run)."""
    print(f"[gpu_check] {name} ...", flush=True)
    try:
        results[name] = measure()
    except Exception as error:  # noqa: BLE001 - a check reports every failure and goes on
        results[name] = {"error": f"{type(error).__name__}: {error}"}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    sizes = FULL if device.type == "cuda" else DRY_RUN
    if args.fsdp_worker:
        fsdp_worker(sizes, device.type)
        return {}
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"}
    results["sizes"] = sizes
    for dispatch in ("sparse", "dense"):
        guarded(results, f"train_{dispatch}", lambda dispatch=dispatch: training_images_per_s(sizes, dispatch, device))
    if all("images_per_s" in results[f"train_{dispatch}"] for dispatch in ("sparse", "dense")):
        sparse, dense = results["train_sparse"]["images_per_s"], results["train_dense"]["images_per_s"]
        results["moe_sparse_vs_dense_train_speedup"] = sparse / dense
    guarded(results, "local_loss", lambda: local_loss_figures(sizes, device))
    guarded(results, "fsdp2_torchrun", lambda: fsdp_figures(device))
    guarded(results, "accelerate_fsdp", lambda: accelerate_fsdp_run(args.output.parent / "gpu_check_fsdp_run"))
    guarded(results, "archive_embedding", lambda: archive_embedding_figures(sizes, device))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"Written to {args.output}")
    return results


if __name__ == "__main__":
    main()
