#!/usr/bin/env bash
# One-call GPU check: one JSON file with swin-tiny bf16 training speed (sparse and dense experts), peak GPU memory,
# local-loss speed and memory, a short FSDP2 run, accelerate's FSDP path and the archive's image side on the GPU.
#   bash benchmarks/gpu_check.sh [--output outputs/gpu_check.json]   # on a GPU machine, after the README install
#   bash benchmarks/gpu_check.sh --device cpu                        # dry run at tiny sizes (tests/test_benchmarks.py)
# Finishes in under 10 minutes on one GPU (a hard stop at 10); what each part measures: benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python
exec timeout 600 "$python" -m benchmarks.gpu_check "$@"
