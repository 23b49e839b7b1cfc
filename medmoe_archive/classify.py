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
a warning says so (its labels mean nothing for real images). The files are readable by the user alone; a cell that
a spreadsheet would run as a formula (leading = + - @, tab or carriage return) starts with a quote. With
--deidentify the ids and UIDs are keyed-hash pseudonyms and no path is written (medmoe_archive/deidentify.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from medmoe.training.synthetic import SYNTHETIC_NOTE
from medmoe_archive import archive
from medmoe_archive.decoding import prepare_rows
from medmoe_archive.deidentify import (
    DROPPED,
    IdentifiedOutput,
    add_deidentify_arguments,
    output_policy,
    private_files,
    private_permissions,
)
from medmoe_archive.dicomweb import PacsError
from medmoe_archive.ranks import RankShare
from medmoe_archive.rows import ArchiveRow
from modeling_medmoe import MedMoEImageProcessor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved MedMoE folder or Hub id")
    archive.add_source_arguments(parser)
    parser.add_argument("--labels", required=True, help="comma-separated class names, e.g. CT,MRI,X-ray")
    parser.add_argument("--out", required=True, type=Path, help="the per-image CSV (the per-series one goes beside)")
    archive.add_embedding_arguments(parser)
    add_deidentify_arguments(parser)
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


def classify(args: argparse.Namespace) -> dict | None:
    """Score every image; write the per-image and per-series CSV files and the skipped list (as the output policy
    says, readable by the user alone); returns a summary (None on ranks other than the main one: under several
    processes each scores its share and the main process writes the files)."""
    policy = output_policy(args)
    share = RankShare.of_this_process(args.device)
    with private_files(), policy.quiet_logs():
        if share.is_main and not args.out.parent.exists():
            args.out.parent.mkdir(parents=True)
        share.wait_for_everyone()
        return classify_with_policy(args, policy, share)


@torch.no_grad()
def classify_with_policy(args: argparse.Namespace, policy: IdentifiedOutput, share: RankShare) -> dict | None:
    settings = archive.EmbeddingSettings.from_args(args, share)
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True).to(settings.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    image_processor = MedMoEImageProcessor.from_pretrained(args.model)
    labels, templates = zero_shot_request(args.labels, image_processor)
    class_embeds = model.get_zero_shot_class_embeddings(tokenizer, labels, templates).float().cpu()
    encoder = settings.encoder(model, args.model)
    source = archive.ArchiveSource.from_args(args, image_processor.limits)
    rows, _ = source.open()
    rows_of_this_rank = (row for row in rows if share.owns(row))
    per_image, skipped = [], []
    bar = tqdm(desc=f"classifying ({encoder.name})", unit="image")
    prepared_rows = prepare_rows(rows_of_this_rank, image_processor, args.window, workers=settings.num_workers)
    for batch in batched(prepared_rows, settings.batch_size):
        kept = [prepared for prepared in batch if prepared.skipped is None]
        skipped += [policy.skipped(prepared.skipped) for prepared in batch if prepared.skipped is not None]
        if kept:
            embeddings, experts = archive.embed_images(encoder, torch.stack([prepared.pixels for prepared in kept]))
            probabilities = model.zero_shot_probabilities(embeddings, class_embeds)
            per_image += [image_row(prepared.row, labels, p, model.config.expert_names[e], policy) for prepared, p, e
                          in zip(kept, probabilities, experts.tolist())]  # fmt: skip
        bar.update(len(batch))
    bar.close()
    if share.ranks > 1:
        per_image, skipped = gathered_parts(args.out, share, per_image, skipped)
        if per_image is None:
            return None
    series = per_series(per_image, labels)
    paths = write_outputs(args.out, per_image, series, skipped, labels, policy)
    summary = {
        "images": len(per_image),
        "series": len(series),
        "skipped": dict(Counter(entry["reason"] for entry in skipped)),
        "backend": encoder.name,
        "outputs": [str(path) for path in paths],
        "warning": synthetic_only_warning(args.model),
    }
    return summary


def gathered_parts(out: Path, share: RankShare, per_image: list[dict], skipped: list[dict]):
    """Every rank's rows, in rank order, on the main process ((None, None) on the others): each rank writes its
    own part beside OUT (already as the output policy says), the main process reads them all once every rank has
    written, then removes them."""
    parts = out.with_name(f".{out.stem}_parts")
    parts.mkdir(exist_ok=True)
    part = parts / f"rank-{share.rank:03d}.json"
    archive.write_json_atomically(part, {"per_image": per_image, "skipped": skipped})
    share.wait_for_everyone()
    if not share.is_main:
        return None, None
    per_image, skipped = [], []
    for rank in range(share.ranks):
        written = archive.read_json(parts / f"rank-{rank:03d}.json")
        per_image += written["per_image"]
        skipped += written["skipped"]
    shutil.rmtree(parts)
    return per_image, skipped


def zero_shot_request(labels_text: str, image_processor) -> tuple[list[str], list[str]]:
    """The labels and the default templates, checked against the limits like every zero-shot request."""
    from modeling_medmoe.zero_shot import zero_shot_request as check

    return check(labels_text, None, image_processor.limits)


SOURCE_COLUMNS = ("id", "path", "study_uid", "series_uid", "modality")  # of a row, as the index names them


def csv_cell(value):
    """A cell a spreadsheet shows as text: a string starting with = + - @, a tab or a carriage return (a formula to
    Excel, LibreOffice and Sheets) gets a leading quote (OWASP's CSV injection advice); other values stay."""
    return f"'{value}" if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def batched(rows, size: int):
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def image_row(
    row: ArchiveRow, labels: list[str], probabilities: torch.Tensor, expert: str, policy: IdentifiedOutput
) -> dict:
    best = int(probabilities.argmax())
    source = {"id": row.id, "path": row.path, **{key: row.metadata.get(key) for key in SOURCE_COLUMNS[2:]}}
    written = policy.row(source)
    return {
        **{key: written[key] for key in SOURCE_COLUMNS[:-1] if key in written},
        "modality_tag": written.get("modality"),
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


def write_outputs(out: Path, per_image, series, skipped, labels, policy: IdentifiedOutput) -> list[Path]:
    series_path = out.with_name(f"{out.stem}_series{out.suffix or '.csv'}")
    skipped_path = out.with_name(f"{out.stem}_skipped.jsonl")
    written = [column for column in SOURCE_COLUMNS[:-1] if policy.treatment(column) != DROPPED]
    image_columns = [*written, "modality_tag", "expert", "label", "confidence", *(f"p_{label}" for label in labels)]
    series_columns = ["series_uid", "study_uid", "modality_tag", "images", "label", "confidence"]
    for path, columns, rows in ((out, image_columns, per_image), (series_path, series_columns, series)):
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[csv_cell(column) for column in columns])
            writer.writeheader()
            writer.writerows({csv_cell(key): csv_cell(value) for key, value in row.items()} for row in rows)
    skipped_path.write_text("".join(json.dumps(entry) + "\n" for entry in skipped))
    for path in (out, series_path, skipped_path):  # a file an earlier run left keeps its mode when rewritten
        private_permissions(path)
    return [out, series_path, skipped_path]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")  # the modules' warnings
    try:
        summary = classify(args)
    except (FileNotFoundError, ValueError, ImportError, PacsError) as error:
        sys.exit(f"error: {error}")
    if summary is None:  # another rank: the main process writes the files
        return
    if summary["warning"]:
        print(summary["warning"], file=sys.stderr)
    skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(summary["skipped"].items())) or "none"
    print(f"Classified {summary['images']} images in {summary['series']} DICOM series ({summary['backend']}); "
          f"skipped: {skipped}.")  # fmt: skip
    print("Outputs: " + ", ".join(summary["outputs"]))


if __name__ == "__main__":
    main()
