"""Helpers for tests that check a saved folder from a fresh Python process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
