"""Evaluate a MedMoE model: zero-shot classification, retrieval, linear probe, routing and attention maps.

    python training/evaluate.py --model DIR_OR_HUB_ID --dataset_name synthetic --output_dir OUT
    python training/evaluate.py --model outputs/medmoe-realmed/model --dataset_name ../shared/datasets/realmed \
        --eval_files "../shared/datasets/realmed/data/eval-*.parquet" --output_dir OUT

Writes OUT/results.json (every metric, also as huggingface_hub EvalResult fields for the model card),
OUT/results.md, and pictures (OUT/routing_confusion.png, OUT/attention/*.png); prints a summary table.
Metrics are local `evaluate` modules in training/metrics, loaded by path.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # `python training/evaluate.py` runs this file as a script
    # Put the repo root first instead of training/, where evaluate.py would shadow the `evaluate` package.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from transformers import AutoModel, AutoProcessor  # noqa: E402

from training import data as data_module  # noqa: E402
from training.embedding import EmbeddedSet, embed_pairs, model_inputs  # noqa: E402
from training.metrics import classification_results, load_metric  # noqa: E402

TASKS = ("zero_shot", "retrieval", "linear_probe", "routing", "attention")
DEFAULT_TEMPLATES = (
    "{}.",
    "A {} image.",
    "A medical image: {}.",
    "This is a {}.",
    "{} study.",
)
PROBE_FRACTIONS = (0.01, 0.1, 1.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved MedMoE folder or Hub id")
    parser.add_argument("--output_dir", required=True, type=Path)
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    data_module.add_data_arguments(parser)  # --train_files / the train split feed the linear probe
    parser.add_argument("--label_column", default="modality", help="classes for zero-shot, probe and routing")
    parser.add_argument(
        "--probe_columns", help="comma-separated columns the linear probe classifies (default: the label column)"
    )
    parser.add_argument("--templates", type=Path, help="file with one prompt template per line, {} = class name")
    parser.add_argument("--pool_size", type=int, help="retrieval pool: the first N eval rows (default: all)")
    parser.add_argument("--max_samples", type=int, help="evaluate at most this many eval rows")
    parser.add_argument("--max_train_samples", type=int, default=2000, help="rows the linear probe is fitted on")
    parser.add_argument(
        "--probe_min_class_rows", type=int, default=5, help="the probe leaves out classes with fewer train rows"
    )
    parser.add_argument("--num_visualizations", type=int, default=4, help="samples drawn as attention pictures")
    parser.add_argument("--max_pointing_samples", type=int, default=512, help="rows scored by the pointing game")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    args.probe_columns = [c.strip() for c in (args.probe_columns or args.label_column).split(",") if c.strip()]
    unknown = set(args.tasks) - set(TASKS)
    if unknown:
        parser.error(f"unknown tasks {sorted(unknown)}; choose from {', '.join(TASKS)}")
    return args


class Evaluation:
    """One evaluation run: the model, its processor, the data options and what has been measured so far.

    `model` is a MedMoEModel or anything with its interface: forward(**inputs) giving image_embeds, text_embeds and
    expert_index, and get_text_features(input_ids, attention_mask).pooler_output (benchmarks/open_clip_baseline.py
    wraps an open_clip model this way, to be scored by the same code).
    """

    def __init__(self, args: argparse.Namespace, model, processor, expert_names: list[str]):
        self.args = args
        self.device = torch.device(args.device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.expert_names = list(expert_names)
        self.options = data_module.DataOptions.from_args(args)
        self.metrics: dict[str, float] = {}
        self.details: dict[str, object] = {}
        self.pictures: list[str] = []

    def loader(self, which: str, max_rows: int | None, batch_size: int | None = None):
        stream, image_column, text_column = data_module.open_stream(self.options, which)
        columns = data_module.stream_columns(stream)
        wanted = (self.args.label_column, *self.args.probe_columns, "finding", "finding_box")
        keep = tuple(dict.fromkeys(column for column in wanted if column in columns))
        prepared = data_module.prepare_stream(stream, image_column=image_column, max_rows=max_rows)
        prepare = data_module.RowPreparer(
            self.processor, self.expert_names, image_column, text_column, self.args.report_type_column, keep
        )
        batches = data_module.BatchStream(
            prepared,
            prepare,
            data_module.BatchCollator(self.processor),
            batch_size or self.args.batch_size,
            drop_last=False,
        )
        return data_module.make_dataloader(batches, self.args.num_workers)

    def embed(self, which: str, max_rows: int | None) -> EmbeddedSet:
        return embed_pairs(self.model, self.loader(which, max_rows), self.device, description=f"embedding {which}")

    def class_labels(self, embedded: EmbeddedSet, class_names: list[str] | None = None, column: str | None = None):
        """(class names, class index per row) for `column` (default: the label column); rows without a label, or
        with one outside `class_names`, get -1. Classes named like an expert come first, in expert order (the
        routing table's diagonal)."""
        column = column or self.args.label_column
        values = embedded.metadata.get(column)
        if values is None:
            raise ValueError(f"The rows have no {column!r} column; pass --label_column with one they have.")
        experts = [name.lower() for name in self.expert_names]

        def order(name: str) -> tuple[int, str]:
            return (experts.index(name.lower()) if name.lower() in experts else len(experts), name)

        names = class_names or sorted({str(value) for value in values if value is not None}, key=order)
        index = {name: position for position, name in enumerate(names)}
        return names, np.array([index.get(str(value), -1) for value in values])


def zero_shot(evaluation: Evaluation, embedded: EmbeddedSet, templates: list[str]) -> None:
    """Each class name becomes prompts through every template; the class embedding is the normalised mean."""
    names, labels = evaluation.class_labels(embedded)
    prompts = [template.format(name) for name in names for template in templates]
    encoding = evaluation.processor.tokenize(prompts, return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        text = (
            evaluation.model.get_text_features(
                input_ids=encoding["input_ids"].to(evaluation.device),
                attention_mask=encoding["attention_mask"].to(evaluation.device),
            )
            .pooler_output.float()
            .cpu()
        )
    class_embeds = F.normalize(F.normalize(text, dim=-1).view(len(names), len(templates), -1).mean(dim=1), dim=-1)
    scores = (embedded.image_embeds @ class_embeds.T).softmax(dim=-1).numpy()
    result = classification_results(scores, labels, names)
    evaluation.metrics.update(
        {f"zero_shot/{key}": result[key] for key in ("accuracy", "mean_per_class_accuracy", "auroc")}
    )
    evaluation.details["zero_shot"] = {**result, "classes": names, "templates": templates}


def retrieval_ranks(similarity: torch.Tensor, same_text: torch.Tensor) -> dict[str, np.ndarray]:
    """Ranks of the true candidate (the diagonal) for every query row of `similarity` [queries, candidates].

    strict: expected rank when ties are broken at random (with the tie span, for R@K); text_match: any candidate
    whose report is identical to the query's true report counts (`same_text` [queries, candidates] bool).
    """
    true_scores = similarity.diagonal().unsqueeze(1)
    better = (similarity > true_scores).sum(dim=1).double()
    ties = (similarity == true_scores).sum(dim=1).double()
    best_match = similarity.masked_fill(~same_text, float("-inf")).max(dim=1, keepdim=True).values
    text_match = 1 + (similarity.masked_fill(same_text, float("-inf")) > best_match).sum(dim=1)
    return {"strict": (better + (ties + 1) / 2).numpy(), "tie_span": ties.numpy(), "text_match": text_match.numpy()}


def retrieval(evaluation: Evaluation, embedded: EmbeddedSet) -> None:
    pool = min(evaluation.args.pool_size or len(embedded.texts), len(embedded.texts))
    images, texts = embedded.image_embeds[:pool], embedded.text_embeds[:pool]
    reports = embedded.texts[:pool]
    same_text = torch.tensor([[a == b for b in reports] for a in reports])
    metric = load_metric("retrieval")
    similarity = images @ texts.T
    for direction, scores in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        ranks = retrieval_ranks(scores, same_text)
        strict = metric.compute(predictions=ranks["strict"], tie_spans=ranks["tie_span"])
        matched = metric.compute(predictions=ranks["text_match"])
        evaluation.metrics.update({f"retrieval/{direction}_{key}": value for key, value in strict.items()})
        evaluation.metrics.update({f"retrieval/{direction}_text_match_{key}": value for key, value in matched.items()})
    evaluation.details["retrieval"] = {
        "pool_size": pool,
        "distinct_reports": len(set(reports)),
        "chance_R@1": 1 / pool,
        "ties": "strict ranks break ties at random (expected value); text_match counts identical reports as hits",
    }


def linear_probe(evaluation: Evaluation, embedded: EmbeddedSet) -> None:
    """The paper's Table 2 protocol: frozen image embeddings, logistic regression on 1%, 10%, 100% of train, for
    each probe column. Metrics: linear_probe/accuracy_F for the label column, linear_probe_COLUMN/accuracy_F for
    the others. Classes with fewer than --probe_min_class_rows train rows are left out, with their eval rows
    (counted in the details)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train = evaluation.embed("train", evaluation.args.max_train_samples)
    train_features, eval_features = train.image_embeds.numpy(), embedded.image_embeds.numpy()
    scaler = StandardScaler().fit(train_features)
    generator = np.random.default_rng(evaluation.args.seed)
    for column in evaluation.args.probe_columns:
        names, train_labels = evaluation.class_labels(train, column=column)
        _, eval_labels = evaluation.class_labels(embedded, names, column=column)
        rows_per_class = np.bincount(train_labels[train_labels >= 0], minlength=len(names))
        frequent = np.flatnonzero(rows_per_class >= evaluation.args.probe_min_class_rows)
        keep_train, keep_eval = np.isin(train_labels, frequent), np.isin(eval_labels, frequent)
        prefix = "linear_probe" if column == evaluation.args.label_column else f"linear_probe_{column}"
        if len(frequent) < 2 or not keep_eval.any():
            print(f"linear probe on {column!r}: fewer than 2 classes with enough train rows, or no eval rows; skipped")
            continue
        accuracies = {}
        for fraction in PROBE_FRACTIONS:
            chosen = subsample_per_class(train_labels[keep_train], fraction, generator)
            features = scaler.transform(train_features[keep_train][chosen])
            classifier = LogisticRegression(max_iter=2000).fit(features, train_labels[keep_train][chosen])
            predicted = classifier.predict(scaler.transform(eval_features[keep_eval]))
            result = load_metric("classification").compute(predictions=predicted, references=eval_labels[keep_eval])
            accuracies[f"{fraction:.0%}"] = result["accuracy"]
            evaluation.metrics[f"{prefix}/accuracy_{fraction:.0%}"] = result["accuracy"]
        evaluation.details[prefix] = {
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


def routing(evaluation: Evaluation, embedded: EmbeddedSet, output_dir: Path) -> None:
    """Expert usage, expert-by-class table, purity and NMI against the label column (else the report type)."""
    if evaluation.args.label_column in embedded.metadata:
        names, labels = evaluation.class_labels(embedded)
        truth = evaluation.args.label_column
    else:
        names, labels, truth = evaluation.expert_names, embedded.report_type_labels.numpy(), "report type"
    known = labels >= 0
    result = load_metric("routing").compute(
        predictions=embedded.expert_index.numpy()[known],
        references=labels[known],
        num_experts=len(evaluation.expert_names),
        num_classes=len(names),
    )
    evaluation.metrics["routing/purity"] = result["purity"]
    evaluation.metrics["routing/nmi"] = result["nmi"]
    evaluation.details["routing"] = {**result, "experts": evaluation.expert_names, "classes": names, "truth": truth}
    from training.pictures import plot_routing_confusion

    path = output_dir / "routing_confusion.png"
    plot_routing_confusion(np.array(result["confusion"]), evaluation.expert_names, names, truth, path)
    evaluation.pictures.append(str(path))


def attention(evaluation: Evaluation, output_dir: Path) -> None:
    """Word-region attention and scale attention pictures; on data with finding boxes, the pointing game."""
    from training.pictures import display_image, plot_scale_attention, plot_word_attention, report_words

    args = evaluation.args
    rows = max(args.num_visualizations, args.max_pointing_samples)
    hits, finding_words, drawn = 0, 0, 0
    picture_dir = output_dir / "attention"
    picture_dir.mkdir(parents=True, exist_ok=True)
    for batch in evaluation.loader("eval", rows, batch_size=min(args.batch_size, 32)):
        if "pixel_values" not in batch:
            continue
        with torch.no_grad():
            out = evaluation.model(**model_inputs(batch, evaluation.device))
        words = report_words(evaluation.processor.tokenizer, batch["input_ids"], batch["word_ids"])
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
                image_processor = evaluation.processor.image_processor
                image = display_image(batch["pixel_values"][row], image_processor.image_mean, image_processor.image_std)
                expert = evaluation.expert_names[int(out.expert_index[row])]
                box = boxes[row] if boxes is not None else None
                word_path = picture_dir / f"sample_{drawn}_words.png"
                scale_path = picture_dir / f"sample_{drawn}_scales.png"
                plot_word_attention(image, row_words, word_attention[row], batch["texts"][row], expert, box, word_path)
                plot_scale_attention(image, out.scale_attention[row].float().cpu(), expert, scale_path)
                evaluation.pictures += [str(word_path), str(scale_path)]
                drawn += 1
    if finding_words:
        evaluation.metrics["attention/pointing_game"] = hits / finding_words
        evaluation.details["attention"] = {"finding_words": finding_words, "hits": hits}


def peak_inside_box(attention_map: torch.Tensor, box) -> bool:
    """Is the attention peak's cell centre inside box [x0, y0, x1, y1] (fractions of the image)?"""
    height, width = attention_map.shape
    peak = int(attention_map.argmax())
    y, x = (peak // width + 0.5) / height, (peak % width + 0.5) / width
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def eval_results(metrics: dict[str, float], dataset: dict) -> list[dict]:
    """Every metric in huggingface_hub EvalResult fields."""
    task_types = {
        "zero_shot": "zero-shot-image-classification",
        "retrieval/image_to_text": "image-to-text",
        "retrieval/text_to_image": "text-to-image",
        "linear_probe": "image-classification",
        "routing": "image-classification",
        "attention": "image-classification",
    }
    entries = []
    for name, value in metrics.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        task = next(task for prefix, task in task_types.items() if name.startswith(prefix))
        entries.append(
            {
                "task_type": task,
                "dataset_type": dataset["type"],
                "dataset_name": dataset["name"],
                "dataset_split": dataset["split"],
                "metric_type": name,
                "metric_value": round(float(value), 4),
            }
        )
    return entries


def markdown_table(metrics: dict[str, float]) -> str:
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in metrics.items())
    return "| metric | value |\n|---|---|\n" + rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    return evaluate_model(args, model, processor, model.config.expert_names)


def evaluate_model(args: argparse.Namespace, model, processor, expert_names: list[str]) -> dict:
    """Run args.tasks on `model` (see `Evaluation`), write OUT/results.json, results.md and pictures."""
    args.output_dir.mkdir(parents=True, exist_ok=True)
    evaluation = Evaluation(args, model, processor, expert_names)
    templates = DEFAULT_TEMPLATES
    if args.templates:
        templates = [line.strip() for line in args.templates.read_text().splitlines() if "{}" in line]
        if not templates:
            sys.exit(f"{args.templates} has no template line with {{}}.")
    embedded = evaluation.embed("eval", args.max_samples) if set(args.tasks) - {"attention"} else None
    if "zero_shot" in args.tasks:
        zero_shot(evaluation, embedded, list(templates))
    if "retrieval" in args.tasks:
        retrieval(evaluation, embedded)
    if "linear_probe" in args.tasks:
        linear_probe(evaluation, embedded)
    if "routing" in args.tasks:
        routing(evaluation, embedded, args.output_dir)
    if "attention" in args.tasks:
        attention(evaluation, args.output_dir)

    dataset = {
        "name": args.eval_files or args.dataset_name,
        "type": args.dataset_name,
        "split": args.eval_split or "eval",
    }
    usage = None
    if embedded is not None:
        counts = torch.bincount(embedded.expert_index, minlength=len(evaluation.expert_names)).tolist()
        usage = {name: count / len(embedded.texts) for name, count in zip(evaluation.expert_names, counts)}
    results = {
        "model": args.model,
        "dataset": dataset,
        "label_column": args.label_column,
        "num_samples": len(embedded.texts) if embedded is not None else None,
        "skipped_rows": dict(embedded.skipped) if embedded is not None else {},
        "metrics": evaluation.metrics,
        "expert_usage": usage,
        "details": evaluation.details,
        "pictures": evaluation.pictures,
        "eval_results": eval_results(evaluation.metrics, dataset),
    }
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(evaluation.metrics)
    pictures = [f"![{Path(p).stem}]({Path(p).relative_to(args.output_dir)})" for p in evaluation.pictures]
    heading = f"Model `{args.model}` on `{dataset['name']}` ({results['num_samples']} pairs)."
    (args.output_dir / "results.md").write_text(
        f"# MedMoE evaluation\n\n{heading}\n\n{table}\n\n" + "\n".join(pictures) + "\n"
    )
    print(table)
    print(f"\nResults: {args.output_dir}/results.json and results.md; {len(pictures)} pictures in {args.output_dir}")
    return results


if __name__ == "__main__":
    main()
