"""How often the report-type labeller is right, measured against a dataset's own modality column.

    python -m benchmarks.report_types --data ../shared/datasets/realmed
    python -m benchmarks.report_types --data outputs/benchmark-realmed-final/data   # + the carved validation split

For each split: coverage (share of reports the labeller gives a type) and precision (share of labelled reports
whose type is the modality column's), the confusions, and the same without the `dermoscopy` rule (no default
expert serves it, so under the default experts a dermoscopy report is unknown either way). Only the text and
modality columns are read. When --data does not hold the parquet splits, it says so and exits 0.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from benchmarks.common import print_json, print_table
from medmoe.training.report_types import detect_modality

SPLITS = ("train", "validation", "eval")  # validation: the split benchmarks/realmed.py carves from train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/datasets/realmed")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--modality_column", default="modality")
    return parser.parse_args(argv)


def score(reports: list[str], truths: list[str], leave_out: str | None = None) -> dict:
    """coverage, precision and the confusions (truth, labelled) of the labeller on these reports."""
    labelled = [(truth, detect_modality(report)) for report, truth in zip(reports, truths)]
    labelled = [(truth, label) for truth, label in labelled if label is not None and label != leave_out]
    wrong = Counter((truth, label) for truth, label in labelled if truth.lower() != label.lower())
    return {
        "coverage": len(labelled) / len(reports),
        "precision": 1 - sum(wrong.values()) / max(len(labelled), 1),
        "confusions": wrong.most_common(),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    files = {split: sorted((args.data / "data").glob(f"{split}-*.parquet")) for split in SPLITS}
    files = {split: paths for split, paths in files.items() if paths or split != "validation"}
    if not all(files.values()):
        print(f"{args.data} holds no data/train-*.parquet and data/eval-*.parquet; nothing to measure.")
        return {}
    import pyarrow.parquet as pq

    results, rows = {}, [("split", "rows", "coverage", "precision", "coverage w/o dermoscopy", "precision w/o")]
    for split, paths in files.items():
        table = [
            row
            for path in paths
            for row in pq.read_table(path, columns=[args.text_column, args.modality_column]).to_pylist()
        ]
        reports = [row[args.text_column] or "" for row in table]
        truths = [str(row[args.modality_column]) for row in table]
        full, narrow = score(reports, truths), score(reports, truths, leave_out="dermoscopy")
        rows.append(
            (
                split,
                len(table),
                f"{full['coverage']:.4f}",
                f"{full['precision']:.4f}",
                f"{narrow['coverage']:.4f}",
                f"{narrow['precision']:.4f}",
            )
        )
        print(f"{split} confusions (truth, labelled): {full['confusions']}")
        results.update(
            {
                f"report_type_{split}_coverage": full["coverage"],
                f"report_type_{split}_precision": full["precision"],
                f"report_type_{split}_coverage_without_dermoscopy": narrow["coverage"],
                f"report_type_{split}_precision_without_dermoscopy": narrow["precision"],
            }
        )
    print_table(f"Report-type labeller against the {args.modality_column!r} column of {args.data.name}", rows)
    print_json(results)
    return results


if __name__ == "__main__":
    main()
