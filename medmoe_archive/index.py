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
import logging
import shutil
import sys
import time
from collections import Counter, deque
from pathlib import Path

import datasets
import torch
from tqdm.auto import tqdm
from transformers import AutoModel

from medmoe_archive import archive
from medmoe_archive.archive import add_embedding_arguments
from medmoe_archive.decoding import PreparedRow, prepare_rows
from medmoe_archive.deidentify import IdentifiedOutput, add_deidentify_arguments, output_policy, private_files
from medmoe_archive.dicomweb import PacsError
from medmoe_archive.ranks import RankShare
from medmoe_archive.vector_index import INDEX_KINDS, IndexPlan, StoredVectors
from modeling_medmoe import MedMoEImageProcessor
from modeling_medmoe.image_encoder import ImageEncoder

CHUNK_PATTERN = "chunk-{:05d}.parquet"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved MedMoE folder or Hub id")
    parser.add_argument("--output_dir", required=True, type=Path)
    archive.add_source_arguments(parser)
    parser.add_argument(
        "--index",
        choices=INDEX_KINDS,
        default="auto",
        help="flat: exact search; ivf: inverted lists, faster on millions of rows; ivfpq: compressed codes with exact "
        "re-ranking, for tens of millions; auto: by the number of rows (medmoe_archive/vector_index.py)",
    )
    parser.add_argument("--thumbnail_size", type=int, default=96, help="side of the stored thumbnails (0 = none)")
    add_embedding_arguments(parser)
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
    return parser.parse_args(argv)


def source_description(source: archive.ArchiveSource, window: str | None, max_rows: int | None) -> dict:
    """What was indexed and how, to tell a resume of the same run from a different one."""
    return {**source.description(), "window": window, "max_rows": max_rows}


class ChunkWriter:
    """Collects embedded rows and writes them to PART/chunks in chunks of `chunk_size` rows or `flush_seconds` of
    work, whichever comes first, with the skipped rows appended to PART/skipped.jsonl, updating the progress file
    after each one, so that a restart loses at most the rows of an unfinished chunk (and lists no skipped row twice).
    PART is the output folder, or this rank's part of it (medmoe_archive/ranks.py). Rows and skipped entries are
    written as `policy` says (`medmoe_archive/deidentify.py`)."""

    def __init__(
        self, part_dir: Path, features: datasets.Features, progress: dict, chunk_size: int,
        policy: IdentifiedOutput = IdentifiedOutput(), flush_seconds: float = 60.0,
    ):  # fmt: skip
        self.chunks_dir = part_dir / "chunks"
        self.chunks_dir.mkdir(parents=True, exist_ok=True)
        self.progress_path = part_dir / "progress.json"
        self.skipped_path = part_dir / archive.SKIPPED_FILE
        self.features, self.progress, self.chunk_size = features, progress, chunk_size
        self.policy = policy  # applied before anything is written
        self.flush_seconds, self.last_flush = flush_seconds, time.monotonic()
        self.records: list[dict] = []
        self.position = progress["rows_read"]
        self.skipped_since_chunk: list[dict] = []
        self.keep_listed_skips(progress.setdefault("skipped_listed", 0))

    def keep_listed_skips(self, count: int) -> None:
        """The skipped-rows list as the progress file knows it (lines of an unfinished chunk dropped)."""
        lines = self.skipped_path.read_text().splitlines(keepends=True) if self.skipped_path.is_file() else []
        archive.write_text_atomically(self.skipped_path, "".join(lines[:count]))

    def add(self, records: list[dict], position: int, skipped: list[dict]) -> None:
        """Embedded `records` and `skipped` entries; every source row before `position` is now accounted for."""
        records = [self.policy.row(record) for record in records]
        skipped = [self.policy.skipped(entry) for entry in skipped]
        self.records.extend(records)
        self.position = position
        self.skipped_since_chunk.extend(skipped)
        if len(self.records) >= self.chunk_size or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.position == self.progress["rows_read"] and not self.records and not self.skipped_since_chunk:
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
        self.progress["rows_read"] = self.position
        self.progress["skipped"] = dict(Counter(self.progress["skipped"]) + reasons)
        self.progress["skipped_listed"] += len(self.skipped_since_chunk)
        archive.write_json_atomically(self.progress_path, self.progress)
        self.records, self.skipped_since_chunk = [], []
        self.last_flush = time.monotonic()


