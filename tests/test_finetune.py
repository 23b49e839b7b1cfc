"""MedMoEForImageClassification and training/finetune.py: LoRA share, adapter reload, merge, learning, pipeline."""

import json
import math
import os
import shutil
import subprocess
import sys
from argparse import Namespace

import numpy as np
import pytest
import torch
from peft import PeftModel

from medmoe.training.arguments import DEFAULT_LORA_TARGETS
from medmoe.training.finetune import apply_lora, trainable_share
from medmoe.training.synthetic import MODALITIES, make_phantom
from modeling_medmoe import MedMoEForImageClassification, MedMoEModel

from .helpers import (
    FAKE_TOKEN,
    assert_upload_failed_keeping_the_result_and_hiding_the_token,
    kill_once_checkpointed,
    logged_losses,
    run_training_script,
)

LORA = Namespace(lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target=",".join(DEFAULT_LORA_TARGETS))
CLASSES = list(MODALITIES)


def classifier_from(folder):
    return MedMoEForImageClassification.from_pretrained(
        folder,
        num_labels=len(CLASSES),
        id2label=dict(enumerate(CLASSES)),
        label2id={c: i for i, c in enumerate(CLASSES)},
    )


@pytest.fixture(scope="module")
def phantom_batch(processor):
    generator = np.random.default_rng(3)
    rows = [make_phantom(generator, 64, modality) for modality in MODALITIES for _ in range(2)]
    pixels = processor(images=[row["image"] for row in rows])["pixel_values"]
    return pixels, torch.tensor([CLASSES.index(row["modality"]) for row in rows])


def perturb_lora(model):
    """LoRA B starts at zero (the adapter is the identity); give it weights so reloading is really tested."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)


def test_classifier_reuses_the_pretrained_vision_weights(nano_folder):
    base = MedMoEModel.from_pretrained(nano_folder)
    classifier = classifier_from(nano_folder)
    for name in (
        "vision_model.image_projection.weight",
        "vision_model.experts.experts.0.scale_scorer.0.weight",
        "vision_model.image_router.0.weight",
    ):
        torch.testing.assert_close(classifier.state_dict()[name], base.state_dict()[name])
    assert classifier.config.id2label[0] == CLASSES[0] and torch.isfinite(classifier.classifier.weight).all()


@pytest.mark.parametrize("task", ["classification", "contrastive"])
def test_lora_trains_under_five_percent_of_parameters(nano_folder, task):
    model = classifier_from(nano_folder) if task == "classification" else MedMoEModel.from_pretrained(nano_folder)
    peft_model = apply_lora(model, LORA, ["classifier"] if task == "classification" else [])
    trainable, total = trainable_share(peft_model)
    assert 0 < trainable / total < 0.05
    names = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert any("attn.qkv.lora_A" in name for name in names) and any("image_projection.lora_A" in name for name in names)
    if task == "contrastive":
        assert any("query.lora_A" in name for name in names)


def test_reloaded_adapter_and_merged_model_give_identical_outputs(nano_folder, phantom_batch, tmp_path):
    pixels, _ = phantom_batch
    peft_model = apply_lora(classifier_from(nano_folder), LORA, ["classifier"]).eval()
    perturb_lora(peft_model)
    with torch.no_grad():
        expected = peft_model(pixel_values=pixels).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(classifier_from(nano_folder), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixels).logits, expected, rtol=0, atol=0)
        merged = peft_model.merge_and_unload().eval()
        torch.testing.assert_close(merged(pixel_values=pixels).logits, expected, rtol=1e-4, atol=1e-5)


def test_contrastive_adapter_loads_on_an_automodel_base(nano_folder, batch, tmp_path):
    from transformers import AutoModel

    peft_model = apply_lora(MedMoEModel.from_pretrained(nano_folder), LORA, []).eval()
    perturb_lora(peft_model)
    with torch.no_grad():
        expected = peft_model(**batch).logits_per_image
    peft_model.save_pretrained(tmp_path / "adapter")
    base = AutoModel.from_pretrained(nano_folder, trust_remote_code=True)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits_per_image, expected, rtol=0, atol=0)


def test_a_few_lora_steps_lower_the_classification_loss(nano_folder, phantom_batch):
    pixels, labels = phantom_batch
    torch.manual_seed(0)  # LoRA's A matrices are drawn at random
    model = apply_lora(classifier_from(nano_folder), LORA, ["classifier"]).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


FINETUNE = [
    "--task",
    "classification",
    "--lora",
    "--per_device_train_batch_size",
    "8",
    "--max_eval_samples",
    "16",
    "--class_scan_rows",
    "200",
    "--num_workers",
    "0",
    "--logging_steps",
    "1",
    "--warmup_steps",
    "1",
    "--report_to",
    "none",
]


def finetune(model_folder, output_dir, *arguments, check=True, extra_environment=None):
    return run_training_script(
        "finetune.py",
        ["--model", str(model_folder), "--output_dir", str(output_dir), *FINETUNE, *arguments],
        check=check,
        extra_environment=extra_environment,
    )


@pytest.fixture(scope="module")
def checkpointed_run(nano_folder, tmp_path_factory):
    """Six LoRA classification steps with checkpoints at steps 3 and 6."""
    output_dir = tmp_path_factory.mktemp("finetune") / "run"
    finetune(nano_folder, output_dir, "--max_steps", "6", "--checkpointing_steps", "3")
    return output_dir


def test_finetuning_killed_then_resumed_matches_the_uninterrupted_run(nano_folder, checkpointed_run, tmp_path):
    """Pretraining's resume test on fine-tuning: kill -9 once the step-3 checkpoint exists, then
    `--resume_from_checkpoint latest`: steps 4-6 reproduce the uninterrupted run's losses exactly."""
    output_dir = tmp_path / "killed"
    arguments = ["--model", str(nano_folder), "--output_dir", str(output_dir), *FINETUNE]
    arguments += ["--max_steps", "6", "--checkpointing_steps", "3"]
    kill_once_checkpointed("finetune.py", arguments, output_dir / "checkpoints" / "step_3")
    completed = run_training_script("finetune.py", [*arguments, "--resume_from_checkpoint", "latest"])
    assert "Resumed from" in completed.stdout
    resumed, uninterrupted = logged_losses(output_dir), logged_losses(checkpointed_run)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == uninterrupted[step], step
    summary = json.loads((output_dir / "eval_results.json").read_text())
    assert summary["steps"] == 6 and (output_dir / "adapter_model.safetensors").is_file()


