"""medmoe-index at hospital scale: decoding workers (the same index as one process; a crashed or hung worker costs
its row), autocast, several processes under torchrun (the same index, de-identified too; a killed rank resumes), and
the IVF-PQ index's recall with re-ranking."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("pydicom")

from medmoe_archive import decoding  # noqa: E402
from medmoe_archive import index as index_script  # noqa: E402
from medmoe_archive.archive import folder_rows  # noqa: E402
from medmoe_archive.ranks import RankShare  # noqa: E402
from medmoe_archive.rows import ArchiveRow  # noqa: E402
from medmoe_archive.search import ArchiveSearch  # noqa: E402
from medmoe_archive.vector_index import IndexPlan  # noqa: E402
from modeling_medmoe import MedMoEImageProcessor  # noqa: E402

from .helpers import ROOT  # noqa: E402

KEY = "an archive's de-identification key"


def run_index(arguments):
    return index_script.index_archive(index_script.parse_args(arguments))


def index_contents(folder: Path) -> dict:
    """id -> (embedding, expert) of a finished index, and the skipped list as a sorted list of (id, reason)."""
    searcher_dataset = ArchiveSearch(folder, None).dataset
    rows = {row["id"]: (np.asarray(row["embedding"]), row["expert"]) for row in searcher_dataset}
    skipped = sorted(
        (entry["id"], entry["reason"]) for entry in map(json.loads, (folder / "skipped.jsonl").read_text().splitlines())
    )
    return {"rows": rows, "skipped": skipped}


def assert_same_index(first: dict, second: dict, tolerance: float = 1e-6) -> None:
    assert first["skipped"] == second["skipped"]
    assert sorted(first["rows"]) == sorted(second["rows"])
    for row_id, (embedding, expert) in first["rows"].items():
        other_embedding, other_expert = second["rows"][row_id]
        assert expert == other_expert, row_id
        np.testing.assert_allclose(embedding, other_embedding, atol=tolerance)


@pytest.fixture(scope="module")
def one_process_index(nano_folder, image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "index"
    run_index(["--model", str(nano_folder), "--images", str(image_folder), "--output_dir", str(out),
               "--num_workers", "0", "--batch_size", "8", "--chunk_size", "8"])  # fmt: skip
    return out


def test_decoding_workers_give_the_same_index_as_the_main_process(nano_folder, image_folder, one_process_index,
                                                                  tmp_path):  # fmt: skip
    out = tmp_path / "workers"
    run_index(["--model", str(nano_folder), "--images", str(image_folder), "--output_dir", str(out),
               "--num_workers", "2", "--batch_size", "8", "--chunk_size", "8"])  # fmt: skip
    assert_same_index(index_contents(one_process_index), index_contents(out))
    ordered = [row["id"] for row in ArchiveSearch(out, None).dataset]
    assert ordered == [row["id"] for row in ArchiveSearch(one_process_index, None).dataset], "source order kept"


def crash_or_hang_on_some_rows(original):
    def prepare_row(row, *arguments):
        if row.id.endswith("003.png"):
            os._exit(3)  # a decoder that brings its process down
        if row.id.endswith("005.png"):
            time.sleep(3600)  # a decoder that never returns
        return original(row, *arguments)

    return prepare_row


def test_a_worker_that_crashes_or_hangs_costs_its_row_and_the_rest_is_prepared(nano_folder, image_folder,
                                                                               monkeypatch):  # fmt: skip
    image_processor = MedMoEImageProcessor.from_pretrained(nano_folder)
    rows = list(folder_rows(image_folder))
    expected = {prepared.row.id: prepared for prepared in decoding.prepare_rows(rows, image_processor)}
    monkeypatch.setattr(decoding, "prepare_row", crash_or_hang_on_some_rows(decoding.prepare_row))  # forked workers
    prepared = list(decoding.prepare_rows(rows, image_processor, workers=2, row_timeout=3))
    assert [entry.row.id for entry in prepared] == [row.id for row in rows]
    reasons = {entry.row.id: entry.skipped["reason"] for entry in prepared if entry.skipped}
    crashed = [row_id for row_id in reasons if row_id.endswith("003.png")]
    hung = [row_id for row_id in reasons if row_id.endswith("005.png")]
    assert [reasons[row_id] for row_id in crashed] == ["decoder_crashed"] * len(crashed) and crashed
    assert [reasons[row_id] for row_id in hung] == ["decode_timeout"] * len(hung) and hung
    for entry in prepared:
        if entry.row.id not in crashed + hung:
            assert (entry.skipped is None) == (expected[entry.row.id].skipped is None), entry.row.id
            if entry.pixels is not None:
                assert entry.pixels.equal(expected[entry.row.id].pixels)


def test_bfloat16_autocast_keeps_the_rows_and_nearly_the_embeddings(nano_folder, image_folder, one_process_index,
                                                                    tmp_path):  # fmt: skip
    out = tmp_path / "bf16"
    run_index(["--model", str(nano_folder), "--images", str(image_folder), "--output_dir", str(out),
               "--dtype", "bfloat16", "--num_workers", "0"])  # fmt: skip
    full, autocast = index_contents(one_process_index), index_contents(out)
    assert sorted(full["rows"]) == sorted(autocast["rows"]) and full["skipped"] == autocast["skipped"]
    cosines = [float(full["rows"][row_id][0] @ autocast["rows"][row_id][0]) for row_id in full["rows"]]
    assert min(cosines) > 0.98


def torchrun_index(arguments: list[str], module: str = "medmoe_archive.index") -> subprocess.Popen:
    """`module` (medmoe-index) under torchrun on 2 CPU processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29_700 + os.getpid() % 200), "--module", module, *arguments]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MEDMOE_DEIDENTIFY_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def finished(process: subprocess.Popen) -> None:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-4000:]


