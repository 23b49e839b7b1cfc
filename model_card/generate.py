"""Write README.md (the model card) into a saved MedMoE folder.

    python model_card/generate.py --model DIR [--results results.json] [--train_args args.json] [--repo_id ORG/NAME]

The YAML header comes from huggingface_hub's ModelCardData with `model-index` filled from the evaluation results;
the body from model_card/template.md, with the training section taken from the run's own arguments. Running it
twice on the same inputs writes the same file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import AutoModel, AutoProcessor

from medmoe.training.synthetic import SYNTHETIC_NOTE
from modeling_medmoe.zero_shot import DEFAULT_PROMPT_TEMPLATES

TEMPLATE = Path(__file__).with_name("template.md")
HANDLER = Path(__file__).with_name("handler.py")
# Synthetic phantoms shipped as files (no licence or privacy burden, whatever data a model was trained on).
EXAMPLES_DIR = Path(__file__).with_name("examples")
EXAMPLES = {"xray.png": "X-ray", "ct.png": "CT", "fundus.png": "fundus"}  # file -> what it shows
TAGS = ["medical", "mixture-of-experts", "clip", "custom_code", "vision-language", "zero-shot-image-classification"]


def write_examples(model_dir: Path, repo_id: str) -> list[dict]:
    """Copy the example phantoms (model_card/examples) into model_dir/examples and score them with the folder's own
    model.

    Returns widget entries (image, candidate labels, and the scores this model gives them): the Hub's free
    inference does not run custom code, so the card shows real outputs instead.
    """
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    labels = list(model.config.expert_names)
    examples_dir = model_dir / "examples"
    examples_dir.mkdir(exist_ok=True)
    widget = []
    for name, modality in EXAMPLES.items():
        shutil.copyfile(EXAMPLES_DIR / name, examples_dir / name)
        with torch.no_grad():
            image_embeds = model.get_image_features(**processor(images=[str(examples_dir / name)])).pooler_output
            class_embeds = model.get_zero_shot_class_embeddings(processor.tokenizer, labels)
            scores = model.zero_shot_probabilities(image_embeds, class_embeds)[0].tolist()
        hub_file = "/" in repo_id and not Path(repo_id).exists()
        widget.append(
            {
                "src": f"https://huggingface.co/{repo_id}/resolve/main/examples/{name}"
                if hub_file
                else f"examples/{name}",
                "candidate_labels": ", ".join(labels),
                "example_title": f"{modality} phantom",
                "output": [
                    {"label": label, "score": round(score, 4)}
                    for label, score in sorted(zip(labels, scores), key=lambda pair: -pair[1])
                ],
            }
        )
    return widget


def is_hub_id(name: str) -> bool:
    """ORG/NAME that is not a local folder."""
    return name.count("/") == 1 and not name.startswith((".", "/")) and not Path(name).exists()


def read_json(path: str | Path | None) -> dict:
    return json.loads(Path(path).read_text()) if path else {}


def eval_results_for_card(results: dict) -> list[EvalResult]:
    """`results["eval_results"]` entries (EvalResult fields, as training/evaluation_metrics.py writes them) ->
    EvalResult."""
    return [EvalResult(**entry) for entry in results.get("eval_results", [])]


def training_section(train_args: dict) -> str:
    if not train_args:
        return "No training arguments were recorded for this folder."
    steps = train_args.get("steps_trained", train_args.get("max_steps"))
    if "steps_trained" in train_args and train_args.get("stopped_by") == "max_train_minutes":
        steps = (
            f"{steps} (stopped by the {train_args.get('max_train_minutes')}-minute budget, "
            f"{train_args.get('train_minutes')} minutes; the schedule was sized for {train_args.get('max_steps')})"
        )
    shown = [
        ("data", train_args.get("dataset_name")),
        ("preset", train_args.get("preset")),
        ("steps trained", steps),
        ("images seen", train_args.get("images_seen")),
        ("batch size per device", train_args.get("per_device_train_batch_size")),
        ("gradient accumulation", train_args.get("gradient_accumulation_steps")),
        ("processes", train_args.get("num_processes")),
        ("learning rate", train_args.get("learning_rate")),
        ("schedule", f"{train_args.get('lr_scheduler_type')} with {train_args.get('warmup_steps')} warm-up steps"),
        ("mixed precision", train_args.get("mixed_precision")),
        ("router input", train_args.get("router_input")),
        ("experts", train_args.get("num_experts")),
        ("local loss weight", train_args.get("local_loss_weight")),
        (
            "text model",
            train_args.get("text_model") or "trained from scratch with a WordPiece tokenizer learnt on the data",
        ),
        ("vision backbone", backbone_start(train_args)),
        ("seed", train_args.get("seed")),
    ]
    rows = "\n".join(f"| {name} | {value} |" for name, value in shown if value is not None)
    return (
        "Pretrained with `accelerate launch training/pretrain.py` (GLoRIA-style global and local contrastive losses, "
        "report-type supervision of the router). The run's arguments:\n\n| setting | value |\n|---|---|\n" + rows
    )


def evaluation_section(results: dict) -> str:
    """The figures with what they were measured on, as training/evaluation_metrics.py defines them."""
    metrics = results.get("metrics", {})
    if not metrics:
        return "No evaluation results were recorded for this folder."
    dataset = results.get("dataset", {})
    details = results.get("details", {})
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items()))
    section = f"On `{dataset.get('name', '?')}`, split `{dataset.get('split', '?')}`"
    retrieval = details.get("retrieval")
    if retrieval:
        section += (
            f": the retrieval pool is the first {retrieval['pool_size']} rows of the split "
            f"({retrieval['distinct_reports']} distinct reports; chance R@10 = {retrieval['chance_R@10']:.3f}). "
            "Each image's true candidate is its own report; strict R@K breaks ties between identical reports at "
            "random, text-match R@K counts any identical report as a hit"
        )
    else:
        section += f", {results.get('num_samples', '?')} image-report pairs"
    routing = details.get("routing")
    if routing and "routing/purity" in metrics:
        section += f". Routing is scored against the {routing['truth']}"
    section += f".\n\n| metric | value |\n|---|---|\n{rows}"
    usage = results.get("expert_usage")
    if usage:
        section += "\n\nRouting (share of evaluation images per expert): " + ", ".join(
            f"{name} {share:.1%}" for name, share in usage.items()
        )
    return section


def backbone_start(train_args: dict) -> str:
    if train_args.get("vision_backbone_weights"):
        return f"timm weights from the local file {train_args['vision_backbone_weights']}"
    return "timm pretrained weights" if train_args.get("vision_backbone_pretrained") else "from scratch"


def backbone_as_built(vision_config: dict) -> str:
    """The timm architecture with the keyword arguments that change it, and the image size."""
    name = vision_config.get("backbone", "timm")
    changes = ", ".join(f"{key}={value}" for key, value in (vision_config.get("backbone_kwargs") or {}).items())
    size = vision_config.get("image_size")
    return f"`{name}`" + (f" ({changes})" if changes else "") + (f" at {size} px" if size else "")


def build_card(
    model_dir: Path, results: dict, train_args: dict, repo_id: str | None = None, model_name: str | None = None
) -> ModelCard:
    config = read_json(model_dir / "config.json")
    repo_id = repo_id or train_args.get("hub_model_id") or str(model_dir)
    model_name = model_name or repo_id.rstrip("/").split("/")[-1]
    dataset_name = train_args.get("dataset_name", "synthetic")
    widget = write_examples(model_dir, repo_id)
    example_labels = list(config.get("expert_names", []))[:4]
    card_data = ModelCardData(
        language="en",
        license=train_args.get("license", "apache-2.0"),
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        tags=TAGS,
        datasets=[dataset_name] if is_hub_id(dataset_name) and not train_args.get("train_files") else None,
        base_model=train_args.get("text_model"),
        model_name=model_name,
        eval_results=eval_results_for_card(results) or None,
        widget=widget,
    )
    vision_config = config.get("vision_config", {})
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=model_name,
        repo_id=repo_id,
        num_experts=config.get("num_experts"),
        expert_names=", ".join(config.get("expert_names", [])),
        backbone=backbone_as_built(vision_config),
        provenance=SYNTHETIC_NOTE if dataset_name == "synthetic" and not train_args.get("train_files") else "",
        example_image=widget[0]["src"].split("/main/")[-1],
        example_labels=json.dumps(example_labels),
        example_report="Axial CT of the abdomen with a hypodense lesion in the liver.",
        prompt_template=DEFAULT_PROMPT_TEMPLATES[0],
        training_section=training_section(train_args),
        evaluation_section=evaluation_section(results),
        data_limitations=(
            "Trained on synthetic phantoms only: scores on real images are meaningless."
            if dataset_name == "synthetic" and not train_args.get("train_files")
            else f"The training data ({dataset_name}) limits what the model has seen: its sources, modalities, "
            "scanners, populations and report styles. Check it on data from your own site."
        ),
    )


def write_model_card(
    model_dir: Path,
    results: dict | None = None,
    train_args: dict | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
) -> Path:
    """Write `model_dir/README.md`, the widget examples and the Inference Endpoints `handler.py`; returns the
    card's path."""
    shutil.copyfile(HANDLER, Path(model_dir) / "handler.py")
    card = str(build_card(Path(model_dir), results or {}, train_args or {}, repo_id, model_name))
    path = Path(model_dir) / "README.md"
    path.write_text(card if card.endswith("\n") else card + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="saved MedMoE folder (config.json inside)")
    parser.add_argument(
        "--results", help="results.json from training/run_evaluation.py (or eval_results.json of a pretraining run)"
    )
    parser.add_argument("--train_args", help="args.json written by training/pretrain.py")
    parser.add_argument("--repo_id", help="Hub id used in the card's snippets (default: hub_model_id or the folder)")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        sys.exit(f"{args.model} has no config.json; pass a folder saved by MedMoEModel.save_pretrained.")
    path = write_model_card(args.model, read_json(args.results), read_json(args.train_args), args.repo_id)
    print(f"Model card written to {path}")


if __name__ == "__main__":
    main()