def test_an_earlier_finetuning_run_is_never_overwritten_silently(nano_folder, checkpointed_run, tmp_path):
    again = tmp_path / "again"
    shutil.copytree(checkpointed_run, again)
    before = (again / "adapter_model.safetensors").read_bytes()
    completed = finetune(nano_folder, again, "--max_steps", "1", check=False)
    assert completed.returncode != 0
    assert "--resume_from_checkpoint latest" in completed.stderr and "--overwrite_output_dir" in completed.stderr
    assert (again / "adapter_model.safetensors").read_bytes() == before
    finetune(nano_folder, again, "--max_steps", "1", "--overwrite_output_dir")
    assert not (again / "checkpoints").exists()
    assert json.loads((again / "eval_results.json").read_text())["steps"] == 1


def test_finetuning_in_bf16_logs_to_its_trackers_and_its_log_file(nano_folder, tmp_path):
    output_dir = tmp_path / "bf16"
    completed = finetune(nano_folder, output_dir, "--max_steps", "2", "--mixed_precision", "bf16",
                         "--report_to", "tensorboard", "--log_level", "warning")  # fmt: skip
    assert list((output_dir / "medmoe-finetune").rglob("events.out.tfevents.*")), "tensorboard's event file"
    assert all(math.isfinite(loss) for loss in logged_losses(output_dir).values())
    assert "trainable" not in completed.stdout, "--log_level warning hides the info lines"
    assert "INFO" not in (output_dir / "run.log").read_text()


def test_finetuning_upload_without_network_keeps_the_adapter_and_never_shows_the_token(nano_folder, tmp_path):
    output_dir = tmp_path / "upload"
    completed = finetune(nano_folder, output_dir, "--max_steps", "1", "--push_to_hub", "--hub_model_id",
                         "someone/medmoe-adapter", check=False, extra_environment={"HF_TOKEN": FAKE_TOKEN})  # fmt: skip
    assert_upload_failed_keeping_the_result_and_hiding_the_token(completed, output_dir, "adapter_model.safetensors")


def test_finetune_script_saves_adapter_and_merged_classifier_for_the_pipeline(nano_folder, tmp_path):
    output_dir = tmp_path / "finetuned"
    completed = finetune(nano_folder, output_dir, "--merge", "--max_steps", "4")
    assert "trainable" in completed.stdout and "%" in completed.stdout
    summary = json.loads((output_dir / "eval_results.json").read_text())
    assert {"accuracy", "auroc"} <= set(summary["metrics"]) and summary["steps"] == 4
    assert (output_dir / "adapter_config.json").is_file()  # OUTPUT_DIR itself is the adapter

    check = (
        "import sys, json; from PIL import Image; from transformers import pipeline\n"
        "classify = pipeline('image-classification', model=sys.argv[1], trust_remote_code=True)\n"
        "print(json.dumps(classify(Image.new('RGB', (96, 96), (120, 40, 20)))))\n"
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "HF_HOME": str(tmp_path / "hf")}
    completed = subprocess.run(
        [sys.executable, "-c", check, str(output_dir / "merged")],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    predictions = json.loads(completed.stdout.strip().splitlines()[-1])
    assert {entry["label"] for entry in predictions} <= set(CLASSES) and len(predictions) == 5
