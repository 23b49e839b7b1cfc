"""The README's quickstart, and the DICOM guide's examples that continue it, run as written (offline, in a fresh
process, in a folder holding only what the main job leaves: outputs/medmoe-nano)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_quickstart_and_the_dicom_guide_run_as_written(nano_folder, tmp_path):
    shutil.copytree(nano_folder, tmp_path / "outputs" / "medmoe-nano")  # a nano folder, as the main job saves one
    dicom_guide = (ROOT / "docs" / "dicom-and-archives.md").read_text()
    code = "\n".join(python_blocks(readme_section("Quickstart")) + python_blocks(dicom_guide))
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "image.png")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "HF_HOME": str(tmp_path / "hf")}
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "'label'" in completed.stdout and "'score'" in completed.stdout
    assert "torch.Size([1, " in completed.stdout  # the DICOM guide's embedding
