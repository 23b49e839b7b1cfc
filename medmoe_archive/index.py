"""Embed an image archive with a MedMoE model and build a FAISS index for text-to-image and image-to-image search.

    medmoe-index --model outputs/medmoe-nano --images /archive/pacs-export --output_dir outputs/archive-index
    medmoe-index --model ORG/NAME --files "scans/*.parquet" --output_dir OUT
    medmoe-index --model ORG/NAME --dataset_name ORG/DATASET --split test --output_dir OUT

A folder is read recursively (PNG, JPEG, TIFF, BMP, DICOM with or without the .dcm suffix); files and datasets
stream. Images go through the model in batches (progress bar); each chunk of rows is written to OUT/chunks as it is
finished, so an interrupted run started again with the same command resumes after the last chunk. Entries that
cannot be read or decoded (broken symlinks, special files, undecodable or oversized images) are skipped, counted by
reason and listed with their paths in OUT/skipped.jsonl; special files are never opened. The result is a `datasets`
dataset on disk (id, path, embedding, chosen expert, a thumbnail unless --thumbnail_size 0, the source's metadata
columns) with a FAISS index (medmoe_archive/archive.py describes the folder); search it with medmoe-search. Every
file is readable by the user alone; with --deidentify the index holds pseudonyms, no paths, no thumbnails and no
free text (medmoe_archive/deidentify.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import datasets
import torch
from tqdm.auto import tqdm
from transformers import AutoModel

from medmoe_archive import archive
from medmoe_archive.deidentify import IdentifiedOutput, add_deidentify_arguments, output_policy, private_files
from medmoe_archive.dicomweb import PacsError
from modeling_medmoe import MedMoEImageProcessor
from modeling_medmoe.image_encoder import BACKENDS, ImageEncoder

CHUNK_PATTERN = "chunk-{:05d}.parquet"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved MedMoE folder or Hub id")
    parser.add_argument("--output_dir", required=True, type=Path)
    archive.add_source_arguments(parser)
    parser.add_argument(
        "--index",
        choices=archive.INDEX_TYPES,
        default="flat",
        help="flat: exact search; ivf: approximate (inverted lists), faster on millions of rows",
    )
    parser.add_argument("--thumbnail_size", type=int, default=96, help="side of the stored thumbnails (0 = none)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--chunk_size", type=int, default=1024, help="rows per chunk written (the resume unit)")
    parser.add_argument(
        "--flush_seconds",
        type=float,
        default=60.0,
        help="also write a chunk when this long has passed since the last, so a killed run loses at most that much",
    )
    parser.add_argument("--max_rows", type=int, help="index at most this many source rows")
    add_deidentify_arguments(parser)
    parser.add_argument(
        "--json",
        action="store_true",
        help="print index_info.json's content and every skipped row (path and reason) as JSON on stdout, the "
        "messages on stderr",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="image side: torch, onnx (the folder's export, training/export.py), or auto (onnx when exported)",
    )
    return parser.parse_args(argv)


def source_description(source: archive.ArchiveSource, window: str | None, max_rows: int | None) -> dict:
    """What was indexed and how, to tell a resume of the same run from a different one."""
    return {**source.description(), "window": window, "max_rows": max_rows}


class ChunkWriter:
    """Collects embedded rows and writes them to OUT/chunks in chunks of `chunk_size` rows or `flush_seconds` of
    work, whichever comes first, with the skipped rows appended to OUT/skipped.jsonl, updating the progress file after
    each one, so that a restart loses at most the rows of an unfinished chunk (and lists no skipped row twice). Rows
    and skipped entries are written as `policy` says (`medmoe_archive/deidentify.py`)."""

    def __init__(
        self, output_dir: Path, features: datasets.Features, progress: dict, chunk_size: int,
        policy: IdentifiedOutput = IdentifiedOutput(), flush_seconds: float = 60.0,
    ):  # fmt: skip
        self.chunks_dir = output_dir / "chunks"
        self.chunks_dir.mkdir(parents=True, exist_ok=True)
        self.progress_path = output_dir / "progress.json"
        self.skipped_path = output_dir / archive.SKIPPED_FILE
        self.features, self.progress, self.chunk_size = features, progress, chunk_size
        self.policy = policy  # applied before anything is written
        self.flush_seconds, self.last_flush = flush_seconds, time.monotonic()
        self.records: list[dict] = []
        self.rows_read_since_chunk = 0
        self.skipped_since_chunk: list[dict] = []
        self.keep_listed_skips(progress.setdefault("skipped_listed", 0))

    def keep_listed_skips(self, count: int) -> None:
        """The skipped-rows list as the progress file knows it (lines of an unfinished chunk dropped)."""
        lines = self.skipped_path.read_text().splitlines(keepends=True) if self.skipped_path.is_file() else []
        archive.write_text_atomically(self.skipped_path, "".join(lines[:count]))

    def add(self, records: list[dict], rows_read: int, skipped: list[dict]) -> None:
        records = [self.policy.row(record) for record in records]
        skipped = [self.policy.skipped(entry) for entry in skipped]
        self.records.extend(records)
        self.rows_read_since_chunk += rows_read
        self.skipped_since_chunk.extend(skipped)
        if len(self.records) >= self.chunk_size or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.rows_read_since_chunk == 0:
            return
        if self.records:
            path = self.chunks_dir / CHUNK_PATTERN.format(self.progress["chunks"])
            temporary = path.with_suffix(".tmp")
            datasets.Dataset.from_list(self.records, features=self.features).to_parquet(str(temporary))
            temporary.replace(path)
            self.progress["chunks"] += 1
        with self.skipped_path.open("a") as listing:
            listing.writelines(json.dumps(entry) + "\n" for entry in self.skipped_since_chunk)
        reasons = Counter(entry["reason"] for entry in self.skipped_since_chunk)
        self.progress["rows_read"] += self.rows_read_since_chunk
        self.progress["skipped"] = dict(Counter(self.progress["skipped"]) + reasons)
        self.progress["skipped_listed"] += len(self.skipped_since_chunk)
        archive.write_json_atomically(self.progress_path, self.progress)
        self.records, self.rows_read_since_chunk, self.skipped_since_chunk = [], 0, []
        self.last_flush = time.monotonic()


def embed_archive(
    rows, encoder: ImageEncoder, image_processor, writer: ChunkWriter, *, skip: int, batch_size: int,
    max_rows: int | None, window: str | None, thumbnail_size: int,
) -> None:  # fmt: skip
    """Read, prepare, embed and hand to `writer` every source row after the first `skip` (at most `max_rows` rows
    in all), `batch_size` at a time."""
    batch, bar = [], tqdm(desc="embedding", unit="image", initial=skip)
    for number, row in enumerate(rows):
        if max_rows is not None and number >= max_rows:
            break
        if number < skip:
            continue
        batch.append(row)
        if len(batch) == batch_size:
            embed_batch(batch, encoder, image_processor, writer, window=window, thumbnail_size=thumbnail_size)
            bar.update(len(batch))
            batch = []
    if batch:
        embed_batch(batch, encoder, image_processor, writer, window=window, thumbnail_size=thumbnail_size)
        bar.update(len(batch))
    bar.close()
    writer.flush()


def embed_batch(rows, encoder: ImageEncoder, image_processor, writer, *, window: str | None, thumbnail_size: int):
    """Prepare each row (DICOM through `window`; skipping, counting and listing the unreadable ones), embed the
    rest with `encoder`, give them to the writer (with a `thumbnail_size` thumbnail each, 0 = none)."""
    pixels, kept, units, skipped = archive.prepare_rows(rows, image_processor, window)
    thumbnails = [archive.thumbnail_png(unit, thumbnail_size) if thumbnail_size else None for unit in units]
    records = []
    if kept:
        expert_names = encoder.model.config.expert_names
        embeddings, experts = archive.embed_images(encoder, torch.stack(pixels))
        for row, embedding, expert, thumbnail in zip(kept, embeddings, experts.tolist(), thumbnails):
            records.append(
                {
                    "id": row.id,
                    "path": row.path,
                    "embedding": embedding.tolist(),
                    "expert": expert_names[expert],
                    "expert_index": expert,
                    "thumbnail": thumbnail,
                    **row.metadata,
                }
            )
    writer.add(records, len(rows), skipped)


def build_index(output_dir: Path, index_type: str) -> tuple[datasets.Dataset, float]:
    """Concatenate the chunks into OUT/dataset and build and save its FAISS index; returns it and the seconds the
    index took to build. The datasets cache of the build lives in OUT and is removed after: no copy of the rows is
    left outside OUT."""
    chunks = sorted(str(path) for path in (output_dir / "chunks").glob("chunk-*.parquet"))
    if not chunks:
        raise ValueError(f"No image could be embedded; the skipped rows and why: {output_dir / archive.SKIPPED_FILE}.")
    build_cache, dataset_dir = output_dir / "build_cache", output_dir / "dataset"
    for folder in (build_cache, dataset_dir):
        if folder.exists():
            shutil.rmtree(folder)
    built = datasets.Dataset.from_parquet(chunks, cache_dir=str(build_cache))
    built.save_to_disk(str(dataset_dir))
    del built
    shutil.rmtree(build_cache)
    dataset = datasets.load_from_disk(str(dataset_dir))
    seconds = add_faiss_index(dataset, index_type)
    dataset.save_faiss_index("embedding", str(output_dir / archive.FAISS_FILE))
    return dataset, seconds


def add_faiss_index(dataset: datasets.Dataset, index_type: str) -> float:
    """Add a FAISS inner-product index on `embedding` (flat: exact; ivf: 4 sqrt(rows) inverted lists, at most one
    per 39 rows (faiss's minimum for training), trained on up to 64 rows per list, searching 1/16 of them); returns
    the seconds it took. Under 256 rows ivf is flat."""
    import faiss

    start = time.perf_counter()
    if index_type == "ivf" and len(dataset) >= 256:
        lists = max(1, min(int(4 * math.sqrt(len(dataset))), len(dataset) // 39))
        dataset.add_faiss_index(
            "embedding", string_factory=f"IVF{lists},Flat", metric_type=faiss.METRIC_INNER_PRODUCT,
            train_size=min(len(dataset), 64 * lists),
        )  # fmt: skip
        dataset.get_index("embedding").faiss_index.nprobe = max(1, lists // 16)
    else:
        dataset.add_faiss_index("embedding", metric_type=faiss.METRIC_INNER_PRODUCT)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import faiss  # noqa: F401
    except ImportError:
        sys.exit('medmoe-index needs faiss: pip install -e ".[search]" (or pip install faiss-cpu).')
    try:
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
            info = index_archive(args)
    except (FileNotFoundError, ValueError, ImportError, PacsError) as error:
        sys.exit(f"error: {error}")
    if args.json:
        skipped_path = args.output_dir / archive.SKIPPED_FILE
        lines = skipped_path.read_text().splitlines() if skipped_path.is_file() else []
        print(json.dumps({**info, "skipped_rows": [json.loads(line) for line in lines]}, indent=2))


def index_archive(args: argparse.Namespace) -> dict:
    """Embed the archive `args` names into args.output_dir (resuming a run cut short) and index it; returns
    index_info.json's content. Every file is written as the output policy says, readable by the user alone."""
    policy = output_policy(args)
    with private_files(args.output_dir), policy.quiet_logs():
        return index_with_policy(args, policy)


def index_with_policy(args: argparse.Namespace, policy: IdentifiedOutput) -> dict:
    thumbnail_size = 0 if policy.deidentified else args.thumbnail_size
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True).to(args.device).eval()
    # this package's image processor with the folder's saved settings: it reads DICOM whatever the folder's code age
    image_processor = MedMoEImageProcessor.from_pretrained(args.model)
    source = archive.ArchiveSource.from_args(args, image_processor.limits)
    described = policy.source(source_description(source, args.window, args.max_rows))
    progress = archive.read_json(args.output_dir / "progress.json")
    if progress is not None and progress.get("key_fingerprint") != policy.key_fingerprint:
        raise ValueError(
            f"{args.output_dir} was started with another de-identification key, or none (key fingerprint "
            f"{progress.get('key_fingerprint')}); resume it with the same key, or pass another --output_dir."
        )
    if progress is not None and (progress["source"] != described or progress["model"] != args.model):
        raise ValueError(
            f"{args.output_dir} holds an index of another source or model ({progress['source']}, {progress['model']});"
            " pass another --output_dir, or delete it to start again."
        )
    if progress is None:
        progress = {"model": args.model, "source": described, "key_fingerprint": policy.key_fingerprint,
                    "rows_read": 0, "chunks": 0, "skipped": {}}  # fmt: skip
    elif progress["rows_read"]:
        print(f"Resuming after {progress['rows_read']} rows ({progress['chunks']} chunks) in {args.output_dir}.")
    rows, metadata = source.open()
    features = datasets.Features(policy.features(archive.index_features(metadata, model.config.projection_dim)))
    writer = ChunkWriter(args.output_dir, features, progress, args.chunk_size, policy, args.flush_seconds)
    start = time.perf_counter()
    encoder = ImageEncoder.for_model(model, args.model, args.backend)
    print(f"Image side on {encoder.name}.")
    embed_archive(rows, encoder, image_processor, writer, skip=progress["rows_read"], batch_size=args.batch_size,
                  max_rows=args.max_rows, window=args.window, thumbnail_size=thumbnail_size)  # fmt: skip
    embed_seconds = time.perf_counter() - start
    dataset, index_seconds = build_index(args.output_dir, args.index)
    info = {
        "model": args.model,
        "source": described,
        "rows": len(dataset),
        "rows_read": progress["rows_read"],
        "skipped": progress["skipped"],
        "skipped_list": archive.SKIPPED_FILE,
        "dimension": model.config.projection_dim,
        "index": args.index,
        "backend": encoder.name,
        "holds": policy.holdings(dataset.column_names, archive.columns_with_values(dataset, ("path", "thumbnail"))),
        "expert_names": list(model.config.expert_names),
        "window": args.window,
        "embed_seconds_this_run": round(embed_seconds, 2),
        "index_build_seconds": round(index_seconds, 3),
    }
    archive.write_json_atomically(args.output_dir / archive.INFO_FILE, info)
    skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(progress["skipped"].items())) or "none"
    print(f"Indexed {len(dataset)} images ({args.index} index); skipped: {skipped}.")
    if progress["skipped"]:
        print(f"Skipped rows, each with its reason: {args.output_dir / archive.SKIPPED_FILE}")
    print(
        f"Index: {args.output_dir} (dataset/, {archive.FAISS_FILE}, {archive.INFO_FILE}); search it with medmoe-search."
    )
    return info


if __name__ == "__main__":
    main()
