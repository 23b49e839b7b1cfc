"""Security: what the trust_remote_code files import and do at import, no unpickling, no writes outside the output."""

import ast
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
REMOTE_CODE = sorted((ROOT / "modeling_medmoe").glob("*.py"))
ALLOWED_ROOTS = {"torch", "transformers", "timm"}
OUR_CODE = [
    path
    for folder in ("modeling_medmoe", "training", "model_card", "benchmarks")
    for path in (ROOT / folder).rglob("*.py")
]


def import_time_modules(path: Path) -> set[str]:
    """Top-level module names imported when `path` is imported (imports inside functions run only when called)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        for statement in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
            if isinstance(statement, ast.Import):
                found.update(alias.name.split(".")[0] for alias in statement.names)
            elif isinstance(statement, ast.ImportFrom) and statement.level == 0:
                found.add(statement.module.split(".")[0])
        if isinstance(node, ast.ClassDef):  # class bodies run at import too
            for statement in node.body:
                if isinstance(statement, (ast.Import, ast.ImportFrom)):
                    raise AssertionError(f"{path.name}: import in the body of class {node.name}")
    return found


def test_remote_code_imports_only_torch_transformers_timm_and_the_standard_library():
    assert len(REMOTE_CODE) >= 8
    for path in REMOTE_CODE:
        outside = import_time_modules(path) - ALLOWED_ROOTS - set(sys.stdlib_module_names) - {"__future__"}
        assert not outside, f"{path.name} imports {sorted(outside)} at import time"


AUDIT_IMPORT = r"""
import sys
import timm, torch, transformers
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel  # their own lazy imports
from transformers import image_processing_utils, modeling_layers, modeling_outputs, processing_utils
events = []
def audit(event, args):
    if event == "open":
        path, mode = str(args[0]), str(args[1])
        # the import system (sources, bytecode, extensions, zip probes) and transformers' package version lookups
        if not path.endswith((".py", ".pyc", ".so", ".zip")) and "__pycache__" not in path and ".dist-info" not in path:
            events.append(f"open {path} {mode}")
    elif event.startswith(("socket.", "urllib.", "subprocess.", "http.")) or event in ("os.system", "os.exec"):
        events.append(event)
sys.addaudithook(audit)
import modeling_medmoe
from modeling_medmoe import dicom, image_processing_medmoe, processing_medmoe
print("EVENTS", events)
"""


def test_importing_the_remote_code_reads_writes_and_connects_nothing():
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", AUDIT_IMPORT], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    events = completed.stdout.split("EVENTS", 1)[1].strip()
    assert events == "[]", events


def test_nothing_in_the_project_unpickles():
    for path in OUR_CODE:
        source = path.read_text()
        assert "import pickle" not in source and "weights_only=False" not in source, path
        for call in (node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)):
            if ast.unparse(call.func) in ("torch.load", "load"):
                keywords = {keyword.arg: ast.unparse(keyword.value) for keyword in call.keywords}
                assert keywords.get("weights_only") == "True", f"{path}: {ast.unparse(call)}"


def png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (48, 48), value).save(buffer, format="PNG")
    return buffer.getvalue()


def test_paths_from_the_dataset_never_decide_where_files_are_written(tmp_path):
    """Rows whose image paths, reports and labels are path-traversal strings: the run writes only in its output."""
    data = tmp_path / "hostile"
    data.mkdir()
    escapes = ["../../escaped.png", "/tmp/medmoe_escaped.png", "..\\..\\escaped.png", "../outside/x.png"]
    rows = [
        {
            "image": {"bytes": png_bytes(40 * index % 255), "path": escapes[index % len(escapes)]},
            "text": f"Chest X-ray {index}: ../../../etc/passwd",
            "modality": "../../modality",
        }
        for index in range(24)
    ]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image_type), ("text", pa.string()), ("modality", pa.string())])
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, data / "train.parquet")
    pq.write_table(table, data / "eval.parquet")
    (tmp_path / "runs").mkdir()
    output_dir = tmp_path / "runs" / "out"
    before = {path for path in tmp_path.rglob("*")}
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    arguments = [
        "--train_files", str(data / "train.parquet"), "--eval_files", str(data / "eval.parquet"),
        "--report_type_column", "modality", "--max_steps", "2", "--checkpointing_steps", "1",
        "--per_device_train_batch_size", "8", "--max_eval_samples", "16", "--tokenizer_vocab_size", "200",
        "--report_to", "none", "--num_workers", "0", "--output_dir", str(output_dir),
    ]  # fmt: skip
    completed = subprocess.run(
        [sys.executable, str(ROOT / "training" / "pretrain.py"), *arguments],
        cwd=tmp_path / "runs",
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    created = {path for path in tmp_path.rglob("*")} - before
    outside = [path for path in created if output_dir not in path.parents and path != output_dir]
    assert not outside, outside
    assert not Path("/tmp/medmoe_escaped.png").exists()
    assert json.loads((output_dir / "run_summary.json").read_text())["steps"] == 2
