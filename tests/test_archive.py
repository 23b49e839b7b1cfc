"""Archive search: medmoe-index over folders (PNG, DICOM, nested) and parquet, resume after an interruption,
skipped files counted, medmoe-search equal to the evaluation module's retrieval, and a save/reload of the index."""

import json
import shutil

import numpy as np
import pytest
import torch

from modeling_medmoe import MedMoEModel

pytest.importorskip("faiss")
pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

from medmoe_archive import index as index_script  # noqa: E402
from medmoe_archive import search as search_script  # noqa: E402
from medmoe_archive.search import ArchiveSearch  # noqa: E402

from .conftest import ARCHIVE_ROWS as ROWS  # noqa: E402
from .helpers import killed_after_adds  # noqa: E402
from .test_data import write_parquet  # noqa: E402


def run_index(arguments):
    return index_script.index_archive(index_script.parse_args(arguments))


def test_a_folder_is_indexed_with_unreadable_files_counted(nano_folder, image_folder, tmp_path):
    out = tmp_path / "index"
    info = run_index(["--model", str(nano_folder), "--images", str(image_folder), "--output_dir", str(out)])
    assert info["rows"] == ROWS + 1 and info["rows_read"] == ROWS + 3
    assert info["skipped"] == {"undecodable_dicom": 1, "undecodable_image": 1}
    searcher = ArchiveSearch(out, str(nano_folder))
    row = searcher.dataset[0]
    assert set(row) >= {"id", "path", "embedding", "expert", "expert_index", "thumbnail", "folder"}
    assert "CT/series_1" in set(searcher.dataset["id"]) and row["thumbnail"].startswith(b"\x89PNG")
    hits = searcher.search(searcher.image_query(image_folder / "CT" / "series_1", window="lung"), k=3)
    assert [hit["rank"] for hit in hits] == [1, 2, 3] and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]


def test_search_equals_the_evaluation_modules_retrieval_and_survives_a_reload(
    nano_folder, phantoms, processor, nano_config, tmp_path
):
    """Text -> image search over the archive ranks images as training/evaluation_metrics.py ranks the same rows."""
    from medmoe.training import data
    from medmoe.training.evaluation_embeddings import embed_pairs
    from medmoe.training.evaluation_metrics import retrieval_ranks

    write_parquet(phantoms, tmp_path / "rows.parquet")
    out = tmp_path / "index"
    run_index(["--model", str(nano_folder), "--files", str(tmp_path / "*.parquet"), "--output_dir", str(out)])
    stream, image_column, text_column = data.open_stream(
        data.DataArguments(eval_files=str(tmp_path / "*.parquet")), "eval"
    )
    prepare = data.RowPreparer(processor, nano_config.expert_names, image_column, text_column)
    batches = data.BatchStream(data.prepare_stream(stream, image_column=image_column), prepare,
                               data.BatchCollator(processor), batch_size=16, drop_last=False)  # fmt: skip
    model = MedMoEModel.from_pretrained(nano_folder).eval()
    embedded = embed_pairs(model, batches, torch.device("cpu"), show_progress=False)
    text_to_image = embedded.text_embeds @ embedded.image_embeds.T  # the evaluation's similarity, transposed
    ranks = retrieval_ranks(text_to_image, torch.eye(ROWS, dtype=torch.bool))["strict"]
    searcher = ArchiveSearch(out, str(nano_folder))
    for query in (0, 7, 23):
        hits = searcher.search(searcher.text_query(embedded.texts[query]), k=5)
        expected = text_to_image[query].argsort(descending=True)[:5].tolist()
        assert [hit["id"] for hit in hits] == [f"row-{row:09d}" for row in expected]
        assert [hit["score"] for hit in hits] == pytest.approx(text_to_image[query][expected].tolist(), abs=1e-5)
        true_rank = next((hit["rank"] for hit in hits if hit["id"] == f"row-{query:09d}"), None)
        assert true_rank is None or true_rank == ranks[query]
        assert hits[0]["modality"] == phantoms[expected[0]]["modality"]  # metadata columns come along
    reloaded = ArchiveSearch(out, str(nano_folder))
    query = reloaded.text_query(embedded.texts[3])
    assert [hit["id"] for hit in reloaded.search(query, k=5)] == [hit["id"] for hit in searcher.search(query, k=5)]


