"""A real PACS: Orthanc with its DICOMweb plugin (Debian's orthanc and orthanc-dicomweb), started on a localhost port
with a temporary storage folder and loaded through its REST API. medmoe-index walks it over QIDO-RS and WADO-RS,
resumes after a kill to the same index, filters studies, and its hits' UIDs open in the PACS."""

import os
import urllib.request

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("faiss")
from pydicom.data import get_testdata_file  # noqa: E402

from benchmarks.pacs_indexing import start_orthanc  # noqa: E402
from medmoe_archive import index as index_script  # noqa: E402
from medmoe_archive.dicomweb import DicomWebClient, PacsSettings  # noqa: E402
from medmoe_archive.search import ArchiveSearch  # noqa: E402

from .helpers import killed_after_adds  # noqa: E402

STUDY_DATES = ("20250301", "20250402")
INSTANCES_PER_SERIES = 6


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """The DICOMweb root of a running Orthanc holding 2 studies x (a CT and an MR series) x 6 instances."""
    folder = tmp_path_factory.mktemp("orthanc")
    try:
        root, server = start_orthanc(folder)
    except FileNotFoundError as missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing}: .ci/run installs both")
        pytest.skip(str(missing))
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    for study, date in enumerate(STUDY_DATES):
        for series, modality in enumerate(("CT", "MR")):
            for instance in range(INSTANCES_PER_SERIES):
                source.PatientID, source.StudyDate, source.Modality = f"P{study}", date, modality
                source.StudyInstanceUID, source.SeriesInstanceUID = f"1.2.9.{study}", f"1.2.9.{study}.{series}"
                source.SOPInstanceUID = f"1.2.9.{study}.{series}.{instance}"
                path = folder / "upload.dcm"
                source.save_as(path)
                request = urllib.request.Request(f"{root}/instances", data=path.read_bytes(), method="POST")
                urllib.request.urlopen(request, timeout=10)
    yield f"{root}/dicom-web"
    server.terminate()
    server.wait(timeout=30)


def run_index(arguments):
    return index_script.index_archive(index_script.parse_args(arguments))


def test_a_pacs_is_indexed_over_dicomweb_and_a_killed_run_resumes_to_the_same_index(
    orthanc, nano_folder, tmp_path, monkeypatch
):
    arguments = ["--model", str(nano_folder), "--dicomweb", orthanc, "--allow_insecure_http", "--batch_size", "4",
                 "--flush_seconds", "0"]  # fmt: skip
    complete = run_index([*arguments, "--output_dir", str(tmp_path / "complete")])
    assert complete["rows"] == len(STUDY_DATES) * 2 * INSTANCES_PER_SERIES and complete["skipped"] == {}
    killed_after_adds(monkeypatch, lambda: run_index([*arguments, "--output_dir", str(tmp_path / "resumed")]), adds=3)
    resumed = run_index([*arguments, "--output_dir", str(tmp_path / "resumed")])
    assert resumed["rows"] == complete["rows"]
    first, second = (ArchiveSearch(tmp_path / name, str(nano_folder)).dataset for name in ("complete", "resumed"))
    assert first["id"] == second["id"] and first["sop_instance_uid"] == first["id"]
    np.testing.assert_allclose(np.array(first["embedding"]), np.array(second["embedding"]), atol=1e-6)
    assert set(first["study_date"]) == set(STUDY_DATES) and set(first["modality"]) == {"CT", "MR"}


def test_hits_grouped_by_series_open_in_the_pacs_and_qido_filters_studies(orthanc, nano_folder, tmp_path):
    out = tmp_path / "index"
    pacs = ["--dicomweb", orthanc, "--allow_insecure_http"]
    run_index(["--model", str(nano_folder), *pacs, "--output_dir", str(out)])
    searcher = ArchiveSearch(out, str(nano_folder))
    hits = searcher.search(searcher.text_query("Axial CT of the chest."), k=10, where={"modality": "CT"},
                           group="series_uid")  # fmt: skip
    assert sorted(hit["series_uid"] for hit in hits) == ["1.2.9.0.0", "1.2.9.1.0"]
    assert all(hit["matches"] == INSTANCES_PER_SERIES for hit in hits)
    client = DicomWebClient(PacsSettings(orthanc, allow_insecure_http=True))
    for hit in hits:  # what a viewer link needs: the PACS finds the series by the stored UIDs
        found = client.search(f"/studies/{hit['study_uid']}/series", {"SeriesInstanceUID": hit["series_uid"]}, "test")
        assert len(found) == 1
    dated = run_index(["--model", str(nano_folder), *pacs, "--qido", f"StudyDate={STUDY_DATES[1]}",
                       "--output_dir", str(tmp_path / "dated")])  # fmt: skip
    assert dated["rows"] == 2 * INSTANCES_PER_SERIES
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        index_script.main(["--model", str(nano_folder), *pacs, "--qido", "StudyDate",
                           "--output_dir", str(tmp_path / "bad")])  # fmt: skip
    with pytest.raises(SystemExit, match="Refusing plain http"):
        index_script.main(["--model", str(nano_folder), "--dicomweb", orthanc, "--output_dir", str(tmp_path / "bad")])