def test_two_processes_give_the_same_index_as_one(nano_folder, image_folder, one_process_index, tmp_path):
    out = tmp_path / "two"
    finished(torchrun_index(["--model", str(nano_folder), "--images", str(image_folder), "--output_dir", str(out),
                             "--device", "cpu", "--num_workers", "0", "--batch_size", "8"]))  # fmt: skip
    assert sorted(path.name for path in (out / "parts").iterdir()) == ["rank-000-of-002", "rank-001-of-002"]
    for part in (out / "parts").iterdir():
        assert any((part / "chunks").iterdir()), f"{part.name} embedded none of the rows"
    assert json.loads((out / "index_info.json").read_text())["processes"] == 2
    assert_same_index(index_contents(one_process_index), index_contents(out))


def test_two_processes_de_identified_equal_one_and_show_no_identifier(nano_folder, image_folder, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    monkeypatch.setenv("MEDMOE_DEIDENTIFY_KEY", KEY)
    arguments = ["--model", str(nano_folder), "--images", str(image_folder), "--deidentify", "--num_workers", "0"]
    run_index([*arguments, "--output_dir", str(tmp_path / "one")])
    finished(torchrun_index([*arguments, "--output_dir", str(tmp_path / "two"), "--device", "cpu"]))
    one, two = index_contents(tmp_path / "one"), index_contents(tmp_path / "two")
    assert_same_index(one, two)
    for path in (tmp_path / "two").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".parquet", ".arrow"):
            assert b"series_1" not in path.read_bytes() and str(image_folder).encode() not in path.read_bytes()