def test_an_interrupted_run_resumes_to_the_same_index(nano_folder, image_folder, tmp_path, monkeypatch):
    arguments = ["--model", str(nano_folder), "--images", str(image_folder), "--chunk_size", "8", "--batch_size", "4"]
    complete = run_index([*arguments, "--output_dir", str(tmp_path / "complete")])
    flush, calls = index_script.ChunkWriter.flush, []

    def flush_then_crash(writer):
        flush(writer)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(index_script.ChunkWriter, "flush", flush_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_index([*arguments, "--output_dir", str(tmp_path / "resumed")])
    monkeypatch.setattr(index_script.ChunkWriter, "flush", flush)
    progress = json.loads((tmp_path / "resumed" / "progress.json").read_text())
    assert progress["chunks"] == 2 and 0 < progress["rows_read"] < ROWS
    resumed = run_index([*arguments, "--output_dir", str(tmp_path / "resumed")])
    assert {key: resumed[key] for key in ("rows", "rows_read", "skipped")} == {
        key: complete[key] for key in ("rows", "rows_read", "skipped")
    }
    first, second = (ArchiveSearch(tmp_path / name, str(nano_folder)).dataset for name in ("complete", "resumed"))
    assert first["id"] == second["id"]
    np.testing.assert_allclose(np.array(first["embedding"]), np.array(second["embedding"]), atol=1e-6)
    with pytest.raises(ValueError, match="holds an index of another source"):
        run_index([*arguments, "--output_dir", str(tmp_path / "resumed"), "--max_rows", "5"])


def test_search_command_filters_by_expert_and_writes_a_contact_sheet(nano_folder, image_folder, tmp_path, capsys):
    out = tmp_path / "index"
    run_index(["--model", str(nano_folder), "--images", str(image_folder), "--output_dir", str(out)])
    expert = ArchiveSearch(out, str(nano_folder)).dataset["expert"][5]
    sheet = tmp_path / "hits.png"
    capsys.readouterr()
    search_script.main(["--index", str(out), "--text", "Axial CT of the liver.", "--k", "4", "--expert", expert,
                        "--contact_sheet", str(sheet), "--json"])  # fmt: skip
    hits = json.loads(capsys.readouterr().out.split("Contact sheet")[0])
    assert 1 <= len(hits) <= 4 and {hit["expert"] for hit in hits} == {expert}
    from PIL import Image

    with Image.open(sheet) as picture:
        assert picture.width == 5 * 128
    with pytest.raises(SystemExit, match="Unknown expert 'dermoscopy'"):
        search_script.main(["--index", str(out), "--text", "x", "--expert", "dermoscopy"])


def dicom_series_folder(tmp_path):
    """A study of two series of three CT_small.dcm instances each, tagged CT and MR: (folder, the last dataset)."""
    folder = tmp_path / "pacs"
    folder.mkdir()
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    for series in range(2):
        for instance in range(3):
            source.StudyInstanceUID, source.SeriesInstanceUID = "1.2.3", f"1.2.3.{series}"
            source.SOPInstanceUID, source.Modality = f"1.2.3.{series}.{instance}", "CT" if series == 0 else "MR"
            source.save_as(folder / f"s{series}_i{instance}.dcm")
    return folder, source


def test_dicom_studies_and_series_are_indexed_searched_and_grouped(nano_folder, tmp_path, capsys):
    """DICOM tags become index columns; --modality filters on the file's own tag, --group series answers once per
    series with how many of its instances matched."""
    folder, source = dicom_series_folder(tmp_path)
    out = tmp_path / "index"
    run_index(["--model", str(nano_folder), "--images", str(folder), "--output_dir", str(out)])
    searcher = ArchiveSearch(out, str(nano_folder))
    row = searcher.dataset[0]
    assert row["study_uid"] == "1.2.3" and row["modality"] in ("CT", "MR") and row["frame"] == 0
    assert row["patient_id"] == str(source.PatientID)
    query = searcher.text_query("Axial CT of the chest.")
    assert {hit["modality"] for hit in searcher.search(query, k=6, where={"modality": "CT"})} == {"CT"}
    grouped = searcher.search(query, k=5, group="series_uid")
    assert sorted(hit["series_uid"] for hit in grouped) == ["1.2.3.0", "1.2.3.1"]
    assert [hit["matches"] for hit in grouped] == [3, 3]
    capsys.readouterr()
    search_script.main(["--index", str(out), "--text", "chest", "--modality", "MR", "--group", "series", "--json"])
    hits = json.loads(capsys.readouterr().out)
    assert [(hit["series_uid"], hit["matches"]) for hit in hits] == [("1.2.3.1", 3)]
    with pytest.raises(ValueError, match="no column 'accession'"):
        searcher.search(query, k=1, where={"accession": "x"})
    pooled = searcher.search(query, k=5, group="series_uid", pool="mean")
    embeddings, series = np.array(searcher.dataset["embedding"]), np.array(searcher.dataset["series_uid"])
    for hit in pooled:  # the score is the query's cosine with the series' mean embedding
        mean = embeddings[series == hit["series_uid"]].mean(axis=0)
        assert hit["score"] == pytest.approx(float(mean @ query.numpy() / np.linalg.norm(mean)), abs=1e-5)
        assert hit["matches"] == 3 and hit["id"].startswith(f"s{hit['series_uid'][-1]}_")
    assert [hit["score"] for hit in pooled] == sorted((hit["score"] for hit in pooled), reverse=True)
    assert [hit["series_uid"] for hit in searcher.search(query, k=5, group="series_uid", pool="mean",
                                                         where={"modality": "MR"})] == ["1.2.3.1"]  # fmt: skip
    with pytest.raises(SystemExit):
        search_script.parse_args(["--index", str(out), "--text", "chest", "--pool", "mean"])  # pools nothing


def test_a_deidentified_index_holds_pseudonyms_that_group_alike_under_one_key(nano_folder, tmp_path, monkeypatch):
    import pydicom

    folder = tmp_path / "pacs"
    folder.mkdir()
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    source.PatientID, source.StudyDate = "HOSP-0042", "20260301"
    for instance in range(2):
        source.SOPInstanceUID = f"1.2.3.4.{instance}"
        source.save_as(folder / f"Doe^John_{instance}.dcm")
    arguments = ["--model", str(nano_folder), "--images", str(folder), "--deidentify"]
    with pytest.raises(ValueError, match="needs a secret key"):
        run_index([*arguments, "--output_dir", str(tmp_path / "no_key")])
    monkeypatch.setenv("MEDMOE_DEIDENTIFY_KEY", "a secret of the hospital's, 32 bytes")
    info = run_index([*arguments, "--output_dir", str(tmp_path / "first")])
    run_index([*arguments, "--output_dir", str(tmp_path / "second")])
    assert info["holds"]["file_paths"] is False and info["holds"]["thumbnails"] is False
    first, second = (ArchiveSearch(tmp_path / name, str(nano_folder)).dataset for name in ("first", "second"))
    assert first["patient_id"] == second["patient_id"] and len(set(first["patient_id"])) == 1
    assert len(set(first["sop_instance_uid"])) == 2 and first["modality"] == ["CT", "CT"]
    stored = json.dumps(first.remove_columns(["embedding"]).to_list(), default=str)
    for identifier in ("HOSP-0042", "20260301", "Doe^John", "1.2.3.4.0", str(folder)):
        assert identifier not in stored, identifier
    monkeypatch.setenv("MEDMOE_DEIDENTIFY_KEY", "another hospital's secret, 32 bytes")
    other = run_index([*arguments, "--output_dir", str(tmp_path / "other_key")])
    assert other["rows"] == 2
    assert ArchiveSearch(tmp_path / "other_key", str(nano_folder)).dataset["patient_id"] != first["patient_id"]


def test_a_deidentified_run_resumes_only_with_its_own_key(nano_folder, image_folder, tmp_path, monkeypatch):
    """Another key would give one patient two pseudonyms in one index: the resume is refused."""
    arguments = ["--model", str(nano_folder), "--images", str(image_folder), "--batch_size", "4", "--flush_seconds",
                 "0", "--deidentify", "--output_dir", str(tmp_path / "index")]  # fmt: skip
    monkeypatch.setenv("MEDMOE_DEIDENTIFY_KEY", "the first key, 32 bytes of secret")
    killed_after_adds(monkeypatch, lambda: run_index(arguments), adds=2)
    monkeypatch.setenv("MEDMOE_DEIDENTIFY_KEY", "a second key, 32 bytes of secret")
    with pytest.raises(ValueError, match="started with another de-identification key"):
        run_index(arguments)
    with pytest.raises(ValueError, match="started with another de-identification key"):
        run_index([argument for argument in arguments if argument != "--deidentify"])
    monkeypatch.setenv("MEDMOE_DEIDENTIFY_KEY", "the first key, 32 bytes of secret")
    assert run_index(arguments)["rows"] == ROWS + 1


def test_a_killed_run_keeps_its_finished_rows_whatever_the_chunk_size(nano_folder, image_folder, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    """With the default chunk of 1,024 rows a small archive never fills one; chunks are also written after
    --flush_seconds, so a run killed after a few batches keeps them and the rerun goes on from there."""
    arguments = ["--model", str(nano_folder), "--images", str(image_folder), "--batch_size", "4",
                 "--flush_seconds", "0", "--output_dir", str(tmp_path / "index")]  # fmt: skip
    killed_after_adds(monkeypatch, lambda: run_index(arguments), adds=3)
    assert json.loads((tmp_path / "index" / "progress.json").read_text())["rows_read"] == 12
    resumed = run_index(arguments)
    assert resumed["rows_read"] == ROWS + 3 and resumed["rows"] == ROWS + 1


def test_medmoe_classify_writes_images_and_series_and_warns_about_a_synthetic_model(nano_folder, tmp_path, capsys):
    import csv

    from medmoe.training.synthetic import SYNTHETIC_NOTE
    from medmoe_archive import classify

    folder, _ = dicom_series_folder(tmp_path)
    (folder / "broken.png").write_bytes(b"not a png")
    model = tmp_path / "model"
    shutil.copytree(nano_folder, model)
    (model / "README.md").write_text(f"# A model\n\n{SYNTHETIC_NOTE}\n")
    out = tmp_path / "results" / "labels.csv"
    assert classify.main(["--model", str(model), "--images", str(folder), "--labels", "CT, MRI", "--out", str(out),
                          "--batch_size", "4"]) is None  # fmt: skip
    printed = capsys.readouterr()
    assert "trained only on synthetic phantoms" in printed.err and "skipped: undecodable_image 1." in printed.out
    images = list(csv.DictReader(out.open()))
    assert len(images) == 6 and {row["label"] for row in images} <= {"CT", "MRI"}
    for row in images:
        assert float(row["confidence"]) == max(float(row["p_CT"]), float(row["p_MRI"]))
    series = list(csv.DictReader((tmp_path / "results" / "labels_series.csv").open()))
    assert sorted((row["series_uid"], row["images"]) for row in series) == [("1.2.3.0", "3"), ("1.2.3.1", "3")]
    listed = (tmp_path / "results" / "labels_skipped.jsonl").read_text()
    assert "broken.png" in listed
    with pytest.raises(SystemExit, match="at least one candidate label"):
        classify.main(["--model", str(model), "--images", str(folder), "--labels", " , ", "--out", str(out)])


def test_medmoe_classify_csv_cells_cannot_run_as_formulas(nano_folder, images, tmp_path):
    """File names and tags that a spreadsheet would run (=, +, -, @, tab) start with a quote in the CSV files."""
    import csv

    from medmoe_archive import classify

    folder = tmp_path / "archive"
    folder.mkdir()
    for number, name in enumerate(["=HYPERLINK(evil).png", "@SUM(1+1).png", "+cmd.png", "-2+3.png", "\tx.png"]):
        images[number].save(folder / name)
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    source.Modality, source.SeriesInstanceUID = "=1+2", "=cmd|' /C calc'!A0"
    source.save_as(folder / "ct.dcm")
    out = tmp_path / "labels.csv"
    classify.main(["--model", str(nano_folder), "--images", str(folder), "--labels", "CT,=MRI", "--out", str(out)])
    cells = [cell for path in (out, tmp_path / "labels_series.csv") for row in csv.reader(path.open()) for cell in row]
    assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@", "\t", "\r")]
    assert {"'=HYPERLINK(evil).png", "'@SUM(1+1).png", "'=1+2", "'=cmd|' /C calc'!A0", "p_=MRI"} <= set(cells)


def test_every_frame_of_a_multi_frame_dicom_can_be_a_row_and_series_gather_them(nano_folder, tmp_path):
    """rtdose.dcm holds 15 frames: by default its middle frame is embedded; with --all_frames each frame is a row,
    embedded from its own pixels, and --group series answers once for the file's series with all 15 matched."""
    folder = tmp_path / "dose"
    folder.mkdir()
    shutil.copyfile(get_testdata_file("rtdose.dcm", download=False), folder / "dose.dcm")
    middle = run_index(["--model", str(nano_folder), "--images", str(folder), "--output_dir", str(tmp_path / "m")])
    frames = run_index(["--model", str(nano_folder), "--images", str(folder), "--output_dir", str(tmp_path / "f"),
                        "--all_frames"])  # fmt: skip
    assert (middle["rows"], frames["rows"]) == (1, 15)
    searcher = ArchiveSearch(tmp_path / "f", str(nano_folder))
    assert searcher.dataset["frame"] == list(range(15)) and searcher.dataset["id"][3] == "dose.dcm#frame3"
    embeddings = np.array(searcher.dataset["embedding"])
    single = np.array(ArchiveSearch(tmp_path / "m", str(nano_folder)).dataset["embedding"][0])
    np.testing.assert_allclose(embeddings[7], single, atol=1e-6)  # the middle frame is the default row
    assert not np.allclose(embeddings[0], embeddings[7])
    query = searcher.text_query("dose")
    grouped = searcher.search(query, k=3, group="series_uid")
    assert len(grouped) == 1 and grouped[0]["matches"] == 15
    [pooled] = searcher.search(query, k=3, group="series_uid", pool="mean")  # the series as one pooled embedding
    mean = embeddings.mean(axis=0)
    assert pooled["score"] == pytest.approx(float(mean @ query.numpy() / np.linalg.norm(mean)), abs=1e-5)
    assert pooled["matches"] == 15 and pooled["frame"] == int((embeddings @ query.numpy()).argmax())
