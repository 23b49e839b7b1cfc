"""Zero-shot classification of a whole archive, per image and per DICOM series, into CSV files.

    medmoe-classify --model outputs/medmoe-nano --images /archive/pacs-export --labels CT,MRI,X-ray --out results.csv
    medmoe-classify --model ORG/NAME --files "scans/*.parquet" --labels "chest x-ray,brain mri" --out results.csv

Every image of the source (read as medmoe-index reads it: a folder of image and DICOM files, file globs, or a
dataset) is scored against the labels with the model's zero-shot prompts (the image side on the folder's ONNX export
when it has one). OUT is one row per image: id, path, the DICOM study / series / modality tag where there is one, the
chosen expert, the best label, its probability (`confidence`) and one probability column per label. OUT with
`_series` before its suffix is one row per DICOM series: the label of the mean probabilities over its images, that
mean as confidence, and the number of images. Unreadable entries are skipped, counted by reason and listed in OUT
with `_skipped.jsonl` in place of its suffix. When the model's card says it was trained only on synthetic phantoms,
a warning says so (its labels mean nothing for real images).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from medmoe_archive import archive
from model_card.generate import SYNTHETIC_NOTE
from modeling_medmoe import MedMoEImageProcessor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved MedMoE folder or Hub id")
    archive.add_source_arguments(parser)
    parser.add_argument("--labels", required=True, help="comma-separated class names, e.g. CT,MRI,X-ray")
    parser.add_argument("--out", required=True, type=Path, help="the per-image CSV (the per-series one goes beside)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--backend", choices=archive.BACKENDS, default="auto", help="image side: torch, onnx or auto")
    return parser.parse_args(argv)


def synthetic_only_warning(model_name: str) -> str | None:
    """A warning when the model folder's card says it was trained on the synthetic phantoms only."""
    card = Path(model_name) / "README.md"
    if card.is_file() and SYNTHETIC_NOTE in card.read_text():
        return (
            f"warning: {model_name} was trained only on synthetic phantoms (its model card says so): its labels for "
            "real images are not meaningful."
        )
    return None


@torch.no_grad()
def classify(args: argparse.Namespace) -> dict:
    """Score every image; write the per-image and per-series CSV files and the skipped list; returns a summary."""
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    image_processor = MedMoEImageProcessor.from_pretrained(args.model)
    labels, templates = zero_shot_request(args.labels, image_processor)
    class_embeds = model.get_zero_shot_class_embeddings(tokenizer, labels, templates)
    embedder = archive.ImageEmbedder(model, args.model, args.backend)
    source = archive.ArchiveSource.from_args(args)
    rows, _ = source.open()
    per_image, skipped = [], []
    bar = tqdm(desc=f"classifying ({embedder.name})", unit="image")
    for batch in batched(rows, args.batch_size):
        pixels, kept, _, batch_skipped = archive.prepare_rows(batch, image_processor, args.window)
        skipped += batch_skipped
        if kept:
            embeddings, experts = embedder(torch.stack(pixels))
            probabilities = model.zero_shot_probabilities(embeddings, class_embeds)
            per_image += [image_row(row, labels, p, model.config.expert_names[e]) for row, p, e in
                          zip(kept, probabilities, experts.tolist())]  # fmt: skip
        bar.update(len(batch))
    bar.close()
    series = per_series(per_image, labels)
    paths = write_outputs(args.out, per_image, series, skipped, labels)
    summary = {
        "images": len(per_image),
        "series": len(series),
        "skipped": dict(Counter(entry["reason"] for entry in skipped)),
        "backend": embedder.name,
        "outputs": [str(path) for path in paths],
        "warning": synthetic_only_warning(args.model),
    }
    return summary


def zero_shot_request(labels_text: str, image_processor) -> tuple[list[str], list[str]]:
    """The labels and the default templates, checked against the limits like every zero-shot request."""
    from modeling_medmoe.zero_shot import zero_shot_request as check

    return check(labels_text, None, image_processor.limits)


def batched(rows, size: int):
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def image_row(row: archive.ArchiveRow, labels: list[str], probabilities: torch.Tensor, expert: str) -> dict:
    best = int(probabilities.argmax())
    metadata = row.metadata
    return {
        "id": row.id,
        "path": row.path,
        "study_uid": metadata.get("study_uid"),
        "series_uid": metadata.get("series_uid"),
        "modality_tag": metadata.get("modality"),
        "expert": expert,
        "label": labels[best],
        "confidence": round(float(probabilities[best]), 6),
        **{f"p_{label}": round(float(value), 6) for label, value in zip(labels, probabilities)},
    }


def per_series(per_image: list[dict], labels: list[str]) -> list[dict]:
    """One row per DICOM series: the label of the mean probabilities over its images."""
    groups = defaultdict(list)
    for row in per_image:
        if row["series_uid"] is not None:
            groups[row["series_uid"]].append(row)
    series = []
    for uid, rows in groups.items():
        means = [sum(row[f"p_{label}"] for row in rows) / len(rows) for label in labels]
        best = max(range(len(labels)), key=means.__getitem__)
        series.append({
            "series_uid": uid, "study_uid": rows[0]["study_uid"], "modality_tag": rows[0]["modality_tag"],
            "images": len(rows), "label": labels[best], "confidence": round(means[best], 6),
        })  # fmt: skip
    return series


def write_outputs(out: Path, per_image, series, skipped, labels) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    series_path = out.with_name(f"{out.stem}_series{out.suffix or '.csv'}")
    skipped_path = out.with_name(f"{out.stem}_skipped.jsonl")
    image_columns = ["id", "path", "study_uid", "series_uid", "modality_tag", "expert", "label", "confidence",
                     *(f"p_{label}" for label in labels)]  # fmt: skip
    series_columns = ["series_uid", "study_uid", "modality_tag", "images", "label", "confidence"]
    for path, columns, rows in ((out, image_columns, per_image), (series_path, series_columns, series)):
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    skipped_path.write_text("".join(json.dumps(entry) + "\n" for entry in skipped))
    return [out, series_path, skipped_path]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        summary = classify(args)
    except (FileNotFoundError, ValueError, ImportError) as error:
        sys.exit(f"error: {error}")
    if summary["warning"]:
        print(summary["warning"], file=sys.stderr)
    skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(summary["skipped"].items())) or "none"
    print(f"Classified {summary['images']} images in {summary['series']} DICOM series ({summary['backend']}); "
          f"skipped: {skipped}.")  # fmt: skip
    print("Outputs: " + ", ".join(summary["outputs"]))
    return summary


if __name__ == "__main__":
    main()