def test_a_killed_rank_resumes_and_the_merged_index_is_whole(nano_folder, image_folder, one_process_index, tmp_path):
    """Rank 1 is killed after its second chunk (tests/index_with_a_killed_rank.py), which ends the run; the same
    command again resumes each rank from its own progress and merges one index equal to one process's."""
    out = tmp_path / "killed"
    arguments = ["--model", str(nano_folder), "--images", str(image_folder), "--output_dir", str(out),
                 "--device", "cpu", "--num_workers", "0", "--batch_size", "2", "--chunk_size", "2"]  # fmt: skip
    killed = torchrun_index(arguments, module="tests.index_with_a_killed_rank")
    killed.communicate(timeout=600)
    assert killed.returncode != 0 and not (out / "index_info.json").exists()
    progress = json.loads((out / "parts" / "rank-001-of-002" / "progress.json").read_text())
    assert progress["chunks"] == 2 and 0 < progress["rows_read"] < 43
    finished(torchrun_index(arguments))
    assert_same_index(index_contents(one_process_index), index_contents(out))


def test_ranks_share_rows_evenly_and_keep_a_pacs_series_together():
    """Files go by their id (an even share even when an archive is a few large series); a PACS instance goes by its
    series, so that one rank fetches the whole series."""
    shares = [RankShare(rank, 2) for rank in range(2)]
    files = [ArchiveRow(f"{number:05d}.dcm", "a path", None, {"series_uid": f"1.2.3.{number // 500}"})
             for number in range(2000)]  # fmt: skip
    owned = [sum(share.owns(row) for row in files) for share in shares]
    assert sum(owned) == 2000 and min(owned) > 900

    def fetch():
        return b""

    instances = [ArchiveRow(f"1.2.4.{number}", fetch, None, {"series_uid": f"1.2.3.{number // 50}"})
                 for number in range(1000)]  # fmt: skip
    for first in range(0, 1000, 50):
        owners = {share.rank for share in shares for row in instances[first : first + 50] if share.owns(row)}
        assert len(owners) == 1


def test_another_number_of_processes_cannot_resume_a_run(nano_folder, image_folder, tmp_path):
    out = tmp_path / "parts_of_two"
    (out / "parts" / "rank-000-of-002").mkdir(parents=True)
    with pytest.raises(ValueError, match="was started with 2 processes, and this run has 1"):
        run_index(["--model", str(nano_folder), "--images", str(image_folder), "--output_dir", str(out)])


def clustered(rows: int, dimension: int, generator) -> np.ndarray:
    centres = generator.standard_normal((200, dimension)).astype(np.float32)
    vectors = centres[generator.integers(0, len(centres), rows)]
    vectors += 0.7 * generator.standard_normal((rows, dimension)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_ivfpq_with_re_ranking_finds_the_exact_neighbours(tmp_path):
    """Recall@10 against exact search of 50 held-out queries over 20,000 clustered 64-wide vectors: at least 0.95
    (the floor; compressed codes alone rank worse, re-ranking on the full vectors restores the order)."""
    generator = np.random.default_rng(0)
    vectors, queries = clustered(20_000, 64, generator), clustered(50, 64, generator)
    plan = IndexPlan.choose("ivfpq", len(vectors), 64)
    assert plan.kind == "ivfpq" and plan.rerank > 0
    plan.build(vectors, tmp_path / "index.faiss")
    index = plan.load(tmp_path / "index.faiss")
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    recall = np.mean([len(set(plan.search(index, vectors, query, 10)[1]) & set(truth)) / 10
                      for query, truth in zip(queries, exact)])  # fmt: skip
    assert recall >= 0.95
    assert plan.memory_bytes(10_000_000, 256) < 1.5 * 2**30 < IndexPlan("flat").memory_bytes(10_000_000, 256)


def test_auto_chooses_the_index_by_size():
    assert IndexPlan.choose("auto", 5_000, 256).kind == "flat"
    assert IndexPlan.choose("auto", 500_000, 256).kind == "ivf"
    assert IndexPlan.choose("auto", 20_000_000, 256).kind == "ivfpq"
    with pytest.raises(ValueError, match="needs at least"):
        IndexPlan.choose("ivfpq", 1_000, 256)
