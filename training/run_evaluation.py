"""Evaluate a MedMoE model: zero-shot classification, retrieval, linear probe, routing and attention maps.

    python training/run_evaluation.py --model DIR_OR_HUB_ID --dataset_name synthetic --output_dir OUT
    python training/run_evaluation.py --model outputs/medmoe-realmed --dataset_name ../shared/datasets/realmed \
        --eval_files "../shared/datasets/realmed/data/eval-*.parquet" --output_dir OUT

Writes OUT/results.json (every metric, also as huggingface_hub EvalResult fields for the model card),
OUT/results.md, and pictures (OUT/routing_confusion.png, OUT/attention/*.png); prints a summary table.
The figures are defined in training/evaluation_metrics.py (the same code scores pretraining's held-out check), the
zero-shot prompts and scoring in modeling_medmoe/zero_shot.py; metrics are local `evaluate` modules in
training/metrics, loaded by path.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers import AutoModel, AutoProcessor

from medmoe.training import data as data_module
from medmoe.training import evaluation_metrics
from medmoe.training.arguments import parse
from medmoe.training.data import DataArguments, help_field
from medmoe.training.evaluation_embeddings import EmbeddedSet, embed_pairs, model_inputs
from medmoe.training.logs import LOG_FILE, setup_logging
from medmoe.training.metrics import load_metric
from modeling_medmoe.image_encoder import ImageEncoder
from modeling_medmoe.zero_shot import DEFAULT_PROMPT_TEMPLATES, zero_shot_class_embeddings

logger = logging.getLogger(__name__)

TASKS = ("zero_shot", "retrieval", "linear_probe", "routing", "attention")
PROBE_FRACTIONS = (0.01, 0.1, 1.0)


@dataclass
class EvaluationArguments:
    """What the evaluation scores and how (its data flags are DataArguments', shared with the training scripts)."""

    model: str = field(metadata={"help": "a saved MedMoE folder or Hub id"})
    output_dir: Path = field(metadata={"help": "where results.json, results.md and the pictures go"})
    tasks: str = help_field(",".join(TASKS), f"comma-separated subset of {','.join(TASKS)}")
    label_column: str = help_field("modality", "classes for zero-shot, probe and routing")
    probe_columns: str | None = help_field(
        None, "comma-separated columns the linear probe classifies (default: the label column)"
    )
    templates: Path | None = help_field(None, "file with one prompt template per line, {} = class name")
    class_phrases: Path | None = help_field(
        None, 'JSON file naming each class in the prompts, e.g. {"CT": "CT scan"} (default: the class value itself)'
    )
    max_train_samples: int = help_field(2000, "rows the linear probe is fitted on")
    probe_min_class_rows: int = help_field(5, "the probe leaves out classes with fewer train rows")
    num_visualizations: int = help_field(4, "samples drawn as attention pictures")
    max_pointing_samples: int = help_field(512, "rows scored by the pointing game")
    torch_compile: bool = help_field(False, "torch.compile the backbone and the text tower")
    backend: Literal["torch", "onnx"] = help_field(
        "torch", "image side: PyTorch, or the folder's ONNX export (training/export.py; not with the attention task)"
    )
    seed: int = help_field(0, "seed of the probe's subsampling")
    device: str = help_field("cuda" if torch.cuda.is_available() else "cpu", "where the model runs")

    def __post_init__(self):
        self.tasks = [task.strip() for task in self.tasks.split(",") if task.strip()]
        unknown = set(self.tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {', '.join(TASKS)}")
        if self.backend == "onnx" and "attention" in self.tasks:
            raise ValueError("--backend onnx gives image embeddings only; leave out the attention task (--tasks)")
        self.probe_columns = [c.strip() for c in (self.probe_columns or self.label_column).split(",") if c.strip()]


# The evaluation scores every eval row unless told otherwise, at the length the model was trained with.
EVALUATION_DEFAULTS = {"max_eval_samples": None, "max_length": None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """EvaluationArguments and DataArguments (--train_files / the train split feed the linear probe) as one
    namespace."""
    return parse((EvaluationArguments, DataArguments), argv, __doc__, EVALUATION_DEFAULTS)


UNSET_TOKENIZER_LENGTH = 100_000  # transformers' stand-in for "no limit" is far above any real one


def training_length(tokenizer, fallback: int = 128) -> int:
    """The report length a model was trained with: pretrain.py saves its tokenizer with model_max_length set to
    --max_length; a tokenizer without a real limit gives `fallback`."""
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if length and length < UNSET_TOKENIZER_LENGTH else fallback


class EvaluationRun:
    """One evaluation run: the model, its processor, the data options and what has been measured so far.

    `model` is a MedMoEModel or anything with its interface: forward(pixel_values=...) giving image_embeds and
    expert_index, forward(input_ids=..., attention_mask=...) giving text_embeds,
    get_text_features(input_ids, attention_mask).pooler_output and clamped_logit_scale()
    (benchmarks/open_clip_baseline.py wraps an open_clip model this way, to be scored by the same code).
    """

    def __init__(self, args: argparse.Namespace, model, processor, expert_names: list[str], image_encoder=None):
        self.args = args
        self.image_encoder = image_encoder
        self.device = torch.device(args.device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.expert_names = list(expert_names)
        self.options = DataArguments.from_args(args)
        self.metrics: dict[str, float] = {}
        self.details: dict[str, object] = {}
        self.pictures: list[str] = []
        self.max_length = args.max_length or training_length(processor.tokenizer)

    def loader(self, which: str, max_rows: int | None, batch_size: int | None = None):
        stream, image_column, text_column = data_module.open_stream(self.options, which)
        return data_module.build_loader(
            stream,
            self.processor,
            image_column=image_column,
            text_column=text_column,
            batch_size=batch_size or self.args.per_device_eval_batch_size,
            training=False,
            expert_names=self.expert_names,
            report_type_column=self.args.report_type_column,
            metadata_columns=(self.args.label_column, *self.args.probe_columns, "finding", "finding_box"),
            num_workers=self.args.num_workers,
            max_rows=max_rows,
            max_length=self.max_length,
        )

    def embed(self, which: str, max_rows: int | None) -> EmbeddedSet:
        return embed_pairs(self.model, self.loader(which, max_rows), self.device, description=f"embedding {which}",
                           image_encoder=self.image_encoder)  # fmt: skip

    def class_labels(self, embedded: EmbeddedSet, class_names: list[str] | None = None, column: str | None = None):
        """`evaluation_metrics.class_labels` of `column` (default: the label column)."""
        column = column or self.args.label_column
        values = embedded.metadata.get(column)
        if values is None:
            raise ValueError(f"The rows have no {column!r} column; pass --label_column with one they have.")
        return evaluation_metrics.class_labels(values, self.expert_names, class_names)


def zero_shot(evaluation_run: EvaluationRun, embedded: EmbeddedSet, templates: list[str]) -> None:
    """Classes of the label column, scored by the model package's zero-shot code."""
    names, labels = evaluation_run.class_labels(embedded)
    model = evaluation_run.model
    phrases = json.loads(evaluation_run.args.class_phrases.read_text()) if evaluation_run.args.class_phrases else {}
    prompted = [phrases.get(name, name) for name in names]
    class_embeds = zero_shot_class_embeddings(model, evaluation_run.processor.tokenizer, prompted, templates).cpu()
    logit_scale = float(model.clamped_logit_scale().detach())
    metrics, details = evaluation_metrics.zero_shot_metrics(
        embedded.image_embeds, class_embeds, logit_scale, labels, names
    )
    evaluation_run.metrics.update(metrics)
    evaluation_run.details["zero_shot"] = {**details, "templates": templates, "class_phrases": prompted}


def retrieval(evaluation_run: EvaluationRun, embedded: EmbeddedSet) -> None:
    metrics, details = evaluation_metrics.retrieval_metrics(embedded)
    evaluation_run.metrics.update(metrics)
    evaluation_run.details["retrieval"] = details


def linear_probe(evaluation_run: EvaluationRun, embedded: EmbeddedSet) -> None:
    """The paper's Table 2 protocol: frozen image embeddings, logistic regression on 1%, 10%, 100% of train, for
    each probe column. Metrics: linear_probe/accuracy_F for the label column, linear_probe_COLUMN/accuracy_F for
    the others. Classes with fewer than --probe_min_class_rows train rows are left out, with their eval rows
    (counted in the details)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train = evaluation_run.embed("train", evaluation_run.args.max_train_samples)
    train_features, eval_features = train.image_embeds.numpy(), embedded.image_embeds.numpy()
    scaler = StandardScaler().fit(train_features)
    generator = np.random.default_rng(evaluation_run.args.seed)
    for column in evaluation_run.args.probe_columns:
        names, train_labels = evaluation_run.class_labels(train, column=column)
        _, eval_labels = evaluation_run.class_labels(embedded, names, column=column)
        rows_per_class = np.bincount(train_labels[train_labels >= 0], minlength=len(names))
        frequent = np.flatnonzero(rows_per_class >= evaluation_run.args.probe_min_class_rows)
        keep_train, keep_eval = np.isin(train_labels, frequent), np.isin(eval_labels, frequent)
        prefix = "linear_probe" if column == evaluation_run.args.label_column else f"linear_probe_{column}"
        if len(frequent) < 2 or not keep_eval.any():
            logger.info(f"linear probe on {column!r}: fewer than 2 classes with enough train rows, or no eval rows")
            continue
        accuracies = {}
        for fraction in PROBE_FRACTIONS:
            chosen = subsample_per_class(train_labels[keep_train], fraction, generator)
            features = scaler.transform(train_features[keep_train][chosen])
            classifier = LogisticRegression(max_iter=2000).fit(features, train_labels[keep_train][chosen])
            predicted = classifier.predict(scaler.transform(eval_features[keep_eval]))
            result = load_metric("classification").compute(predictions=predicted, references=eval_labels[keep_eval])
            accuracies[f"{fraction:.0%}"] = result["accuracy"]
            evaluation_run.metrics[f"{prefix}/accuracy_{fraction:.0%}"] = result["accuracy"]
        evaluation_run.details[prefix] = {
            "column": column,
            "train_rows": int(keep_train.sum()),
            "eval_rows": int(keep_eval.sum()),
            "eval_rows_left_out": int((~keep_eval).sum()),
            "classes": len(frequent),
            "accuracy": accuracies,
        }


def subsample_per_class(labels: np.ndarray, fraction: float, generator: np.random.Generator) -> np.ndarray:
    """Indices of a stratified `fraction` of the rows, at least one per class."""
    chosen = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        count = max(1, round(fraction * len(rows)))
        chosen.extend(generator.choice(rows, size=count, replace=False))
    return np.sort(np.array(chosen))


def routing(evaluation_run: EvaluationRun, embedded: EmbeddedSet, output_dir: Path) -> None:
    """Expert-by-class table, purity and NMI against the label column (else the report type), and its picture."""
    metrics, details = evaluation_metrics.routing_metrics(
        embedded, evaluation_run.expert_names, evaluation_run.args.label_column
    )
    evaluation_run.metrics.update(metrics)
    evaluation_run.details["routing"] = details
    if not metrics:
        logger.info(f"routing: no row has a known {details['truth']}; skipped")
        return
    from medmoe.training.evaluation_plots import plot_routing_confusion

    path = output_dir / "routing_confusion.png"
    plot_routing_confusion(
        np.array(details["confusion"]), details["experts"], details["classes"], details["truth"], path
    )
    evaluation_run.pictures.append(str(path))


def attention(evaluation_run: EvaluationRun, output_dir: Path) -> None:
    """Word-region attention and scale attention pictures; on data with finding boxes, the pointing game."""
    from medmoe.training.evaluation_plots import display_image, plot_scale_attention, plot_word_attention, report_words

    args = evaluation_run.args
    rows = max(args.num_visualizations, args.max_pointing_samples)
    hits, finding_words, drawn = 0, 0, 0
    picture_dir = output_dir / "attention"
    picture_dir.mkdir(parents=True, exist_ok=True)
    for batch in evaluation_run.loader("eval", rows, batch_size=min(args.per_device_eval_batch_size, 32)):
        if "pixel_values" not in batch:
            continue
        with torch.no_grad():
            out = evaluation_run.model(**model_inputs(batch, evaluation_run.device))
        words = report_words(evaluation_run.processor.tokenizer, batch["input_ids"], batch["word_ids"])
        word_attention = out.word_region_attention.float().cpu()
        boxes = batch["metadata"].get("finding_box")
        for row, row_words in enumerate(words):
            if boxes is not None:
                targets = set(str(batch["metadata"]["finding"][row]).lower().split())
                for position, word in enumerate(row_words):
                    if word in targets:
                        finding_words += 1
                        hits += peak_inside_box(word_attention[row, position], boxes[row])
            if drawn < args.num_visualizations:
                image_processor = evaluation_run.processor.image_processor
                image = display_image(batch["pixel_values"][row], image_processor.image_mean, image_processor.image_std)
                expert = evaluation_run.expert_names[int(out.expert_index[row])]
                box = boxes[row] if boxes is not None else None
                word_path = picture_dir / f"sample_{drawn}_words.png"
                scale_path = picture_dir / f"sample_{drawn}_scales.png"
                plot_word_attention(image, row_words, word_attention[row], batch["texts"][row], expert, box, word_path)
                plot_scale_attention(image, out.scale_attention[row].float().cpu(), expert, scale_path)
                evaluation_run.pictures += [str(word_path), str(scale_path)]
                drawn += 1
    if finding_words:
        evaluation_run.metrics["attention/pointing_game"] = hits / finding_words
        evaluation_run.details["attention"] = {"finding_words": finding_words, "hits": hits}


def peak_inside_box(attention_map: torch.Tensor, box) -> bool:
    """Is the attention peak's cell centre inside box [x0, y0, x1, y1] (fractions of the image)?"""
    height, width = attention_map.shape
    peak = int(attention_map.argmax())
    y, x = (peak // width + 0.5) / height, (peak % width + 0.5) / width
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def markdown_table(metrics: dict[str, float]) -> str:
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in metrics.items())
    return "| metric | value |\n|---|---|\n" + rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    setup_logging("info", main_process=True, log_file=args.output_dir / LOG_FILE)
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    if args.torch_compile:
        model.compile_towers()
    image_encoder = ImageEncoder.for_model(model, args.model, "onnx") if args.backend == "onnx" else None
    return evaluate_model(args, model, processor, model.config.expert_names, image_encoder)


def evaluate_model(args: argparse.Namespace, model, processor, expert_names: list[str], image_encoder=None) -> dict:
    """Run args.tasks on `model` (see `EvaluationRun`; its images through `image_encoder` when given), write
    OUT/results.json, results.md and pictures."""
    args.output_dir.mkdir(parents=True, exist_ok=True)
    evaluation_run = EvaluationRun(args, model, processor, expert_names, image_encoder)
    templates = list(DEFAULT_PROMPT_TEMPLATES)
    if args.templates:
        templates = [line.strip() for line in args.templates.read_text().splitlines() if "{}" in line]
        if not templates:
            sys.exit(f"{args.templates} has no template line with {{}}.")
    embedded = evaluation_run.embed("eval", args.max_eval_samples) if set(args.tasks) - {"attention"} else None
    if "zero_shot" in args.tasks:
        zero_shot(evaluation_run, embedded, templates)
    if "retrieval" in args.tasks:
        retrieval(evaluation_run, embedded)
    if "linear_probe" in args.tasks:
        linear_probe(evaluation_run, embedded)
    if "routing" in args.tasks:
        routing(evaluation_run, embedded, args.output_dir)
    if "attention" in args.tasks:
        attention(evaluation_run, args.output_dir)

    dataset = evaluation_metrics.dataset_description(
        args.dataset_name, args.eval_files, args.eval_split, args.dataset_card_name
    )
    metrics, details = evaluation_run.metrics, evaluation_run.details
    if embedded is not None:
        results = evaluation_metrics.results_document(embedded, evaluation_run.expert_names, metrics, details, dataset)
    else:
        results = {"dataset": dataset, "num_samples": None, "metrics": metrics, "details": details}
        results["eval_results"] = evaluation_metrics.eval_results(metrics, dataset)
    results = {"model": args.model, "label_column": args.label_column, **results, "pictures": evaluation_run.pictures}
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(metrics)
    pictures = [f"![{Path(p).stem}]({Path(p).relative_to(args.output_dir)})" for p in evaluation_run.pictures]
    heading = f"Model `{args.model}` on `{dataset['name']}` ({results['num_samples']} pairs)."
    (args.output_dir / "results.md").write_text(
        f"# MedMoE evaluation\n\n{heading}\n\n{table}\n\n" + "\n".join(pictures) + "\n"
    )
    print(table)
    print(f"\nResults: {args.output_dir}/results.json and results.md; {len(pictures)} pictures in {args.output_dir}")
    return results


if __name__ == "__main__":
    main()
