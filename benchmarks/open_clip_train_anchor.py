"""The peer anchor: open_clip trained by its own training CLI (`open_clip_train.main`) with the recipe of
../shared/anchors/open_clip_train_realmed.md, stopped at a wall-clock budget, scored by the project's evaluation.

Run by benchmarks/realmed.py (system `open_clip_train`) inside .venv-open_clip (open_clip_torch, webdataset,
braceexpand); by hand:

    .venv-open_clip/bin/python -m benchmarks.open_clip_train_anchor --data ../shared/datasets/realmed \
        --minutes 20 --output_dir outputs/benchmark-realmed/open_clip_train/run

Steps: (1) the train split written as image files (the original bytes) and a CSV (filepath,title); (2) the model
config benchmarks/configs/MedCLIP-Tiny-128.json (the anchor's) registered with `open_clip.add_model_config` (the CLI has
no model-config flag); (3) the number of epochs sized from a 1-epoch timing run so that the cosine schedule ends
near the budget; (4) the CLI with the recipe's flags, stopped at the first step that starts after the budget (the
schedule is wrapped to watch the clock; the model is taken from `create_model_and_transforms`); (5) the weights
saved to OUT/model.safetensors, per-window throughput to OUT/train_log.jsonl and OUT/run_summary.json; (6) the
evaluation (training/run_evaluation.py's `evaluate_model`) with open_clip's own tokenizer and eval transform, on each
--score_splits split, once with the project's prompts (OUT/scored_on_SPLIT) and once with the anchor's neutral prompts
(OUT/scored_on_SPLIT/anchor_prompts).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import time
from pathlib import Path

import open_clip
import open_clip_train.main as open_clip_cli
import pyarrow.parquet as pq
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from benchmarks.open_clip_baseline import OpenClipForEvaluation, score_on_splits

CONFIGS = Path(__file__).resolve().parent / "configs"
MODEL_NAME = "MedCLIP-Tiny-128"
BATCH_SIZE = 64
RECIPE_FLAGS = [  # open_clip_train_realmed.md, "Flags" (epochs and data come from this script)
    "--batch-size", str(BATCH_SIZE), "--lr", "5e-4", "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
    "--wd", "0.1", "--warmup", "50", "--lr-scheduler", "cosine", "--precision", "fp32", "--device", "cpu",
    "--workers", "1", "--save-frequency", "0", "--report-to", "", "--model", MODEL_NAME,
    "--dataset-type", "csv", "--csv-img-key", "filepath", "--csv-caption-key", "title", "--csv-separator", ",",
]  # fmt: skip


class BudgetReached(Exception):
    """Raised by the wrapped schedule at the first step that starts after the budget."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="realmed folder (data/train-*.parquet, eval-*)")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget (wall clock)")
    parser.add_argument("--epochs", type=int, help="skip the timing run and train this many epochs")
    parser.add_argument("--seed", type=int, default=0, help="the CLI's --seed (the recipe's is 0)")
    parser.add_argument(
        "--no_clock_stop",
        action="store_true",
        help="train every scheduled epoch instead of stopping at the --minutes budget (results then do not depend "
        "on the machine's load)",
    )
    parser.add_argument("--max_train_samples", type=int, default=4000, help="rows the linear probe is fitted on")
    parser.add_argument("--num_workers", type=int, default=2, help="evaluation data workers")
    parser.add_argument("--score_splits", default="eval", help="comma-separated splits of --data to score on")
    return parser.parse_args(argv)


def export_csv(data: Path, folder: Path) -> Path:
    """The train split as image files (original bytes) and folder/train.csv with columns filepath,title."""
    table_path = folder / "train.csv"
    if table_path.is_file():
        return table_path
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for shard in sorted((data / "data").glob("train-*.parquet")):
        for record in pq.read_table(shard, columns=["image", "text"]).to_pylist():
            suffix = Path(record["image"].get("path") or "").suffix or ".png"
            path = images / f"{len(rows):06d}{suffix}"
            path.write_bytes(record["image"]["bytes"])
            rows.append((str(path), record["text"]))
    if len(rows) < BATCH_SIZE:
        raise ValueError(
            f"The recipe's batch of {BATCH_SIZE} needs at least {BATCH_SIZE} train rows; {data} has {len(rows)}."
        )
    partial = folder / "train.csv.partial"
    with partial.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
    partial.rename(table_path)
    return table_path


class ClockedRun:
    """Wraps the CLI's schedule and model constructor: counts steps with their times, stops after the budget, and
    keeps the model."""

    def __init__(self, budget_seconds: float):
        self.budget_seconds, self.step_times, self.model, self.scheduled_steps = budget_seconds, [], None, None
        self.original_schedule, self.original_create = (
            open_clip_cli.cosine_lr,
            open_clip_cli.create_model_and_transforms,
        )

    def cosine_lr(self, optimizer, base_lr, warmup_length, steps):
        self.scheduled_steps = steps
        schedule = self.original_schedule(optimizer, base_lr, warmup_length, steps)

        def clocked(step):
            now = time.monotonic()
            if self.step_times and now - self.step_times[0] >= self.budget_seconds:
                raise BudgetReached
            self.step_times.append(now)
            return schedule(step)

        return clocked

    def create_model_and_transforms(self, *args, **kwargs):
        created = self.original_create(*args, **kwargs)
        self.model = self.model or created[0]
        return created

    def run(self, argv: list[str]) -> None:
        open_clip_cli.cosine_lr, open_clip_cli.create_model_and_transforms = (
            self.cosine_lr,
            self.create_model_and_transforms,
        )
        try:
            open_clip_cli.main(argv)
        except BudgetReached:
            pass
        finally:
            open_clip_cli.cosine_lr, open_clip_cli.create_model_and_transforms = (
                self.original_schedule,
                self.original_create,
            )

    def seconds(self) -> float:
        return self.step_times[-1] - self.step_times[0] if len(self.step_times) > 1 else 0.0


