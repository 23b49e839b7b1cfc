"""The Hub release files: the card's YAML and snippets, the endpoint handler, idempotent generation."""

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from medmoe.model_card.generate import main as generate_card

from .helpers import endpoint_handler

ROOT = Path(__file__).resolve().parents[1]
RESULTS = {
    "dataset": {"name": "synthetic", "type": "synthetic", "split": "eval"},
    "num_samples": 24,
    "metrics": {"retrieval/image_to_text_R@5": 0.25, "zero_shot/accuracy": 0.5},
    "expert_usage": {"X-ray": 0.5, "CT": 0.5},
    "eval_results": [
        {
            "task_type": "image-to-text",
            "dataset_type": "synthetic",
            "dataset_name": "synthetic",
            "dataset_split": "eval",
            "metric_type": "retrieval/image_to_text_R@5",
            "metric_value": 0.25,
        },
        {
            "task_type": "zero-shot-image-classification",
            "dataset_type": "synthetic",
            "dataset_name": "synthetic",
            "dataset_split": "eval",
            "metric_type": "zero_shot/accuracy",
            "metric_value": 0.5,
        },
    ],
}
TRAIN_ARGS = {"dataset_name": "synthetic", "preset": "nano", "max_steps": 400, "learning_rate": 0.002, "seed": 42}


@pytest.fixture(scope="module")
def card_folder(tmp_path_factory, nano_config, processor):
    from modeling_medmoe import MedMoEModel

    folder = tmp_path_factory.mktemp("card") / "medmoe-nano"
    MedMoEModel(nano_config).save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "results.json").write_text(json.dumps(RESULTS))
    (folder / "args.json").write_text(json.dumps(TRAIN_ARGS))
    generate_card(
        ["--model", str(folder), "--results", str(folder / "results.json"), "--train_args", str(folder / "args.json")]
    )
    return folder


def card_yaml(folder):
    text = (folder / "README.md").read_text()
    return yaml.safe_load(text.split("---")[1]), text


def test_card_yaml_has_the_hub_fields(card_folder):
    header, _ = card_yaml(card_folder)
    assert header["pipeline_tag"] == "zero-shot-image-classification"
    assert header["library_name"] == "transformers"
    assert {"medical", "mixture-of-experts", "clip", "custom_code"} <= set(header["tags"])
    assert header["license"]
    results = header["model-index"][0]["results"]
    metrics = {metric["type"]: metric["value"] for result in results for metric in result["metrics"]}
    assert metrics == {"retrieval/image_to_text_R@5": 0.25, "zero_shot/accuracy": 0.5}
    assert len(header["widget"]) == 3
    for example in header["widget"]:
        assert (card_folder / example["src"]).is_file()
        assert example["candidate_labels"].split(", ")[0] == "X-ray"
        assert abs(sum(entry["score"] for entry in example["output"]) - 1) < 1e-3


def test_card_body_has_every_section(card_folder):
    _, text = card_yaml(card_folder)
    for heading in (
        "## Intended use",
        "## How to use",
        "## Training",
        "## Evaluation",
        "## Limitations and biases",
        "## Citation",
    ):
        assert heading in text, heading
    assert "2506.08356" in text and "not a medical device" in text
    assert "| steps trained | 400 |" in text and "| retrieval/image_to_text_R@5 | 0.2500 |" in text
    assert "X-ray 50.0%" in text


def test_every_snippet_in_the_card_runs_offline(card_folder, tmp_path):
    _, text = card_yaml(card_folder)
    snippets = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(snippets) == 4
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "HF_HOME": str(tmp_path / "hf")}
    for snippet in snippets:
        completed = subprocess.run(
            [sys.executable, "-c", snippet],
            cwd=card_folder,
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert completed.returncode == 0, f"{snippet}\n{completed.stderr[-3000:]}"


def test_generation_is_idempotent(card_folder):
    before = {path.name: path.read_bytes() for path in card_folder.rglob("*") if path.is_file()}
    generate_card(
        [
            "--model",
            str(card_folder),
            "--results",
            str(card_folder / "results.json"),
            "--train_args",
            str(card_folder / "args.json"),
        ]
    )
    after = {path.name: path.read_bytes() for path in card_folder.rglob("*") if path.is_file()}
    assert before == after


@pytest.fixture(scope="module")
def handler(card_folder):
    return endpoint_handler(card_folder)


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_handler_serves_zero_shot_from_pil_bytes_and_base64(handler, card_folder):
    image = Image.open(card_folder / "examples" / "ct.png")
    for payload in (
        image,
        png(image),
        base64.b64encode(png(image)).decode(),
        "data:image/png;base64," + base64.b64encode(png(image)).decode(),
    ):
        result = handler({"inputs": payload, "parameters": {"candidate_labels": ["CT", "MRI", "fundus"]}})
        assert [entry["label"] for entry in result] and sorted(e["label"] for e in result) == ["CT", "MRI", "fundus"]
        assert abs(sum(entry["score"] for entry in result) - 1) < 1e-5


def test_handler_embeddings(handler, card_folder, nano_config):
    image = png(Image.open(card_folder / "examples" / "xray.png"))
    images = handler({"inputs": [image, image], "parameters": {"mode": "image-embedding"}})
    assert len(images["embeddings"]) == 2 and len(images["embeddings"][0]) == nano_config.projection_dim
    assert images["experts"][0] in nano_config.expert_names
    texts = handler({"inputs": ["Axial CT.", "Fundus photo."], "parameters": {"mode": "text-embedding"}})
    assert len(texts["embeddings"]) == 2


@pytest.mark.parametrize(
    "request_body, message",
    [
        ({}, '"inputs"'),
        ({"inputs": "not base64 at all!"}, "base64"),
        (
            {"inputs": base64.b64encode(b"not an image").decode(), "parameters": {"candidate_labels": ["a"]}},
            "Cannot decode these image bytes",
        ),
        ({"inputs": b"", "parameters": {"candidate_labels": ["CT"]}}, "Cannot decode these image bytes"),
        ({"inputs": 42, "parameters": {"candidate_labels": ["CT"]}}, "Unsupported image"),
        ({"inputs": png(Image.new("L", (8, 8)))}, "candidate_labels"),
        ({"inputs": png(Image.new("L", (8, 8))), "parameters": {"mode": "video"}}, "Unknown mode"),
        ({"inputs": "", "parameters": {"mode": "text-embedding"}}, "non-empty"),
        (
            {
                "inputs": png(Image.new("L", (8, 8))),
                "parameters": {"candidate_labels": ["a"], "hypothesis_template": "x"},
            },
            "{}",
        ),
    ],
)
def test_handler_explains_bad_requests(handler, request_body, message):
    result = handler(request_body)
    assert isinstance(result, dict) and message in result["error"]


def test_demo_prediction_gives_scores_expert_and_overlay(card_folder, nano_config):
    from medmoe.model_card.app import Demo

    image = Image.open(card_folder / "examples" / "fundus.png")
    scores, expert, picture = Demo(str(card_folder)).predict(image, "fundus, CT, X-ray")
    assert list(scores) == ["fundus", "CT", "X-ray"] and abs(sum(scores.values()) - 1) < 1e-5
    assert expert in nano_config.expert_names
    assert picture.size == image.size and picture.mode == "RGB"


def test_release_code_imports_nothing_from_training():
    """model_card/ ships with models and Spaces: it may use the model package, never the training code."""
    import ast

    for path in (ROOT / "model_card").glob("*.py"):
        tree = ast.parse(path.read_text())
        modules = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        modules += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        assert not [name for name in modules if name.split(".")[0] == "training"], path.name
