"""Indexing compressed DICOM: what decoding workers and several processes buy (medmoe-index end to end).

    python -m benchmarks.archive_decoding              # 2,000 files (JPEG 2000 and JPEG-LS, 512 x 512), ~10 min
    python -m benchmarks.archive_decoding --quick      # 400 files, ~2 min

The archive: CT slices of 512 x 512 made from pydicom's CT_small.dcm (upsampled, with noise so that each of 20 source
slices compresses like a real one), half JPEG 2000 lossless and half JPEG-LS lossless (pydicom's encoders; JPEG-LS
needs `pyjpegls`), each file with its own SOP instance UID, 20 files a series. A seeded nano model indexes it with
`medmoe-index`: with 0, 1 and 2 decoding workers in one process, and with 2 processes (torchrun, 0 workers each)
against 1. Figures: rows/s of the embedding (start-up and index build left out: `embed_seconds_this_run`), and the
ratios the goals name. Run with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import print_json, print_table, seeded_model_folder

SOURCE_SLICES = 20
FILES_PER_SERIES = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="400 files instead of 2,000")
    parser.add_argument("--files", type=int, help="files in the archive (default 2,000; --quick 400)")
    return parser.parse_args(argv)


def compressed_archive(folder: Path, files: int) -> dict:
    """`files` compressed 512 x 512 CT files in `folder`; returns how many of each transfer syntax."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, generate_uid

    generator = np.random.default_rng(0)
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    slices = np.kron(source.pixel_array, np.ones((4, 4), dtype=source.pixel_array.dtype))
    syntaxes = {JPEG2000Lossless: 0, JPEGLSLossless: 0}
    encoded = {}
    for syntax in syntaxes:
        for number in range(SOURCE_SLICES):
            dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
            dataset.Rows, dataset.Columns = slices.shape
            noisy = slices + generator.integers(-30, 30, slices.shape).astype(slices.dtype)
            dataset.compress(syntax, noisy)
            encoded[syntax, number] = dataset
    folder.mkdir(parents=True)
    for number in range(files):
        syntax = (JPEG2000Lossless, JPEGLSLossless)[number % 2]
        dataset = encoded[syntax, number // 2 % SOURCE_SLICES]
        dataset.SOPInstanceUID = generate_uid()
        dataset.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.1.{number // FILES_PER_SERIES}"
        dataset.save_as(folder / f"{number:06d}.dcm", enforce_file_format=True)
        syntaxes[syntax] += 1
    return {syntax.name: count for syntax, count in syntaxes.items()}


def index_rows_per_second(model: Path, archive: Path, output_dir: Path, workers: int, processes: int = 1) -> float:
    """Rows/s of medmoe-index's embedding of `archive` (index_info.json's embed_seconds_this_run)."""
    arguments = ["--model", str(model), "--images", str(archive), "--output_dir", str(output_dir),
                 "--num_workers", str(workers), "--thumbnail_size", "0", "--device", "cpu"]  # fmt: skip
    launcher = [sys.executable, "-m", "medmoe_archive.index"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--module", "medmoe_archive.index"]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if processes > 1:
        environment["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    subprocess.run([*launcher, *arguments], check=True, env=environment, capture_output=True)
    info = json.loads((output_dir / "index_info.json").read_text())
    return info["rows"] / info["embed_seconds_this_run"]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    files = args.files or (400 if args.quick else 2_000)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        model = seeded_model_folder(work / "nano")
        syntaxes = compressed_archive(work / "archive", files)
        speeds = {
            f"{workers} workers": index_rows_per_second(model, work / "archive", work / f"w{workers}", workers)
            for workers in (0, 1, 2)
        }
        speeds["2 processes"] = index_rows_per_second(model, work / "archive", work / "p2", 0, processes=2)
    rows = [("configuration", "rows/s", "vs 0 workers")]
    rows += [(name, f"{speed:.1f}", f"{speed / speeds['0 workers']:.2f}x") for name, speed in speeds.items()]
    archive = ", ".join(f"{count} {name}" for name, count in syntaxes.items())
    print_table(f"medmoe-index, nano, {files} compressed 512 x 512 CT files ({archive}), {os.cpu_count()} cores",
                rows)  # fmt: skip
    results = {
        "files": files,
        **{f"rows_per_s_{name.replace(' ', '_')}": speed for name, speed in speeds.items()},
        "two_workers_vs_none": speeds["2 workers"] / speeds["0 workers"],
        "two_processes_vs_one": speeds["2 processes"] / speeds["0 workers"],
    }
    print_json(results)
    return results


if __name__ == "__main__":
    main()
