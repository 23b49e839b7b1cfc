"""Patient data never leaks under --deidentify: identifiers planted in DICOM tags, folder and file names, parquet and
dataset columns and a PACS (Orthanc behind a password) are indexed, searched (on the command line and through the
search page) and classified with --deidentify in a fresh process with its own Hugging Face home; every file under the
outputs and that home, read raw and (parquet, arrow) decoded, and everything the process printed hold none of them.
The same grep finds them in an index built without --deidentify, so it is not blind. Files are 0600 and folders
0700."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("faiss")
from pydicom.data import get_testdata_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PATIENT_FOLDER = "SMITH_JOHN_MRN555"
PACS_PASSWORD = "pacs-pw-Xq81zz"
KEY_TEXT = "the hospital's de-identification key, kept secret"
PLANTED_UID = "1.2.826.0.1.3680043.555"
PLANTED = ("DOE^JANE", "DOE JANE", "DOE_JANE", "MRN123456", "SMITH_JOHN", "MRN555", PLANTED_UID, "19500101",
           "1950-01-01", PACS_PASSWORD, KEY_TEXT)  # fmt: skip


def planted_dicom(uid_suffix: str, study_uid: str | None = None) -> pydicom.Dataset:
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    dataset.PatientName, dataset.PatientID, dataset.PatientBirthDate = "DOE^JANE", "MRN123456", "19500101"
    dataset.SeriesDescription, dataset.StudyDate = "follow-up DOE JANE", "19500101"
    dataset.StudyInstanceUID = study_uid or PLANTED_UID
    dataset.SeriesInstanceUID = f"{PLANTED_UID}.1"
    dataset.SOPInstanceUID = f"{PLANTED_UID}.1.{uid_suffix}"
    return dataset


def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 48), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A DICOM folder, a parquet file and a dataset folder, each carrying the planted identifiers."""
    import datasets

    root = tmp_path_factory.mktemp("planted")
    patient = root / "archive" / PATIENT_FOLDER
    patient.mkdir(parents=True)
    for number in range(2):
        planted_dicom(str(number)).save_as(patient / f"DOE_JANE_ct_{number}.dcm")
    planted_dicom("9", study_uid="MRN123456.DOE^JANE").save_as(patient / "DOE_JANE_bad_uid.dcm")  # pydicom warns
    (patient / "DOE_JANE_broken.png").write_bytes(b"not a png")
    rows = {
        "image": [{"bytes": png_bytes(seed), "path": f"{PATIENT_FOLDER}/DOE_JANE_{seed}.png"} for seed in range(3)],
        "text": ["Report for DOE^JANE (MRN123456), born 1950-01-01: chest radiograph, no acute findings."] * 3,
        "patient_name": ["DOE^JANE"] * 3,
        "mrn": ["MRN123456"] * 3,
        "modality": ["X-ray"] * 3,
    }
    text_columns = ("text", "patient_name", "mrn", "modality")
    features = datasets.Features({"image": datasets.Image(), **dict.fromkeys(text_columns, datasets.Value("string"))})
    table = datasets.Dataset.from_dict(rows, features=features)
    (root / "tables").mkdir()
    table.to_parquet(str(root / "tables" / f"{PATIENT_FOLDER}.parquet"))
    table.save_to_disk(str(root / "datasets" / PATIENT_FOLDER))
    return root


@pytest.fixture(scope="module")
def orthanc_with_a_password(tmp_path_factory, planted):
    """A real PACS behind a password, holding the planted DICOM files."""
    from benchmarks.pacs_indexing import start_orthanc, upload

    folder = tmp_path_factory.mktemp("orthanc")
    users = {"pacsuser": PACS_PASSWORD}
    try:
        root, server = start_orthanc(folder, users=users)
    except FileNotFoundError as missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing}: .ci/run installs both")
        pytest.skip(str(missing))
    upload(root, sorted((planted / "archive" / PATIENT_FOLDER).glob("*.dcm")), users)
    yield f"{root}/dicom-web"
    server.terminate()
    server.wait(timeout=30)


