"""Helpers for tests that run the training scripts as subprocesses or check a saved folder from a fresh Python
process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAKE_TOKEN = "hf_FakeTokenForTestsOnly0123456789abcdef"  # must never appear in an output


def run_training_script(script: str, arguments: list[str], launcher=(), check=True, extra_environment=None,
                        timeout=900) -> subprocess.CompletedProcess:  # fmt: skip
    """Run training/`script` offline (directly, or under `launcher` such as accelerate launch); a failure raises
    with the run's output unless check=False."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(extra_environment or {})}
    command = [*launcher, *([sys.executable] if not launcher else []), str(ROOT / "training" / script), *arguments]
    completed = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)
    if check and completed.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}")
    return completed


def kill_once_checkpointed(script: str, arguments: list[str], checkpoint: Path) -> None:
    """Start training/`script` and kill -9 it as soon as the `checkpoint` folder exists (a run cut off mid-way)."""
    import signal
    import time

    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "training" / script), *arguments],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while not checkpoint.is_dir() and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert process.poll() is None, f"{script} ended before writing {checkpoint}"
    process.send_signal(signal.SIGKILL)
    process.wait()


def assert_upload_failed_keeping_the_result_and_hiding_the_token(completed, output_dir: Path, result: str) -> None:
    """An upload attempt without a network: exit status 1, a message that nothing was lost, OUTPUT_DIR/`result` kept,
    and FAKE_TOKEN in no output and no file the run wrote."""
    assert completed.returncode == 1
    assert "Could not upload" in completed.stderr and "nothing was lost" in completed.stderr
    assert (output_dir / result).is_file()
    outputs = completed.stdout + completed.stderr
    outputs += "".join(path.read_text(errors="ignore") for path in output_dir.rglob("*") if path.is_file())
    assert FAKE_TOKEN not in outputs


def logged_losses(output_dir: Path) -> dict[int, float]:
    """{step: loss} of a run's step log (OUTPUT_DIR/train_log.jsonl)."""
    lines = (output_dir / "train_log.jsonl").read_text().splitlines()
    return {entry["step"]: entry["loss"] for entry in map(json.loads, lines)}


LOAD_AND_RUN = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline

folder, inputs_path, result_path = sys.argv[1:4]
inputs = json.load(open(inputs_path))
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
images = [Image.open(path) for path in inputs["images"]]
batch = processor(images=images, text=inputs["texts"], return_tensors="pt", padding=True, truncation=True)
with torch.no_grad():
    out = model(**batch)
classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
scores = classifier(images[0], candidate_labels=inputs["labels"])
json.dump({
    "module": type(model).__module__,
    "logits_per_image": out.logits_per_image.tolist(),
    "expert_index": out.expert_index.tolist(),
    "pipeline": scores,
}, open(result_path, "w"))
"""


def load_in_fresh_process(folder: Path, images: list, texts: list[str], labels: list[str], work: Path) -> dict:
    """Load `folder` with AutoModel/AutoProcessor/pipeline(trust_remote_code=True) in a new offline interpreter,
    run the images and texts through it and return its outputs. The current directory is `work`, so nothing
    from the repository is importable there: the folder's own code must suffice."""
    image_paths = []
    for index, image in enumerate(images):
        path = work / f"image_{index}.png"
        image.save(path)
        image_paths.append(str(path))
    inputs_path, result_path = work / "inputs.json", work / "result.json"
    inputs_path.write_text(json.dumps({"images": image_paths, "texts": texts, "labels": labels}))
    script = work / "load_and_run.py"
    script.write_text(LOAD_AND_RUN)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    environment["HF_HOME"] = str(work / "hf_home")
    completed = subprocess.run(
        [sys.executable, str(script), str(folder), str(inputs_path), str(result_path)],
        cwd=work,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if completed.returncode != 0:
        raise AssertionError(f"fresh process failed:\n{completed.stderr[-4000:]}")
    return json.loads(result_path.read_text())


def endpoint_handler(folder: Path):
    """The `EndpointHandler` of a saved folder's handler.py, imported as Inference Endpoints import it."""
    sys.path.insert(0, str(folder))
    try:
        from handler import EndpointHandler
    finally:
        sys.path.remove(str(folder))
    return EndpointHandler(str(folder))


def killed_after_adds(monkeypatch, run, adds: int) -> None:
    """Run `run()` with medmoe-index's ChunkWriter.add raising KeyboardInterrupt after its `adds`-th call (a run
    killed halfway), and restore it."""
    import pytest

    from medmoe_archive import index

    add, calls = index.ChunkWriter.add, []

    def add_then_crash(writer, *rest):
        add(writer, *rest)
        calls.append(1)
        if len(calls) == adds:
            raise KeyboardInterrupt("killed halfway")

    monkeypatch.setattr(index.ChunkWriter, "add", add_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(index.ChunkWriter, "add", add)
