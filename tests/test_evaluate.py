"""training/run_evaluation.py on a nano folder and the synthetic stream: every task, results files and pictures."""

import json

import pytest
import torch
from huggingface_hub import EvalResult
from PIL import Image

from medmoe.training import run_evaluation as evaluate_script

TINY = [
    "--max_eval_samples",
    "24",
    "--max_train_samples",
    "36",
    "--max_pointing_samples",
    "16",
    "--num_visualizations",
    "2",
    "--per_device_eval_batch_size",
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
    classes = result["details"]["zero_shot"]["classes"]
    phrases = tmp_path / "phrases.json"
    phrases.write_text(json.dumps({classes[0]: "a phrase of its own"}))
    renamed = evaluate_script.main(
        ["--model", str(model_folder), "--output_dir", str(tmp_path / "phrased"), "--tasks", "zero_shot"]
        + ["--templates", str(templates), "--class_phrases", str(phrases), *TINY]
    )
    zero_shot = renamed["details"]["zero_shot"]
    assert zero_shot["classes"] == classes  # the classes keep their names; only the prompts say the phrase
    assert zero_shot["class_phrases"] == ["a phrase of its own", *classes[1:]]
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


def test_no_image_is_routed_or_embedded_by_its_own_report(nano_config, batch):
    """A config that routes by the report while training: evaluation embeddings of an image are the same whatever
    report it is paired with, and its expert is the image router's."""
    from medmoe.training.evaluation_embeddings import embed_pairs
    from modeling_medmoe import MedMoEModel

    from .test_modeling import route_to

    config = nano_config.__class__.from_dict({**nano_config.to_dict(), "router_input": "text"})
    model = MedMoEModel(config)
    route_to(model.vision_model.image_router, 1)
    route_to(model.text_router, 4)
    rows = dict(batch, report_type_labels=torch.zeros(8, dtype=torch.long), texts=["r"] * 8, metadata={}, skipped={})
    shuffled = {**rows, **{key: batch[key].flip(0) for key in ("input_ids", "attention_mask", "token_type_ids")}}
    paired, mispaired = (embed_pairs(model, [b], torch.device("cpu"), show_progress=False) for b in (rows, shuffled))
    assert paired.expert_index.tolist() == [1] * 8
    torch.testing.assert_close(paired.image_embeds, mispaired.image_embeds)
    torch.testing.assert_close(paired.text_embeds.flip(0), mispaired.text_embeds)


def test_zero_shot_scores_are_the_model_package_scores(model_folder, tmp_path):
    """The CLI's zero-shot accuracy is what the model's own zero-shot methods (the card, handler and demo use them)
    give on the same rows."""
    import numpy as np
    from transformers import AutoModel, AutoProcessor

    from medmoe.training import data as data_module
    from medmoe.training.evaluation_embeddings import embed_pairs

    result = evaluate_script.main(
        ["--model", str(model_folder), "--output_dir", str(tmp_path), "--tasks", "zero_shot", *TINY]
    )
    model = AutoModel.from_pretrained(model_folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_folder, trust_remote_code=True)
    stream, image_column, text_column = data_module.open_stream(data_module.DataArguments(), "eval")
    stream = data_module.prepare_stream(stream, image_column=image_column, max_rows=24)
    prepare = data_module.RowPreparer(
        processor, model.config.expert_names, image_column, text_column, None, ("modality",)
    )
    loader = data_module.BatchStream(stream, prepare, data_module.BatchCollator(processor), 8, drop_last=False)
    embedded = embed_pairs(model, loader, torch.device("cpu"), show_progress=False)
    classes = result["details"]["zero_shot"]["classes"]
    class_embeds = model.get_zero_shot_class_embeddings(processor.tokenizer, classes)
    predicted = model.zero_shot_probabilities(embedded.image_embeds, class_embeds).argmax(dim=1).numpy()
    truth = np.array([classes.index(value) for value in embedded.metadata["modality"]])
    assert result["metrics"]["zero_shot/accuracy"] == pytest.approx(float((predicted == truth).mean()))


def test_evaluation_reads_reports_at_the_length_the_model_was_trained_with(nano_folder, tmp_path):
    """pretrain.py saves the tokenizer with model_max_length = --max_length; the evaluation tokenises at that length
    unless --max_length says otherwise (a model trained on 48 tokens was once scored on 128)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(nano_folder, trust_remote_code=True)
    processor.tokenizer.model_max_length = 12
    arguments = ["--model", str(nano_folder), "--output_dir", str(tmp_path), "--max_eval_samples", "8"]
    unused_model = torch.nn.Identity()
    evaluation = evaluate_script.EvaluationRun(evaluate_script.parse_args(arguments), unused_model, processor, ["CT"])
    assert evaluation.max_length == 12
    batch = next(iter(evaluation.loader("eval", 8)))
    assert batch["input_ids"].shape[1] <= 12
    override = evaluate_script.parse_args([*arguments, "--max_length", "40"])
    assert evaluate_script.EvaluationRun(override, unused_model, processor, ["CT"]).max_length == 40
    processor.tokenizer.model_max_length = int(1e30)  # transformers' "no limit"
    assert evaluate_script.training_length(processor.tokenizer) == 128
