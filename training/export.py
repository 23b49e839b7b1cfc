"""Export a MedMoE folder's image side to ONNX, keeping the sparse routing, for fast CPU inference.

    python -m medmoe.training.export --model outputs/medmoe-nano
    python -m medmoe.training.export --model outputs/medmoe-small --int8

Writes FOLDER/onnx/ (modeling_medmoe/onnx_export.py says how, modeling_medmoe/onnx_image_encoder.py what it holds):
the vision pyramid and the router as one graph, each expert with the image projection as its own, fp32 or, with
--int8, with their matrix products quantised to int8. The export is checked against PyTorch (the same expert for every
check image, the embeddings' cosine similarity); the check goes into onnx/export_info.json and is printed.
`medmoe-index`, the endpoint handler, the evaluation and the zero-shot pipeline then use ONNX Runtime when the folder
holds the export and onnxruntime is installed; the text side stays in PyTorch (prompts are embedded once).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modeling_medmoe.onnx_export import ExportRefused, export_image_side
from modeling_medmoe.onnx_image_encoder import ONNX_DIR


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="a saved MedMoE model folder")
    parser.add_argument("--int8", action="store_true", help="quantise the matrix products to int8 (dynamic)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        sys.exit('Export needs onnx and onnxruntime: pip install -e ".[onnx]".')
    try:
        info = export_image_side(args.model, args.int8)
    except ExportRefused as refused:
        sys.exit(f"error: {refused}")
    check = info["check"]
    print(
        f"Exported the image side ({info['precision']}) to {args.model / ONNX_DIR}: same expert for "
        f"{check['same_expert']:.0%} of {check['images']} check images, cosine to PyTorch min "
        f"{check['min_cosine']:.5f} / mean {check['mean_cosine']:.5f}."
    )
    return info


if __name__ == "__main__":
    main()