def run_commands(plan: list, work: Path) -> subprocess.CompletedProcess:
    """The commands in a fresh process whose Hugging Face home (datasets cache included) is work/hf_home."""
    plan_path = work / "plan.json"
    plan_path.write_text(json.dumps(plan))
    environment = {**os.environ, "HF_HOME": str(work / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    environment.pop("MEDMOE_DEIDENTIFY_KEY", None)
    return subprocess.run([sys.executable, "-m", "tests.archive_runs", str(plan_path)], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=900)  # fmt: skip


def readable_texts(path: Path) -> list[str]:
    """A file's bytes as text, and for parquet and arrow files their decoded values (compressed strings too)."""
    texts = [path.read_bytes().decode("latin-1")]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        texts.append(json.dumps(pq.read_table(path).to_pylist(), default=str))
    elif path.suffix == ".arrow":
        import pyarrow as pa

        with pa.memory_map(str(path)) as source:
            texts.append(json.dumps(pa.ipc.open_stream(source).read_all().to_pylist(), default=str))
    return texts


def leaks(texts: list[str]) -> set[str]:
    lowered = [text.lower() for text in texts]
    return {identifier for identifier in PLANTED if any(identifier.lower() in text for text in lowered)}


def files_under(*folders: Path) -> list[Path]:
    return [path for folder in folders if folder.exists() for path in folder.rglob("*") if path.is_file()]


def test_planted_identifiers_reach_no_output_cache_or_log_under_deidentify(
    nano_folder, planted, orthanc_with_a_password, tmp_path
):
    key_file, credentials = tmp_path / "key", tmp_path / "pacs.json"
    key_file.write_text(KEY_TEXT)
    credentials.write_text(json.dumps({"username": "pacsuser", "password": PACS_PASSWORD}))
    for secret in (key_file, credentials):
        os.chmod(secret, 0o600)
    out = tmp_path / "out"
    model, pacs = str(nano_folder), orthanc_with_a_password
    deidentify = ["--deidentify", "--deidentify_key_file", str(key_file)]
    from_pacs = ["--dicomweb", pacs, "--allow_insecure_http", "--pacs_credentials_file", str(credentials)]
    archive, tables = planted / "archive", planted / "tables" / "*.parquet"
    plan = [
        ["index", ["--model", model, "--images", str(archive), "--output_dir", str(out / "folder"), *deidentify]],
        ["index", ["--model", model, "--files", str(tables), "--output_dir", str(out / "parquet"), *deidentify]],
        ["index", ["--model", model, "--dataset_name", str(planted / "datasets" / PATIENT_FOLDER),
                   "--output_dir", str(out / "dataset"), *deidentify, "--keep_columns", "modality"]],
        ["index", ["--model", model, *from_pacs, "--output_dir", str(out / "pacs"), *deidentify, "--json"]],
        ["search", ["--index", str(out / "folder"), "--text", "axial CT", "--json",
                    "--contact_sheet", str(out / "search" / "hits.png")]],
        ["search", ["--index", str(out / "folder"), "--image", str(archive / PATIENT_FOLDER / "DOE_JANE_ct_0.dcm")]],
        ["search", ["--index", str(out / "pacs"), "--text", "CT", "--group", "series", "--json"]],
        ["page", [str(out / "folder"), model, str(out / "page"), "axial CT",
                  str(archive / PATIENT_FOLDER / "DOE_JANE_ct_0.dcm")]],
        ["classify", ["--model", model, "--images", str(archive), "--labels", "CT,MRI",
                      "--out", str(out / "classify" / "labels.csv"), *deidentify]],
        ["classify", ["--model", model, *from_pacs, "--labels", "CT,MRI",
                      "--out", str(out / "classify_pacs" / "labels.csv"), *deidentify]],
    ]  # fmt: skip
    completed = run_commands(plan, tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    written = files_under(out, tmp_path / "hf_home")
    assert len([path for path in written if path.suffix in (".parquet", ".arrow", ".csv", ".json")]) >= 20
    for path in written:
        assert not leaks(readable_texts(path)), (path, leaks(readable_texts(path)))
    assert not leaks([completed.stdout, completed.stderr]), leaks([completed.stdout, completed.stderr])
    for index in ("folder", "parquet", "dataset", "pacs"):
        info = json.loads((out / index / "index_info.json").read_text())
        assert info["holds"]["deidentified"] and not info["holds"]["file_paths"] and not info["holds"]["thumbnails"]
        assert "series_description" not in info["holds"]["columns"]
        assert not {"text", "patient_name", "mrn", "path", "thumbnail"} & set(info["holds"]["columns"])
    assert info["rows"] == 3 and json.loads((out / "dataset" / "index_info.json").read_text())["holds"]["columns"][
        "modality"] == "kept"  # fmt: skip
    for path in [out, *out.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


def test_the_same_grep_finds_the_identifiers_without_deidentify(nano_folder, planted, tmp_path):
    """The control: an index built inside the trust boundary holds what the archive holds."""
    out = tmp_path / "out"
    plan = [["index", ["--model", str(nano_folder), "--images", str(planted / "archive"), "--output_dir", str(out)]]]
    completed = run_commands(plan, tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    found = set().union(*(leaks(readable_texts(path)) for path in files_under(out)))
    assert {"DOE JANE", "MRN123456", "SMITH_JOHN", "MRN555", PLANTED_UID, "19500101"} <= found
    assert "Invalid value for VR UI" in completed.stderr  # pydicom's warning, silenced under --deidentify
    shutil.rmtree(out)