def cli_argv(table: Path, logs: Path, name: str, epochs: int, seed: int = 0) -> list[str]:
    shutil.rmtree(logs / name, ignore_errors=True)  # the CLI refuses an existing experiment name
    return [*RECIPE_FLAGS, "--seed", str(seed), "--train-data", str(table), "--epochs", str(epochs), "--logs",
            str(logs), "--name", name]  # fmt: skip


class OpenClipProcessor:
    """The parts of a MedMoEProcessor that training/data.py and the evaluation use, over open_clip's own tokenizer
    (context 64) and eval transform."""

    def __init__(self, preprocess, tokenizer):
        self.image_processor = self  # data.py calls processor.image_processor.to_model_input(image)
        self.preprocess, self.open_clip_tokenizer = preprocess, tokenizer

    def to_model_input(self, image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise ValueError(f"open_clip's transform takes PIL images, not {type(image).__name__}")
        return self.preprocess(image.convert("RGB"))

    def tokenizer(self, texts, **_) -> dict:
        input_ids = self.open_clip_tokenizer(list(texts))
        return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}

    def tokenize(self, texts, **_) -> dict:
        encoding = self.tokenizer(texts)
        encoding["word_ids"] = torch.full_like(encoding["input_ids"], -1)
        return encoding


def train(args) -> tuple[torch.nn.Module, dict]:
    """Steps (1)-(5): the CSV, the epochs, the CLI run; writes OUT/model.safetensors, train_log.jsonl, run_summary."""
    table = export_csv(args.data.resolve(), args.output_dir.parent / "csv")
    logs = args.output_dir / "logs"
    budget = 60 * args.minutes
    epochs = args.epochs
    if epochs is None:
        print("[open_clip_train] 1-epoch timing run ...", flush=True)
        timing = ClockedRun(math.inf)
        timing.run(cli_argv(table, logs, "timing", 1))
        epochs = max(1, round(budget / timing.seconds()))
    stop = "no clock stop" if args.no_clock_stop else f"stop after {args.minutes:g} min"
    print(f"[open_clip_train] training: {epochs} epochs, {stop} ...", flush=True)
    clocked = ClockedRun(math.inf if args.no_clock_stop else budget)
    clocked.run(cli_argv(table, logs, "anchor", epochs, args.seed))
    model = clocked.model.eval()
    save_file(
        {name: tensor.contiguous() for name, tensor in model.state_dict().items()},
        args.output_dir / "model.safetensors",
    )
    steps = len(clocked.step_times)
    windows = [
        {"step": end, "images_per_s": 10 * BATCH_SIZE / (clocked.step_times[end - 1] - clocked.step_times[end - 11])}
        for end in range(11, steps + 1, 10)
    ]
    (args.output_dir / "train_log.jsonl").write_text("".join(json.dumps(window) + "\n" for window in windows))
    summary = {
        "system": "open_clip_train",
        "open_clip_version": open_clip.__version__,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "epochs_scheduled": epochs,
        "steps_scheduled": clocked.scheduled_steps,
        "steps": steps,
        "images_seen": steps * BATCH_SIZE,
        "train_seconds": round(clocked.seconds(), 1),
    }
    (args.output_dir / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return model, summary


def trained_before(output_dir: Path) -> tuple[torch.nn.Module, dict]:
    """The model and summary a finished run left in OUT (it is scored again, never retrained or re-timed)."""
    print(f"[open_clip_train] reusing the trained model in {output_dir} (delete it to train again)", flush=True)
    model = open_clip.create_model(MODEL_NAME)
    model.load_state_dict(load_file(output_dir / "model.safetensors"))
    return model.eval(), json.loads((output_dir / "run_summary.json").read_text())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    open_clip.add_model_config(CONFIGS / f"{MODEL_NAME}.json")  # registered under the file's stem
    finished = all((args.output_dir / name).is_file() for name in ("model.safetensors", "run_summary.json"))
    model, summary = trained_before(args.output_dir) if finished else train(args)
    _, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME)
    processor = OpenClipProcessor(preprocess, open_clip.get_tokenizer(MODEL_NAME))
    common_argv = [
        "--model", "open_clip_train", "--dataset_name", str(args.data), "--probe_columns", "modality,label",
        "--max_train_samples", str(args.max_train_samples), "--num_workers", str(args.num_workers),
    ]  # fmt: skip
    splits = [split.strip() for split in args.score_splits.split(",") if split.strip()]
    wrapper = OpenClipForEvaluation(model, model.context_length, pad_id=0)
    with torch.no_grad():
        score_on_splits(wrapper, processor, common_argv, args.output_dir, splits)
    print(f"open_clip_train run: {args.output_dir} (run_summary.json, model.safetensors, scored_on_SPLIT/)")
    return summary


if __name__ == "__main__":
    main()
