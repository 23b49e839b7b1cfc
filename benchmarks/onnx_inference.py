"""CPU inference of the image side: PyTorch eager vs torch.compile vs ONNX Runtime fp32 vs int8, in one run.

    python -m benchmarks.onnx_inference                          # nano, small, swin-tiny at batch 1 and 32
    python -m benchmarks.onnx_inference --quick                  # nano and small, fewer repeats
    python -m benchmarks.onnx_inference --presets small --model outputs/medmoe-realmed \\
        --eval_data ../shared/datasets/realmed                    # + zero-shot accuracy and R@10 per backend

Images/s of `get_image_features` (eager, compiled backbone) and of the folder's ONNX export
(`training/export.py`, fp32 and dynamic int8) on the same random images, median of timed repeats after warm-up,
randomly initialised models built from each preset (speed does not depend on the weights). With --model and
--eval_data, the trained folder is also exported both ways and evaluated on the eval split with each backend
(zero-shot modality accuracy with the default prompts, strict R@10 both ways), so int8's accuracy cost is measured.
The last line is JSON with the ratios to eager.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from benchmarks.common import median_seconds, print_json, print_table
from modeling_medmoe import MedMoEConfig, MedMoEModel
from modeling_medmoe.onnx_export import export_image_side
from modeling_medmoe.onnx_image_encoder import OnnxImageEncoder

BACKENDS = ("eager", "compile", "onnx_fp32", "onnx_int8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="nano,small,swin-tiny", help="comma-separated presets")
    parser.add_argument("--batch_sizes", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--quick", action="store_true", help="nano and small only, 3 repeats")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--model", type=Path, help="a trained folder to evaluate per backend (with --eval_data)")
    parser.add_argument("--eval_data", type=Path, help="a dataset folder with an eval split (realmed)")
    return parser.parse_args(argv)


def timed_backends(preset: str, batch_sizes: list[int], repeats: int, scratch: Path) -> dict:
    """{(backend, batch): images/s} for a random model of `preset`."""
    config = MedMoEConfig.from_preset(preset)
    torch.manual_seed(0)
    model = MedMoEModel(config).eval()
    folder = scratch / preset
    model.save_pretrained(folder)
    side = config.vision_config.image_size
    runners = {"eager": lambda pixels: model.get_image_features(pixel_values=pixels)}
    compiled = MedMoEModel(config).eval()
    compiled.load_state_dict(model.state_dict())
    compiled.compile_towers()
    runners["compile"] = lambda pixels: compiled.get_image_features(pixel_values=pixels)
    for precision in ("fp32", "int8"):
        export_image_side(folder, int8=precision == "int8")
        runners[f"onnx_{precision}"] = OnnxImageEncoder(folder)
    results = {}
    for batch in batch_sizes:
        pixels = torch.randn(batch, 3, side, side)
        for backend, run in runners.items():
            with torch.no_grad():
                seconds = median_seconds(lambda: run(pixels), repeats, warmup=2)
            results[(backend, batch)] = batch / seconds
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    presets = ["nano", "small"] if args.quick else args.presets.split(",")
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    repeats = 3 if args.quick else args.repeats
    rows, summary = (
        [("preset", "batch", *(f"{backend} img/s" for backend in BACKENDS), "fp32 / eager", "int8 / eager")],
        {},
    )
    with tempfile.TemporaryDirectory() as scratch:
        for preset in presets:
            speed = timed_backends(preset, batch_sizes, repeats, Path(scratch))
            for batch in batch_sizes:
                eager = speed[("eager", batch)]
                ratios = [speed[(f"onnx_{precision}", batch)] / eager for precision in ("fp32", "int8")]
                rows.append((preset, batch, *(f"{speed[(backend, batch)]:.1f}" for backend in BACKENDS),
                             *(f"{ratio:.2f}x" for ratio in ratios)))  # fmt: skip
                key = f"{preset.replace('-', '_')}_batch{batch}"
                summary[f"onnx_fp32_vs_eager_{key}"] = ratios[0]
                summary[f"onnx_int8_vs_eager_{key}"] = ratios[1]
                summary[f"compile_vs_eager_{key}"] = speed[("compile", batch)] / eager
        print_table("Image side images/s on this machine (random weights)", rows)
        if args.model and args.eval_data:
            summary.update(evaluate_backends(args.model, args.eval_data, Path(scratch)))
    print_json(summary)
    return summary


def evaluate_backends(model_folder: Path, eval_data: Path, scratch: Path) -> dict:
    """Zero-shot accuracy and strict R@10 on the eval split with PyTorch, ONNX fp32 and ONNX int8."""
    from medmoe.training import run_evaluation

    copy = scratch / "evaluated"
    shutil.copytree(model_folder, copy, ignore=shutil.ignore_patterns("checkpoints", "onnx"))
    rows, figures = [("backend", "zero-shot acc", "i->t R@10", "t->i R@10")], {}
    for backend in ("torch", "onnx_fp32", "onnx_int8"):
        if backend != "torch":
            export_image_side(copy, int8=backend == "onnx_int8")
        results = run_evaluation.main([
            "--model", str(copy), "--dataset_name", str(eval_data), "--eval_split", "eval",
            "--tasks", "zero_shot,retrieval", "--output_dir", str(scratch / f"eval-{backend}"),
            "--backend", "torch" if backend == "torch" else "onnx",
        ])  # fmt: skip
        metrics = results["metrics"]
        figures[backend] = (metrics["zero_shot/accuracy"], metrics["retrieval/image_to_text_R@10"],
                            metrics["retrieval/text_to_image_R@10"])  # fmt: skip
        rows.append((backend, *(f"{100 * value:.1f}" for value in figures[backend])))
    print_table(f"{model_folder} on {eval_data} (eval split), percent", rows)
    torch_figures = figures["torch"]
    return {
        f"{backend}_minus_torch_{name}_points": 100 * (figures[backend][position] - torch_figures[position])
        for backend in ("onnx_fp32", "onnx_int8")
        for position, name in enumerate(("zero_shot_accuracy", "image_to_text_R@10", "text_to_image_R@10"))
    }


if __name__ == "__main__":
    main()
