"""The FAISS index over an archive's embeddings: which kind for how many rows, the memory it will take (printed before
it is built), building it from the stored vectors in batches, loading it (memory-mapped where FAISS allows) and
searching it, with an IVF-PQ index's top candidates re-ranked on the stored full vectors.

    plan = IndexPlan.choose("auto", rows=len(vectors), dimension=256)
    plan.build(vectors, "OUT/embedding.faiss")        # vectors: [N, P] float32, sliceable (a StoredVectors)
    index = plan.load("OUT/embedding.faiss")
    scores, rows = plan.search(index, vectors, query, k=10)

Kinds (inner product = cosine similarity on L2-normalised embeddings):
- flat: exact search over every vector, P x 4 bytes a row in memory.
- ivf: the vectors in inverted lists around k-means centroids, a fraction of the lists searched; as much memory as
  flat, much faster on millions of rows.
- ivfpq: inverted lists of product-quantised codes (`code_bytes` a row: 4-bit codes, one per two dimensions, scanned
  with SIMD; centroids found through an HNSW graph), the top `rerank` candidates then rescored exactly on the full
  vectors kept on disk: tens of millions of rows in a GB or less.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

INDEX_KINDS = ("auto", "flat", "ivf", "ivfpq")
AUTO_IVF_ROWS = 100_000  # auto: ivf from here
AUTO_IVFPQ_ROWS = 2_000_000  # auto: ivfpq from here (flat / ivf memory: 1 KB a 256-wide row)
MIN_TRAINING_ROWS_PER_LIST = 39  # faiss's k-means warns below this
PQ_TRAINING_ROWS = 16 * 39 * 16  # each 4-bit sub-quantizer has 16 centroids; 16 times faiss's minimum
ADD_BATCH_ROWS = 65_536


class StoredVectors:
    """The `embedding` column of a `datasets` dataset as an [N, P] float32 array that is read on demand (slices and
    row lists), so that building and re-ranking never hold every vector in memory."""

    def __init__(self, dataset, column: str = "embedding"):
        self.vectors = dataset.select_columns([column]).with_format("numpy")
        self.column = column

    def __len__(self) -> int:
        return len(self.vectors)

    def __getitem__(self, rows) -> np.ndarray:
        return np.asarray(self.vectors[rows][self.column], dtype=np.float32).reshape(-1, self.dimension)

    @property
    def dimension(self) -> int:
        return self.vectors.features[self.column].length


@dataclass(frozen=True)
class IndexPlan:
    """What index to build and how to search it; stored in index_info.json so a search uses what was built."""

    kind: str
    lists: int = 0
    code_bytes: int = 0
    nprobe: int = 1
    rerank: int = 0

    @classmethod
    def choose(cls, kind: str, rows: int, dimension: int) -> "IndexPlan":
        """The plan for `rows` vectors of `dimension`: `kind` as asked, or by size for "auto"; too few rows to train
        lists (under 256) are searched flat."""
        if kind not in INDEX_KINDS:
            raise ValueError(f"Unknown index kind {kind!r}; use one of {', '.join(INDEX_KINDS)}.")
        if kind == "auto":
            kind = "flat" if rows < AUTO_IVF_ROWS else "ivf" if rows < AUTO_IVFPQ_ROWS else "ivfpq"
        if kind == "flat" or rows < 256:
            return cls("flat")
        if kind == "ivf":
            lists = max(1, min(int(4 * math.sqrt(rows)), rows // MIN_TRAINING_ROWS_PER_LIST))
            return cls("ivf", lists=lists, nprobe=max(1, lists // 16))
        if rows < PQ_TRAINING_ROWS:
            raise ValueError(f"--index ivfpq needs at least {PQ_TRAINING_ROWS:,} rows to train its quantiser; the "
                             f"archive has {rows:,}: use --index flat or ivf (or auto).")  # fmt: skip
        lists = 2 ** round(math.log2(max(64, min(math.sqrt(rows), rows // MIN_TRAINING_ROWS_PER_LIST))))
        if dimension % 2:
            raise ValueError(f"--index ivfpq needs an even embedding width; this model's is {dimension}.")
        # the 4-bit codes order the near neighbours roughly: re-ranking 1,024 candidates exactly is what holds
        # recall@10 near 0.98 at 10M rows; probing more lists does not add to it
        return cls("ivfpq", lists=lists, code_bytes=dimension // 4, nprobe=max(32, lists // 32), rerank=1024)

    @classmethod
    def from_info(cls, info: dict) -> "IndexPlan":
        """The plan of an index folder's index_info.json (indexes built before plans were stored: flat or ivf)."""
        if "index_plan" in info:
            return cls(**info["index_plan"])
        return cls(info.get("index", "flat"))

    def as_info(self) -> dict:
        return asdict(self)

    def factory(self) -> str:
        if self.kind == "flat":
            return "Flat"
        if self.kind == "ivf":
            return f"IVF{self.lists},Flat"
        return f"IVF{self.lists}_HNSW32,PQ{2 * self.code_bytes}x4fsr"  # by residual, fast-scan

    def memory_bytes(self, rows: int, dimension: int) -> int:
        """The index's size in memory for `rows` vectors (what it holds: vectors or codes, their ids, centroids)."""
        if self.kind == "flat":
            return rows * dimension * 4
        centroids = self.lists * dimension * 4
        if self.kind == "ivf":
            return rows * (dimension * 4 + 8) + centroids
        graph = self.lists * 32 * 2 * 4  # HNSW32 over the centroids
        return rows * (self.code_bytes + 8) + centroids + graph + 16 * dimension * 4

    def training_rows(self, rows: int) -> int:
        """How many vectors train the lists and the quantiser (a sample spread over the archive)."""
        if self.kind == "flat":
            return 0
        wanted = 64 * self.lists if self.kind == "ivf" else max(PQ_TRAINING_ROWS, MIN_TRAINING_ROWS_PER_LIST * 4 *
                                                                 self.lists)  # fmt: skip
        return min(rows, wanted)

    def build(self, vectors, path: Path, progress=None) -> float:
        """Train on a sample of `vectors` ([N, P], sliceable, e.g. StoredVectors), add them all in batches, write the
        index to `path`; returns the seconds it took. `progress(added_rows)` is called after each batch."""
        import faiss

        start = time.perf_counter()
        rows, dimension = len(vectors), vectors[0:1].shape[1]
        index = faiss.index_factory(dimension, self.factory(), faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            sample = np.linspace(0, rows - 1, self.training_rows(rows)).astype(np.int64)
            index.train(np.ascontiguousarray(vectors[sample.tolist()]))
        for first in range(0, rows, ADD_BATCH_ROWS):
            index.add(np.ascontiguousarray(vectors[first : first + ADD_BATCH_ROWS]))
            if progress is not None:
                progress(min(first + ADD_BATCH_ROWS, rows))
        faiss.write_index(index, str(path))
        return time.perf_counter() - start

    def load(self, path: Path):
        """The index at `path`, its inverted lists memory-mapped where FAISS can (ivf, ivfpq), searching `nprobe`
        lists."""
        import faiss

        if self.kind == "flat":
            index = faiss.read_index(str(path))
        else:
            try:
                index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            except RuntimeError:
                index = faiss.read_index(str(path))
            inverted = faiss.extract_index_ivf(index)
            inverted.nprobe = self.nprobe
            if self.kind == "ivfpq":  # the HNSW graph over the centroids must find as many lists as are probed
                faiss.downcast_index(inverted.quantizer).hnsw.efSearch = max(64, 2 * self.nprobe)
        return index

    def search(self, index, vectors, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [k'], rows [k']) of the k vectors most similar to `query` [P], best first (k' <= k when the
        archive is smaller or the lists searched hold fewer); an ivfpq index's top `rerank` candidates are rescored
        on the full `vectors` first."""
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        wanted = max(k, self.rerank) if self.kind == "ivfpq" else k
        scores, rows = index.search(query, min(wanted, index.ntotal))
        scores, rows = scores[0], rows[0]
        found = rows >= 0
        scores, rows = scores[found], rows[found]
        if self.kind == "ivfpq" and len(rows):
            order = np.argsort(rows)  # read the stored vectors in file order
            exact = np.empty(len(rows), dtype=np.float32)
            exact[order] = vectors[rows[order].tolist()] @ query[0]
            best = np.argsort(-exact, kind="stable")[:k]
            return exact[best], rows[best]
        return scores[:k], rows[:k]