def embed_archive(
    rows, encoder: ImageEncoder, image_processor, writer: ChunkWriter, settings: archive.EmbeddingSettings, *,
    share: RankShare, skip: int, max_rows: int | None, window: str | None, thumbnail_size: int,
) -> None:  # fmt: skip
    """Read, prepare (in `settings.num_workers` processes), embed and hand to `writer` every source row of this
    rank's share after the first `skip` (at most `max_rows` source rows in all), a batch at a time."""
    numbers, seen = deque(), [skip]
    bar = tqdm(desc=f"embedding (rank {share.rank})" if share.ranks > 1 else "embedding", unit="row", initial=skip)

    def rows_of_this_rank():
        for number, row in enumerate(rows):
            if max_rows is not None and number >= max_rows:
                break
            seen[0] = number + 1
            if number >= skip and share.owns(row):
                numbers.append(number)
                yield row

    batch = []
    prepared_rows = prepare_rows(rows_of_this_rank(), image_processor, window, thumbnail_size, settings.num_workers)
    for prepared in prepared_rows:
        batch.append((numbers.popleft(), prepared))
        if len(batch) == settings.batch_size:
            embed_batch(batch, encoder, writer)
            bar.update(batch[-1][0] + 1 - bar.n)
            batch = []
    if batch:
        embed_batch(batch, encoder, writer)
    writer.add([], seen[0], [])  # the rows after this rank's last one are accounted for too
    bar.update(seen[0] - bar.n)
    bar.close()
    writer.flush()


def embed_batch(batch: list[tuple[int, PreparedRow]], encoder: ImageEncoder, writer) -> None:
    """Embed the prepared rows of `batch` ((source row number, PreparedRow) pairs, in source order) with `encoder`
    and give them, and the skipped ones, to the writer."""
    if not batch:
        return
    kept = [prepared for _, prepared in batch if prepared.skipped is None]
    records = []
    if kept:
        expert_names = encoder.model.config.expert_names
        embeddings, experts = archive.embed_images(encoder, torch.stack([prepared.pixels for prepared in kept]))
        for prepared, embedding, expert in zip(kept, embeddings, experts.tolist()):
            records.append(
                {
                    "id": prepared.row.id,
                    "path": prepared.row.path,
                    "embedding": embedding.tolist(),
                    "expert": expert_names[expert],
                    "expert_index": expert,
                    "thumbnail": prepared.thumbnail,
                    **prepared.row.metadata,
                }
            )
    skipped = [prepared.skipped for _, prepared in batch if prepared.skipped is not None]
    writer.add(records, batch[-1][0] + 1, skipped)


def merge_parts(output_dir: Path, share: RankShare) -> dict:
    """The ranks' parts as one: their skipped lists concatenated into OUT/skipped.jsonl (rank order), their progress
    summed; returns the merged progress (chunks of every part are read by `build_index`)."""
    parts = share.part_dirs(output_dir)
    listed = [(part / archive.SKIPPED_FILE).read_text() for part in parts if (part / archive.SKIPPED_FILE).is_file()]
    archive.write_text_atomically(output_dir / archive.SKIPPED_FILE, "".join(listed))
    nothing = {"rows_read": 0, "skipped": {}}  # a rank whose share was empty wrote no progress
    progresses = [archive.read_json(part / "progress.json") or nothing for part in parts]
    return {
        "rows_read": max(progress["rows_read"] for progress in progresses),
        "skipped": dict(sum((Counter(progress["skipped"]) for progress in progresses), Counter())),
    }


def build_index(output_dir: Path, chunk_dirs: list[Path], index_kind: str) -> tuple[datasets.Dataset, IndexPlan, float]:
    """Concatenate the chunks into OUT/dataset, then build and save its FAISS index (the plan for its size, its
    memory printed first); returns the dataset, the plan and the seconds the index took to build. The datasets cache
    of the build lives in OUT and is removed after: no copy of the rows is left outside OUT."""
    chunks = sorted(str(path) for folder in chunk_dirs for path in (folder / "chunks").glob("chunk-*.parquet"))
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
    vectors = StoredVectors(dataset)
    plan = IndexPlan.choose(index_kind, len(dataset), vectors.dimension)
    megabytes = plan.memory_bytes(len(dataset), vectors.dimension) / 2**20
    print(f"Building a {plan.kind} index ({plan.factory()}) of {len(dataset):,} rows: about {megabytes:,.0f} MB in "
          "memory when searched.")  # fmt: skip
    with tqdm(total=len(dataset), desc="indexing", unit="row", leave=False) as bar:
        seconds = plan.build(vectors, output_dir / archive.FAISS_FILE, lambda added: bar.update(added - bar.n))
    return dataset, plan, seconds


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")  # the modules' warnings
    try:
        import faiss  # noqa: F401
    except ImportError:
        sys.exit('medmoe-index needs faiss: pip install -e ".[search]" (or pip install faiss-cpu).')
    try:
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
            info = index_archive(args)
    except (FileNotFoundError, ValueError, ImportError, PacsError) as error:
        sys.exit(f"error: {error}")
    if args.json and info is not None:
        skipped_path = args.output_dir / archive.SKIPPED_FILE
        lines = skipped_path.read_text().splitlines() if skipped_path.is_file() else []
        print(json.dumps({**info, "skipped_rows": [json.loads(line) for line in lines]}, indent=2))


