"""Archive search: how fast medmoe-index embeds images, and how the FAISS index builds and answers at scale.

    python benchmarks/archive_search.py            # embedding (nano, small) + index at 10k and 1M vectors (~6 min)
    python benchmarks/archive_search.py --quick    # embedding (nano) + index at 10k and 100k vectors (~2 min)

1. Embedding: `index.index_archive` end to end on a folder of synthetic phantom PNGs (read, decode, window,
   thumbnail, model forward, chunk writing), randomly initialised models of the named presets: images/s.
2. Index: synthetic clustered unit vectors (P = 128, as the `small` preset; a mixture of 1,000 Gaussian clusters,
   queries are perturbed rows), indexed by `index.add_faiss_index` (flat and IVF), then 200 queries of k = 10:
   build seconds, query milliseconds, IVF recall@10 against flat (the exact answer).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.common import print_json, print_table  # noqa: E402

DIMENSION = 128
QUERIES = 200
K = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="nano only, and 100k instead of 1M vectors")
    parser.add_argument("--images", type=int, default=256, help="phantoms embedded per preset")
    return parser.parse_args(argv)


def embedding_throughput(preset: str, images: int, work: Path) -> float:
    """images/s of index_archive on `images` phantom PNGs with a random-init model of `preset`."""
    from medmoe_archive import index
    from modeling_medmoe import MedMoEConfig, MedMoEImageProcessor, MedMoEModel, MedMoEProcessor
    from training.synthetic import synthetic_stream
    from training.tokenizer import train_wordpiece_tokenizer

    config = MedMoEConfig.from_preset(preset)
    side = config.vision_config.image_size
    folder = work / f"phantoms-{preset}"
    reports = []
    for number, row in enumerate(synthetic_stream(seed=3, num_shards=1, rows_per_shard=images, image_size=side)):
        (folder / row["modality"]).mkdir(parents=True, exist_ok=True)
        row["image"].save(folder / row["modality"] / f"{number:05d}.png")
        reports.append(row["text"])
    tokenizer = train_wordpiece_tokenizer(reports, vocab_size=500)
    config.text_config.vocab_size = tokenizer.vocab_size
    model_dir = work / f"model-{preset}"
    MedMoEModel(config).save_pretrained(model_dir)
    image_processor = MedMoEImageProcessor(size={"height": side, "width": side})
    MedMoEProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(model_dir)
    arguments = ["--model", str(model_dir), "--images", str(folder), "--output_dir", str(work / f"index-{preset}")]
    info = index.index_archive(index.parse_args(arguments))
    return info["rows"] / info["embed_seconds_this_run"]


def clustered_vectors(rows: int, generator: np.random.Generator) -> np.ndarray:
    centres = generator.standard_normal((1000, DIMENSION)).astype(np.float32)
    vectors = centres[generator.integers(0, len(centres), rows)] + 0.6 * generator.standard_normal(
        (rows, DIMENSION), dtype=np.float32
    )
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def index_figures(rows: int) -> dict:
    """Build flat and IVF indexes over `rows` vectors; build seconds, median query ms, IVF recall@10."""
    import datasets

    from medmoe_archive.index import add_faiss_index

    generator = np.random.default_rng(0)
    vectors = clustered_vectors(rows, generator)
    queries = vectors[generator.integers(0, rows, QUERIES)] + 0.05 * generator.standard_normal(
        (QUERIES, DIMENSION), dtype=np.float32
    )
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    dataset = datasets.Dataset.from_dict({"embedding": vectors})
    figures, answers = {}, {}
    for kind in ("flat", "ivf"):
        build = add_faiss_index(dataset, kind)
        index = dataset.get_index("embedding")
        durations, found = [], []
        for query in queries:
            start = time.perf_counter()
            _, ids = index.search(query, k=K)
            durations.append(time.perf_counter() - start)
            found.append(set(ids.tolist()))
        answers[kind] = found
        figures[kind] = {"build_s": build, "query_ms": 1000 * statistics.median(durations)}
        dataset.drop_index("embedding")
    recall = np.mean([len(a & e) / K for a, e in zip(answers["ivf"], answers["flat"])])
    return {**figures, "ivf_recall_at_10": float(recall)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    presets = ("nano",) if args.quick else ("nano", "small")
    sizes = (10_000, 100_000) if args.quick else (10_000, 1_000_000)
    results, rows = {}, [("measure", *presets)]
    with tempfile.TemporaryDirectory() as work:
        throughput = {preset: embedding_throughput(preset, args.images, Path(work)) for preset in presets}
    rows.append(("embedding images/s (index_archive, CPU)", *(f"{throughput[p]:.1f}" for p in presets)))
    print_table("1. Embedding an archive of phantom PNGs", rows)
    results.update({f"archive_embed_images_per_s_{preset}": value for preset, value in throughput.items()})
    table = [
        ("vectors", "flat build s", "flat query ms", "ivf build s", "ivf query ms", "ivf speed-up", "ivf recall@10")
    ]
    for size in sizes:
        figures = index_figures(size)
        flat, ivf = figures["flat"], figures["ivf"]
        speedup = flat["query_ms"] / ivf["query_ms"]
        table.append((f"{size:,}", f"{flat['build_s']:.2f}", f"{flat['query_ms']:.2f}", f"{ivf['build_s']:.2f}",
                      f"{ivf['query_ms']:.3f}", f"{speedup:.1f}x", f"{figures['ivf_recall_at_10']:.3f}"))  # fmt: skip
        label = f"{size // 1000}k" if size < 1_000_000 else f"{size // 1_000_000}m"
        results.update({
            f"flat_query_ms_{label}": flat["query_ms"],
            f"ivf_query_ms_{label}": ivf["query_ms"],
            f"ivf_build_s_{label}": ivf["build_s"],
            f"ivf_query_speedup_{label}": speedup,
            f"ivf_recall_at_10_{label}": figures["ivf_recall_at_10"],
        })  # fmt: skip
    print_table(f"2. FAISS through datasets, P = {DIMENSION}, {QUERIES} queries of k = {K}", table)
    print_json(results)
    return results


if __name__ == "__main__":
    main()
