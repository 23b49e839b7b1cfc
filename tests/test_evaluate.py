"""training/evaluate.py on a nano folder and the synthetic stream: every task, results files and pictures."""

import json

import pytest
from huggingface_hub import EvalResult
from PIL import Image

from training import evaluate as evaluate_script

TINY = [
    "--max_samples",
    "24",
    "--max_train_samples",
    "36",
    "--max_pointing_samples",
    "16",
    "--num_visualizations",
    "2",
    "--batch_size",
    "8",
    "--num_workers",
    "0",
]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, nano_config, processor):
    from modeling_medmoe import MedMoEModel

    folder = tmp_path_factory.mktemp("model")
    MedMoEModel(nano_config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def results(model_folder, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("evaluation")
    evaluate_script.main(["--model", str(model_folder), "--output_dir", str(output_dir), *TINY])
    return output_dir, json.loads((output_dir / "results.json").read_text())


def test_every_task_reports_its_metrics(results):
    _, result = results
    metrics = result["metrics"]
    for name in (
        "zero_shot/accuracy",
        "zero_shot/mean_per_class_accuracy",
        "zero_shot/auroc",
        "retrieval/image_to_text_R@1",
        "retrieval/image_to_text_R@10",
        "retrieval/text_to_image_median_rank",
        "retrieval/image_to_text_text_match_R@5",
        "linear_probe/accuracy_1%",
        "linear_probe/accuracy_10%",
        "linear_probe/accuracy_100%",
        "routing/purity",
        "routing/nmi",
        "attention/pointing_game",
    ):
        assert name in metrics and 0 <= metrics[name] <= max(1, metrics[name]), name
    assert result["num_samples"] == 24
    assert set(result["details"]["zero_shot"]["per_class_accuracy"]) <= set(result["details"]["zero_shot"]["classes"])
    assert len(result["details"]["routing"]["confusion"]) == 6
    assert abs(sum(result["expert_usage"].values()) - 1) < 1e-6


def test_results_carry_eval_result_fields_for_the_card(results):
    _, result = results
    entries = [EvalResult(**entry) for entry in result["eval_results"]]
    assert len(entries) == len(result["metrics"])
    assert {entry.task_type for entry in entries} >= {
        "zero-shot-image-classification",
        "image-to-text",
        "text-to-image",
    }
    assert all(entry.dataset_name == "synthetic" and entry.dataset_split == "eval" for entry in entries)


def test_pictures_and_markdown_are_written(results):
    output_dir, result = results
    assert (output_dir / "results.md").read_text().count("![") == len(result["pictures"]) == 5
    for path in result["pictures"]:
        with Image.open(path) as picture:
            assert picture.width > 200 and picture.height > 150


def test_templates_file_and_a_missing_label_column(model_folder, tmp_path):
    templates = tmp_path / "templates.txt"
    templates.write_text("An image of {}.\nno placeholder here\n")
    output_dir = tmp_path / "out"
    result = evaluate_script.main(
        [
            "--model",
            str(model_folder),
            "--output_dir",
            str(output_dir),
            "--tasks",
            "zero_shot,routing",
            "--templates",
            str(templates),
            *TINY,
        ]
    )
    assert result["details"]["zero_shot"]["templates"] == ["An image of {}."]
    with pytest.raises(ValueError, match="no 'diagnosis' column"):
        evaluate_script.main(
            [
                "--model",
                str(model_folder),
                "--output_dir",
                str(output_dir),
                "--tasks",
                "zero_shot",
                "--label_column",
                "diagnosis",
                *TINY,
            ]
        )


def test_the_probe_classifies_every_probe_column(model_folder, tmp_path):
    result = evaluate_script.main(
        [
            "--model", str(model_folder), "--output_dir", str(tmp_path), "--tasks", "linear_probe",
            "--probe_columns", "modality,finding", "--probe_min_class_rows", "2", *TINY,
        ]
    )  # fmt: skip
    assert {"linear_probe/accuracy_100%", "linear_probe_finding/accuracy_100%"} <= set(result["metrics"])
    details = result["details"]["linear_probe_finding"]
    assert details["column"] == "finding" and details["eval_rows"] + details["eval_rows_left_out"] == 24
    assert details["classes"] > 6