def index_archive(args: argparse.Namespace) -> dict | None:
    """Embed the archive `args` names into args.output_dir (resuming a run cut short; this rank's share under
    several processes) and index it; returns index_info.json's content (None on ranks other than the main one).
    Every file is written as the output policy says, readable by the user alone."""
    policy = output_policy(args)
    share = RankShare.of_this_process(args.device)
    with private_files(args.output_dir), policy.quiet_logs():
        share.check_resumable(args.output_dir)
        return index_with_policy(args, policy, share)


def resumed_progress(part_dir: Path, args: argparse.Namespace, described: dict, policy: IdentifiedOutput) -> dict:
    """This rank's progress: a fresh one, or the one it left, checked to be of the same source, model and key."""
    progress = archive.read_json(part_dir / "progress.json")
    if progress is None:
        return {"model": args.model, "source": described, "key_fingerprint": policy.key_fingerprint,
                "rows_read": 0, "chunks": 0, "skipped": {}}  # fmt: skip
    if progress.get("key_fingerprint") != policy.key_fingerprint:
        raise ValueError(
            f"{args.output_dir} was started with another de-identification key, or none (key fingerprint "
            f"{progress.get('key_fingerprint')}); resume it with the same key, or pass another --output_dir."
        )
    if progress["source"] != described or progress["model"] != args.model:
        raise ValueError(
            f"{args.output_dir} holds an index of another source or model ({progress['source']}, {progress['model']});"
            " pass another --output_dir, or delete it to start again."
        )
    if progress["rows_read"]:
        print(f"Resuming after {progress['rows_read']} rows ({progress['chunks']} chunks) in {part_dir}.")
    return progress


def index_with_policy(args: argparse.Namespace, policy: IdentifiedOutput, share: RankShare) -> dict | None:
    thumbnail_size = 0 if policy.deidentified else args.thumbnail_size
    settings = archive.EmbeddingSettings.from_args(args, share)
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True).to(settings.device).eval()
    # this package's image processor with the folder's saved settings: it reads DICOM whatever the folder's code age
    image_processor = MedMoEImageProcessor.from_pretrained(args.model)
    source = archive.ArchiveSource.from_args(args, image_processor.limits)
    described = policy.source(source_description(source, args.window, args.max_rows))
    part_dir = share.part_dir(args.output_dir)
    progress = resumed_progress(part_dir, args, described, policy)
    rows, metadata = source.open()
    features = datasets.Features(policy.features(archive.index_features(metadata, model.config.projection_dim)))
    writer = ChunkWriter(part_dir, features, progress, args.chunk_size, policy, args.flush_seconds)
    start = time.perf_counter()
    encoder = settings.encoder(model, args.model)
    print(f"Image side on {encoder.name} ({settings.describe()}).")
    embed_archive(rows, encoder, image_processor, writer, settings, share=share, skip=progress["rows_read"],
                  max_rows=args.max_rows, window=args.window, thumbnail_size=thumbnail_size)  # fmt: skip
    share.wait_for_everyone()
    embed_seconds = time.perf_counter() - start  # until the slowest rank has finished
    if not share.is_main:
        return None
    if share.ranks > 1:
        progress = merge_parts(args.output_dir, share)
    dataset, plan, index_seconds = build_index(args.output_dir, share.part_dirs(args.output_dir), args.index)
    info = {
        "model": args.model,
        "source": described,
        "rows": len(dataset),
        "rows_read": progress["rows_read"],
        "skipped": progress["skipped"],
        "skipped_list": archive.SKIPPED_FILE,
        "dimension": model.config.projection_dim,
        "index": plan.kind,
        "index_plan": plan.as_info(),
        "processes": share.ranks,
        "backend": encoder.name,
        "holds": policy.holdings(dataset.column_names, archive.columns_with_values(dataset, ("path", "thumbnail"))),
        "expert_names": list(model.config.expert_names),
        "window": args.window,
        "embed_seconds_this_run": round(embed_seconds, 2),
        "index_build_seconds": round(index_seconds, 3),
    }
    archive.write_json_atomically(args.output_dir / archive.INFO_FILE, info)
    skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(progress["skipped"].items())) or "none"
    print(f"Indexed {len(dataset)} images ({plan.kind} index); skipped: {skipped}.")
    if progress["skipped"]:
        print(f"Skipped rows, each with its reason: {args.output_dir / archive.SKIPPED_FILE}")
    print(
        f"Index: {args.output_dir} (dataset/, {archive.FAISS_FILE}, {archive.INFO_FILE}); search it with medmoe-search."
    )
    return info


if __name__ == "__main__":
    main()
