"""The README's quickstart runs as written (offline, in a fresh process, from an empty folder)."""

import os
import re
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


def test_quickstart_runs_as_written(tmp_path):
    code = "\n".join(re.findall(r"```python\n(.*?)```", readme_section("Quickstart"), flags=re.DOTALL))
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "image.png")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "hf")}
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "'label'" in completed.stdout and "'score'" in completed.stdout
