"""Indexing a real PACS: instances/s from a folder and from Orthanc over DICOMweb, and a run killed halfway.

    python -m benchmarks.pacs_indexing                 # 1,000 instances (needs orthanc and orthanc-dicomweb)
    python -m benchmarks.pacs_indexing --instances 200

Starts Orthanc with its DICOMweb plugin on a free localhost port with a temporary storage folder, loads it through
its REST API with INSTANCES copies of pydicom's CT_small.dcm (5 studies, 2 series each, CT and MR, new UIDs), and
with a seeded nano model folder: (1) indexes the same files from a folder, (2) indexes Orthanc over QIDO-RS and
WADO-RS, (3) indexes Orthanc again in a child process killed (SIGKILL) once half the instances are written, then
reruns it, and checks that the resumed index equals the uninterrupted one (ids and embeddings). Prints the timings
and JSON with instances/s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ORTHANC_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
STUDIES, SERIES_PER_STUDY = 5, 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_orthanc(
    folder: Path, timeout: float = 60.0, users: dict[str, str] | None = None
) -> tuple[str, subprocess.Popen]:
    """Orthanc with its DICOMweb plugin on a free localhost port, storing in `folder`, open or for `users`
    ({name: password}, HTTP basic authentication): (its HTTP root, the process). Raises FileNotFoundError when
    Orthanc or the plugin is not installed."""
    if shutil.which("Orthanc") is None or not Path(ORTHANC_PLUGIN).is_file():
        raise FileNotFoundError("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc "
                                "orthanc-dicomweb)")  # fmt: skip
    port = free_port()
    config = {
        "Name": "medmoe", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "HttpPort": port, "DicomPort": 0, "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(users),
        "RegisteredUsers": users or {}, "Plugins": [ORTHANC_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    log = (folder / "orthanc.log").open("w")
    server = subprocess.Popen(["Orthanc", str(folder / "config.json")], stdout=log, stderr=subprocess.STDOUT)
    root, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(orthanc_request(f"{root}/system", users), timeout=2)
            return root, server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"Orthanc did not start: {(folder / 'orthanc.log').read_text()[-2000:]}") from None
            time.sleep(0.2)


def write_instances(folder: Path, count: int, studies: int = STUDIES) -> list[Path]:
    """`count` copies of CT_small.dcm as `studies` studies of a CT and an MR series, with their own UIDs."""
    import pydicom
    from pydicom.data import get_testdata_file

    source = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(count):
        study, series = number % studies, (number // studies) % SERIES_PER_STUDY
        source.PatientID, source.StudyDate = f"P{study}", f"202503{study + 1:02d}"
        source.StudyInstanceUID, source.SeriesInstanceUID = f"1.2.9.{study}", f"1.2.9.{study}.{series}"
        source.SOPInstanceUID, source.Modality = f"1.2.9.{study}.{series}.{number}", ("CT", "MR")[series]
        paths.append(folder / f"{number:05d}.dcm")
        source.save_as(paths[-1])
    return paths


def orthanc_request(url: str, users: dict[str, str] | None, data: bytes | None = None) -> urllib.request.Request:
    """A request to Orthanc's REST API, as the first of `users` when it has users."""
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if users:
        import base64

        name, password = next(iter(users.items()))
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode())
    return request


def upload(root: str, paths: list[Path], users: dict[str, str] | None = None) -> None:
    for path in paths:
        urllib.request.urlopen(orthanc_request(f"{root}/instances", users, path.read_bytes()), timeout=30)


def index_command(model: Path, source: list[str], output_dir: Path) -> list[str]:
    return [sys.executable, "-m", "medmoe_archive.index", "--model", str(model), *source, "--output_dir",
            str(output_dir), "--flush_seconds", "2"]  # fmt: skip


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def killed_halfway(command: list[str], progress: Path, half: int) -> int:
    """Run `command`, SIGKILL it once its progress file counts `half` rows; the rows it had kept."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["rows_read"] >= half:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    return json.loads(progress.read_text())["rows_read"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--model", type=Path, help="a model folder (default: a seeded nano one, built offline)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    import numpy as np

    from benchmarks.common import print_json, seeded_model_folder
    from medmoe_archive.search import ArchiveSearch

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        model = args.model or seeded_model_folder(work / "nano")
        paths = write_instances(work / "files", args.instances)
        root, server = start_orthanc(work)
        try:
            upload(root, paths)
            folder_seconds = timed(index_command(model, ["--images", str(work / "files")], work / "folder_index"))
            pacs = ["--dicomweb", f"{root}/dicom-web", "--allow_insecure_http"]
            pacs_seconds = timed(index_command(model, pacs, work / "pacs_index"))
            resumed = work / "resumed_index"
            kept = killed_halfway(index_command(model, pacs, resumed), resumed / "progress.json", args.instances // 2)
            subprocess.run(index_command(model, pacs, resumed), check=True, capture_output=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
        complete, again = (ArchiveSearch(work / name, str(model)).dataset for name in ("pacs_index", "resumed_index"))
        same = complete["id"] == again["id"] and np.allclose(complete["embedding"], again["embedding"], atol=1e-6)
    print(f"{args.instances} instances: folder {folder_seconds:.1f} s, Orthanc over DICOMweb {pacs_seconds:.1f} s "
          f"(command start and model load included); killed after {kept} rows kept, resumed index "
          f"{'equals' if same else 'DIFFERS FROM'} the uninterrupted one.")  # fmt: skip
    summary = {
        "folder_instances_per_s": args.instances / folder_seconds,
        "dicomweb_instances_per_s": args.instances / pacs_seconds,
        "killed_run_rows_kept": kept,
        "resumed_index_equals_uninterrupted": bool(same),
    }
    print_json(summary)
    return summary


if __name__ == "__main__":
    main()
