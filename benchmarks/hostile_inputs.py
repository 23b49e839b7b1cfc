"""Requests above the endpoint's limits, and what refusing them costs: seconds and peak memory per request.

    python -m benchmarks.hostile_inputs --model outputs/medmoe-nano      # a folder the main job wrote

Each probe is a request a hostile or unlucky client could send (a 66-byte PNG declaring 30000x30000 pixels, a
deflated DICOM declaring 10000x10000, 2,000 frames, a deflate bomb, a format-spec template, 10,000 labels, ...). Each
runs in a fresh process holding the model folder's EndpointHandler, so its peak resident memory is its own (the
growth of the process's peak, and the peak of what Python, numpy and zlib allocate during the request). The goal:
no refused request costs more than 1 s or 200 MB. Without --model (or when the folder does not exist) a seeded nano
folder is built in a temporary folder. The probe builders are shared with the robustness and fuzz tests.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np

SECONDS_BOUND, MEGABYTES_BOUND = 1.0, 200.0


def declared_png(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header declares width x height (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def dicom_bytes(rows: int = 16, frames: int = 1, deflated: bool = False, private_bytes: int = 0) -> bytes:
    """A small CT DICOM whose header declares `rows` x `rows` pixels and `frames` frames (the pixel data holds one
    small frame: only the header is meant to be read), optionally deflated and padded with a private element of
    `private_bytes` zeros (a deflate bomb)."""
    import pydicom
    from pydicom.data import get_testdata_file

    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    dataset.Rows = dataset.Columns = rows
    dataset.PixelData = np.zeros((min(rows, 16), min(rows, 16)), np.int16).tobytes()
    if frames > 1:
        dataset.NumberOfFrames = frames
    if private_bytes:
        dataset.add_new(0x00111010, "OB", bytes(private_bytes))
    syntax = pydicom.uid.DeflatedExplicitVRLittleEndian if deflated else pydicom.uid.ExplicitVRLittleEndian
    dataset.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def png_bytes(side: int = 24, seed: int = 0) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(side, side), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# Templates that passed the old `"{}" in template` check: fields, format specs, stray braces.
HOSTILE_TEMPLATES = ["{} {x}", "{} {", "{{}}{0:>100000000}", "{0}", "{}{}", "}{}", "{} {0!r}", "{}" + "x" * 400]


def probe_requests() -> dict[str, dict]:
    """Handler requests, each above one limit."""
    encoded = {
        "bomb_png_30000": declared_png(30000, 30000),
        "png_8000": declared_png(8000, 8000),
        "deflated_dicom_10000": dicom_bytes(rows=10000, deflated=True),
        "dicom_2000_frames": dicom_bytes(rows=512, frames=2000, deflated=True),
        "deflate_bomb_64MB": dicom_bytes(rows=16, deflated=True, private_bytes=64 * 2**20),
    }
    labels = {"candidate_labels": ["CT", "MRI"]}
    requests = {
        name: {"inputs": base64.b64encode(data).decode(), "parameters": labels} for name, data in encoded.items()
    }
    image = base64.b64encode(png_bytes()).decode()
    requests["template_format_spec"] = {
        "inputs": image,
        "parameters": {**labels, "hypothesis_template": "{{}}{0:>100000000}"},
    }
    requests["labels_10000"] = {"inputs": image, "parameters": {"candidate_labels": [f"l{i}" for i in range(10_000)]}}
    requests["images_65"] = {"inputs": [image] * 65, "parameters": {"mode": "image-embedding"}}
    requests["payload_65MiB"] = {"inputs": "A" * (88 * 2**20), "parameters": labels}
    return requests


def run_probe(model: Path, name: str) -> dict:
    """In this process: the handler, then one request; seconds and peak resident memory growth."""
    sys.path.insert(0, str(model))
    from handler import EndpointHandler

    handler = EndpointHandler(str(model))
    handler({"inputs": base64.b64encode(png_bytes()).decode(), "parameters": {"candidate_labels": ["CT"]}})  # warm
    request = probe_requests()[name]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tracemalloc.start()
    start = time.perf_counter()
    answer = handler(request)
    seconds = time.perf_counter() - start
    traced_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return {
        "seconds": seconds,
        "peak_growth_mb": grown,
        "allocated_peak_mb": traced_peak,
        "answer": str(answer.get("error", answer))[:90],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a MedMoE model folder (default: a seeded nano one)")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: run one probe in this process
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.common import print_json, print_table, seeded_model_folder

    args = parse_args(argv)
    if args.probe:
        print(json.dumps(run_probe(args.model, args.probe)))
        return {}
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model if args.model and args.model.is_dir() else seeded_model_folder(Path(scratch) / "nano")
        if not (model / "handler.py").is_file():
            from medmoe.model_card.generate import HANDLER

            model = Path(shutil.copytree(model, Path(scratch) / "with_handler"))
            shutil.copyfile(HANDLER, model / "handler.py")
        rows, results = [("probe", "seconds", "RSS peak growth MB", "allocated peak MB", "answer")], {}
        for name in probe_requests():
            completed = subprocess.run(
                [sys.executable, "-m", "benchmarks.hostile_inputs", "--model", str(model), "--probe", name],
                cwd=Path(__file__).resolve().parents[1],
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(completed.stdout.strip().splitlines()[-1])
            results[name] = result
            megabytes = (f"{result['peak_growth_mb']:.0f}", f"{result['allocated_peak_mb']:.1f}")
            rows.append((name, f"{result['seconds']:.3f}", *megabytes, result["answer"][:60]))
    print_table("Requests above the limits (each in a fresh process)", rows)
    summary = {
        "max_seconds_over_bound": max(result["seconds"] for result in results.values()) / SECONDS_BOUND,
        "max_memory_over_bound": max(
            max(result["peak_growth_mb"], result["allocated_peak_mb"]) for result in results.values()
        )
        / MEGABYTES_BOUND,
        "all_refused": all(
            str(result["answer"]).startswith(("The ", "This ", "A ", "Cannot")) for result in results.values()
        ),
    }
    print_json(summary)
    return summary


if __name__ == "__main__":
    main()
