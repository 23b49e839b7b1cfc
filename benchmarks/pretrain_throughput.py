"""End-to-end pretraining throughput of the nano preset on this machine: training/pretrain.py itself, with and
without the local loss and gradient checkpointing, and with --torch_compile.

    python -m benchmarks.pretrain_throughput [--quick]

Each variant runs in its own process; images/s is the median of the logged windows after the first, peak memory
is that process's peak RSS (the compiled variant's first window, which compiles, is left out like every first
window). Last line: JSON with pretrain_images_per_s (the default configuration) and torch_compile_speedup (compiled
images/s over the default's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import print_json, print_table

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "default (global + local loss)": [],
    "global loss only": ["--local_loss_weight", "0"],
    "gradient checkpointing": ["--gradient_checkpointing"],
    "global only + checkpointing": ["--local_loss_weight", "0", "--gradient_checkpointing"],
    "torch.compile (--torch_compile)": ["--torch_compile"],
}
RUN_AND_REPORT_RSS = (
    "import resource, runpy, sys\n"
    "sys.argv = sys.argv[1:]\n"
    "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "finally:\n    print('peak_rss_mb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
)


def run_variant(flags: list[str], steps: int, output_dir: Path) -> tuple[float, float]:
    command = [
        sys.executable,
        "-c",
        RUN_AND_REPORT_RSS,
        str(ROOT / "training" / "pretrain.py"),
        "--max_steps",
        str(steps),
        "--eval_steps",
        "0",
        "--max_eval_samples",
        "32",
        "--report_to",
        "none",
        "--logging_steps",
        "5",
        "--output_dir",
        str(output_dir),
        *flags,
    ]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    peak = float(completed.stdout.split("peak_rss_mb")[-1].split()[0])
    logs = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    return statistics.median(entry["images_per_s"] for entry in logs[1:]), peak


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40 steps per variant (about five minutes here)")
    args = parser.parse_args(argv)
    steps = 40 if args.quick else 150
    rows = [("variant", "images/s", "peak RSS (MB)")]
    measured = {}
    with tempfile.TemporaryDirectory() as folder:
        for index, (name, flags) in enumerate(VARIANTS.items()):
            measured[name] = run_variant(flags, steps, Path(folder) / str(index))
            rows.append((name, f"{measured[name][0]:.1f}", f"{measured[name][1]:.0f}"))
    print_table(f"Pretraining nano on synthetic, batch 32, {steps} steps per variant", rows)
    default = measured["default (global + local loss)"]
    results = {
        "pretrain_images_per_s": default[0],
        "pretrain_images_per_s_global_only": measured["global loss only"][0],
        "pretrain_checkpointing_time_ratio": default[0] / measured["gradient checkpointing"][0],
        "pretrain_checkpointing_memory_ratio": measured["gradient checkpointing"][1] / default[1],
        "torch_compile_speedup": measured["torch.compile (--torch_compile)"][0] / default[0],
    }
    print_json(results)
    return results


if __name__ == "__main__":
    main()
