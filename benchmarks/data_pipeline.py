"""Data pipeline: decode + transform images/s with 0, 1 and 2 DataLoader workers vs the model's training throughput.

    python -m benchmarks.data_pipeline [--quick]

The rows are PNG phantoms in a parquet file (decoded, checked, resized, normalised and tokenised exactly as in
training). Training throughput is forward + backward of the same batches. Last line: JSON with
data_vs_train_throughput (the best data rate over the training rate, for the slower preset; > 1 means the data
is never the bottleneck).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch

from benchmarks.common import median_seconds, print_json, print_table
from medmoe.training import data as data_module
from medmoe.training.evaluation_embeddings import model_inputs
from medmoe.training.synthetic import make_phantom
from medmoe.training.tokenizer import train_wordpiece_tokenizer
from modeling_medmoe import MedMoEConfig, MedMoEImageProcessor, MedMoEModel, MedMoEProcessor


def write_parquet(folder: Path, rows: int, image_size: int, shards: int = 4) -> list[dict]:
    generator = np.random.default_rng(0)
    phantoms = [make_phantom(generator, image_size) for _ in range(rows)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    for shard in range(shards):
        part = phantoms[shard::shards]
        encoded = []
        for row in part:
            buffer = io.BytesIO()
            row["image"].save(buffer, format="PNG")
            encoded.append({"image": {"bytes": buffer.getvalue(), "path": None}, "text": row["text"]})
        datasets.Dataset.from_list(encoded, features=features).to_parquet(str(folder / f"part-{shard}.parquet"))
    return phantoms


def training_loader(files: str, processor, config, batch_size: int, workers: int):
    """The pretraining data path over `files`: the loader every script builds (training mode, no shuffle)."""
    return data_module.build_loader(
        data_module.files_stream(files),
        processor,
        image_column="image",
        text_column="text",
        batch_size=batch_size,
        training=True,
        expert_names=config.expert_names,
        num_workers=workers,
    )


def data_rate(files: str, processor, config, batch_size: int, workers: int, batches: int) -> float:
    """Images/s of the training data path (stream -> decode -> transform -> batch) with `workers` workers."""
    loader = training_loader(files, processor, config, batch_size, workers)
    iterator = iter(loader)
    next(iterator)  # start-up (worker launch, first file open) is not throughput
    start, images = time.perf_counter(), 0
    for _, batch in zip(range(batches), iterator):
        images += batch["pixel_values"].shape[0]
    return images / (time.perf_counter() - start)


def train_rate(model, batch, repeats: int) -> float:
    def run():
        model(**model_inputs(batch, torch.device("cpu")), return_loss=True).loss.backward()
        model.zero_grad(set_to_none=True)

    return batch["pixel_values"].shape[0] / median_seconds(run, repeats)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rows and repeats (about two minutes here)")
    args = parser.parse_args(argv)
    rows = [("preset", "batch", "0 workers", "1 worker", "2 workers", "training", "best data / training")]
    ratios = {}
    for preset, batch_size, image_size in (("nano", 32, 128), ("swin-tiny", 4, 256)):
        batches = 6 if args.quick else 20
        with tempfile.TemporaryDirectory() as folder:
            phantoms = write_parquet(Path(folder), batch_size * (batches + 2) * 2 + 8, image_size)
            tokenizer = train_wordpiece_tokenizer([row["text"] for row in phantoms], vocab_size=800)
            config = MedMoEConfig.from_preset(preset)
            config.text_config.vocab_size = len(tokenizer)
            side = config.vision_config.image_size
            processor = MedMoEProcessor(MedMoEImageProcessor(size={"height": side, "width": side}), tokenizer)
            files = str(Path(folder) / "*.parquet")
            rates = [data_rate(files, processor, config, batch_size, workers, batches) for workers in (0, 1, 2)]
            batch = next(iter(training_loader(files, processor, config, batch_size, workers=0)))
            training = train_rate(MedMoEModel(config).train(), batch, 2 if args.quick else 4)
        ratios[preset] = max(rates) / training
        rows.append(
            (preset, batch_size, *(f"{rate:.0f}" for rate in rates), f"{training:.1f}", f"{ratios[preset]:.1f}x")
        )
    print_table("Images/s: decode + transform (DataLoader workers) vs training forward + backward", rows)
    results = {"data_vs_train_throughput": min(ratios.values()), **{f"data_vs_train_{k}": v for k, v in ratios.items()}}
    print_json(results)
    return results


if __name__ == "__main__":
    main()
