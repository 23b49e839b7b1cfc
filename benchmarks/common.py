"""Shared pieces of the benchmarks: median timing after warm-up, a seeded model folder built offline, the printed
table and the closing JSON line."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `run()` over `repeats` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        run()
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def seeded_model_folder(folder: Path, preset: str = "nano") -> Path:
    """A randomly initialised (seed 0) MedMoE folder of `preset` with a small WordPiece tokenizer, built offline."""
    from medmoe.training.tokenizer import train_wordpiece_tokenizer
    from modeling_medmoe import MedMoEConfig, MedMoEImageProcessor, MedMoEModel, MedMoEProcessor

    tokenizer = train_wordpiece_tokenizer(["Axial CT of the chest.", "MRI of the brain.", "Chest X-ray."], 300)
    config = MedMoEConfig.from_preset(preset)
    config.text_config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    MedMoEModel(config).save_pretrained(folder)
    side = config.vision_config.image_size
    image_processor = MedMoEImageProcessor(size={"height": side, "width": side})
    MedMoEProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def print_table(title: str, rows: list[tuple]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(row[column])) for row in rows) for column in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def print_json(results: dict) -> None:
    """The last line of every benchmark: its ratios as JSON (floats to 4 significant digits)."""
    print(
        json.dumps(
            {key: float(f"{value:.4g}") if isinstance(value, float) else value for key, value in results.items()}
        )
    )
