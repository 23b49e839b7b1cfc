"""Archive search: how fast medmoe-index embeds images, and how the FAISS index builds and answers at scale.

    python -m benchmarks.archive_search            # embedding (nano, small) + index at 10k and 1M vectors (~8 min)
    python -m benchmarks.archive_search --quick    # embedding (nano) + index at 10k and 100k vectors (~2 min)
    python -m benchmarks.archive_search --scale 10000000 --dimension 256    # one IVF-PQ index of 10M vectors

1. Embedding: `index.index_archive` end to end on a folder of synthetic phantom PNGs (read, decode, window,
   thumbnail, model forward, chunk writing), randomly initialised models of the named presets: images/s.
2. Index: synthetic clustered unit vectors (P = 128 by default, as the `small` preset; a mixture of 1,000 Gaussian
   clusters; queries are held-out draws from the same mixture), indexed as medmoe-index indexes
   (medmoe_archive/vector_index.py: flat, ivf, ivfpq with re-ranking), then 200 queries of k = 10: build seconds,
   query milliseconds, recall@10 against exact search.
3. --scale N: one index of the kind `auto` picks for N vectors (ivfpq from 2M), the vectors in a memory-mapped file
   as medmoe-index keeps them on disk: build seconds, the index's memory (the plan's figure and the process's
   resident growth once loaded), query milliseconds and recall@10 against exact search, 100 queries; then the
   same index searched with more or fewer lists probed and candidates re-ranked.
4. The search page: a `--page_rows`-row nano index (10,000) served by medmoe_archive/app.py, 20 text queries (and
   20 with an expert filter, series grouping and the second page) over HTTP: seconds from query to answer.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import print_json, print_table

DIMENSION = 128
QUERIES = 200
K = 10
SCALE_SETTINGS = ((64, 256), (128, 256), (256, 256), (256, 1024), (256, 2048), (512, 2048))  # part 3, besides default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="nano only, and 100k instead of 1M vectors")
    parser.add_argument("--images", type=int, default=256, help="phantoms embedded per preset")
    parser.add_argument("--page_rows", type=int, default=10_000, help="rows of the search page's index (part 4)")
    parser.add_argument("--scale", type=int, help="only part 3: one index of this many vectors (e.g. 10000000)")
    parser.add_argument("--dimension", type=int, default=DIMENSION, help="vector width of part 3 (256 = swin-tiny)")
    parser.add_argument("--work_dir", type=Path, help="where part 3 writes its vectors (default: the temp folder)")
    return parser.parse_args(argv)


def phantom_index(preset: str, images: int, work: Path) -> tuple[Path, Path, dict]:
    """(index folder, model folder, index_info) of `images` phantom PNGs indexed by index_archive with a random-init
    model of `preset`."""
    from medmoe.training.synthetic import synthetic_stream
    from medmoe.training.tokenizer import train_wordpiece_tokenizer
    from medmoe_archive import index
    from modeling_medmoe import MedMoEConfig, MedMoEImageProcessor, MedMoEModel, MedMoEProcessor

    config = MedMoEConfig.from_preset(preset)
    side = config.vision_config.image_size
    folder = work / f"phantoms-{preset}-{images}"
    reports = []
    for number, row in enumerate(synthetic_stream(seed=3, num_shards=1, rows_per_shard=images, image_size=side)):
        (folder / row["modality"]).mkdir(parents=True, exist_ok=True)
        row["image"].save(folder / row["modality"] / f"{number:05d}.png")
        reports.append(row["text"])
    tokenizer = train_wordpiece_tokenizer(reports[:2000], vocab_size=500)
    config.text_config.vocab_size = tokenizer.vocab_size
    model_dir = work / f"model-{preset}-{images}"
    MedMoEModel(config).save_pretrained(model_dir)
    image_processor = MedMoEImageProcessor(size={"height": side, "width": side})
    MedMoEProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(model_dir)
    index_dir = work / f"index-{preset}-{images}"
    arguments = ["--model", str(model_dir), "--images", str(folder), "--output_dir", str(index_dir)]
    return index_dir, model_dir, index.index_archive(index.parse_args(arguments))


def embedding_throughput(preset: str, images: int, work: Path) -> float:
    """images/s of index_archive on `images` phantom PNGs with a random-init model of `preset`."""
    _, _, info = phantom_index(preset, images, work)
    return info["rows"] / info["embed_seconds_this_run"]


def page_query_seconds(rows: int, work: Path, queries: int = 20) -> dict:
    """The search page over a `rows`-row nano index: median and worst seconds from sending a text query (and a
    filtered, grouped one) to its answer, over HTTP on this machine, the model already loaded."""
    import json
    import urllib.request

    from medmoe_archive.app import SearchPage, serve
    from medmoe_archive.search import ArchiveSearch

    index_dir, model_dir, _ = phantom_index("nano", rows, work)
    server = serve(SearchPage(ArchiveSearch(index_dir, str(model_dir)), None, 24), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_address[1]}/api/search"
    bodies = [{"text": "axial CT of the abdomen"}, {"text": "brain MRI", "expert": "MRI", "group": "series", "page": 2}]
    timings = {}
    for number, body in enumerate(bodies):
        durations = []
        for _ in range(queries):
            start = time.perf_counter()
            request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
            json.loads(urllib.request.urlopen(request).read())
            durations.append(time.perf_counter() - start)
        timings[("plain", "filtered")[number]] = (statistics.median(durations), max(durations))
    server.shutdown()
    return timings


def clustered_vectors(rows: int, dimension: int, generator: np.random.Generator, out=None) -> np.ndarray:
    """`rows` unit vectors from a mixture of 1,000 Gaussian clusters (seeded centres), written into `out` (an
    [rows, dimension] array such as a memmap) in blocks when given."""
    centres = np.random.default_rng(12345).standard_normal((1000, dimension)).astype(np.float32)
    out = np.empty((rows, dimension), dtype=np.float32) if out is None else out
    for first in range(0, rows, 1_000_000):
        count = min(1_000_000, rows - first)
        block = centres[generator.integers(0, len(centres), count)]
        block += 0.6 * generator.standard_normal((count, dimension), dtype=np.float32)
        out[first : first + count] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """[Q, K] the exact top-K rows of each query (inner product), reading `vectors` in blocks."""
    best_scores = np.full((len(queries), K), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), K), dtype=np.int64)
    for first in range(0, len(vectors), 1_000_000):
        scores = queries @ np.asarray(vectors[first : first + 1_000_000]).T
        scores = np.concatenate([best_scores, scores], axis=1)
        rows = np.concatenate([best_rows, np.arange(first, first + scores.shape[1] - K)[None].repeat(len(queries), 0)],
                              axis=1)  # fmt: skip
        top = np.argpartition(-scores, K, axis=1)[:, :K]
        best_scores, best_rows = np.take_along_axis(scores, top, 1), np.take_along_axis(rows, top, 1)
    return best_rows


def query_figures(plan, index, vectors, queries: np.ndarray, truth: np.ndarray) -> dict:
    """Median query milliseconds (k = K, re-ranking included) and recall@K against `truth`."""
    durations, recalls = [], []
    for query, exact in zip(queries, truth):
        start = time.perf_counter()
        _, rows = plan.search(index, vectors, query, K)
        durations.append(time.perf_counter() - start)
        recalls.append(len(set(rows.tolist()) & set(exact.tolist())) / K)
    return {"query_ms": 1000 * statistics.median(durations), "recall_at_10": float(np.mean(recalls))}


def index_figures(rows: int, dimension: int = DIMENSION) -> dict:
    """Build flat, ivf and (from 10k rows) ivfpq indexes over `rows` clustered vectors; per kind: build seconds,
    median query ms, recall@10 against exact search."""
    from medmoe_archive.vector_index import PQ_TRAINING_ROWS, IndexPlan

    generator = np.random.default_rng(0)
    vectors = clustered_vectors(rows, dimension, generator)
    queries = clustered_vectors(QUERIES, dimension, generator)
    truth = exact_neighbours(vectors, queries)
    figures = {}
    with tempfile.TemporaryDirectory() as scratch:
        for kind in ("flat", "ivf", "ivfpq") if rows >= PQ_TRAINING_ROWS else ("flat", "ivf"):
            plan = IndexPlan.choose(kind, rows, dimension)
            build = plan.build(vectors, Path(scratch) / f"{kind}.faiss")
            index = plan.load(Path(scratch) / f"{kind}.faiss")
            figures[kind] = {"build_s": build, **query_figures(plan, index, vectors, queries, truth)}
    return figures


def scale_figures(rows: int, dimension: int, work_dir: Path | None = None) -> dict:
    """The `auto` index of `rows` clustered vectors kept in a memory-mapped file (as medmoe-index's dataset keeps
    them): build seconds, planned and measured memory, query ms and recall@10 over 100 held-out queries."""
    import psutil

    from medmoe_archive.vector_index import IndexPlan

    generator = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=work_dir) as scratch:  # rows x dimension x 4 bytes of vectors
        path = Path(scratch) / "vectors.f32"
        vectors = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dimension))
        start = time.perf_counter()
        clustered_vectors(rows, dimension, generator, vectors)
        vectors.flush()
        generated = time.perf_counter() - start
        queries = clustered_vectors(100, dimension, generator)
        truth = exact_neighbours(vectors, queries)
        plan = IndexPlan.choose("auto", rows, dimension)
        print(f"{rows:,} vectors written in {generated:.0f} s; building {plan.factory()} ...", flush=True)
        build = plan.build(vectors, Path(scratch) / "index.faiss")
        process = psutil.Process()
        before = process.memory_info().rss
        index = plan.load(Path(scratch) / "index.faiss")
        loaded = process.memory_info().rss - before
        figures = query_figures(plan, index, vectors, queries, truth)
        searched = process.memory_info().rss - before
        settings = {}
        for nprobe, rerank in SCALE_SETTINGS:  # what more lists probed or more candidates re-ranked buy
            other = dataclasses.replace(plan, nprobe=nprobe, rerank=rerank)
            settings[f"nprobe {nprobe}, rerank {rerank}"] = query_figures(
                other, other.load(Path(scratch) / "index.faiss"), vectors, queries, truth
            )
        return {
            "rows": rows,
            "dimension": dimension,
            "factory": plan.factory(),
            "nprobe": plan.nprobe,
            "rerank": plan.rerank,
            "build_s": build,
            "planned_memory_mb": plan.memory_bytes(rows, dimension) / 2**20,
            "loaded_rss_mb": loaded / 2**20,
            "rss_after_queries_mb": searched / 2**20,
            "file_mb": (Path(scratch) / "index.faiss").stat().st_size / 2**20,
            **figures,
            "settings": settings,
        }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.scale:
        figures = scale_figures(args.scale, args.dimension, args.work_dir)
        shown = {key: value for key, value in figures.items() if key != "settings"}
        print_table(f"3. One index of {args.scale:,} vectors, P = {args.dimension}, 100 queries of k = {K}",
                    [tuple(shown), tuple(f"{value:.3f}" if isinstance(value, float) else value
                                         for value in shown.values())])  # fmt: skip
        print_table("   the same index searched with other settings",
                    [("search settings", "query ms", "recall@10"), *((name, f"{value['query_ms']:.3f}",
                     f"{value['recall_at_10']:.3f}") for name, value in figures["settings"].items())])  # fmt: skip
        print_json(figures)
        return figures
    torch.manual_seed(0)
    presets = ("nano",) if args.quick else ("nano", "small")
    sizes = (10_000, 100_000) if args.quick else (10_000, 1_000_000)
    results, rows = {}, [("measure", *presets)]
    with tempfile.TemporaryDirectory() as work:
        throughput = {preset: embedding_throughput(preset, args.images, Path(work)) for preset in presets}
    rows.append(("embedding images/s (index_archive, CPU)", *(f"{throughput[p]:.1f}" for p in presets)))
    print_table("1. Embedding an archive of phantom PNGs", rows)
    results.update({f"archive_embed_images_per_s_{preset}": value for preset, value in throughput.items()})
    table = [("vectors", "kind", "build s", "query ms", "recall@10")]
    for size in sizes:
        label = f"{size // 1000}k" if size < 1_000_000 else f"{size // 1_000_000}m"
        for kind, figures in index_figures(size).items():
            table.append((f"{size:,}", kind, f"{figures['build_s']:.2f}", f"{figures['query_ms']:.3f}",
                          f"{figures['recall_at_10']:.3f}"))  # fmt: skip
            results.update({f"{kind}_{key}_{label}": value for key, value in figures.items()})
    print_table(f"2. The archive's FAISS indexes, P = {DIMENSION}, {QUERIES} queries of k = {K}", table)
    with tempfile.TemporaryDirectory() as work:
        timings = page_query_seconds(args.page_rows, Path(work))
    print_table(f"4. The search page over {args.page_rows:,} images (nano), seconds from query to answer, over HTTP",
                [("query", "median s", "worst s"), *((name, f"{median:.3f}", f"{worst:.3f}")
                                                     for name, (median, worst) in timings.items())])  # fmt: skip
    results.update({f"page_{name}_query_s": median for name, (median, _) in timings.items()})
    print_json(results)
    return results


if __name__ == "__main__":
    main()
