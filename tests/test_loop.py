"""The one training loop and optimisation step (training/loop.py) that pretraining, fine-tuning and the open_clip
baseline share: a non-finite step changes nothing and is reported, the next one trains; pretraining through the
shared loop trains exactly as its own loop did."""

import functools
import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from medmoe.training.loop import contrastive_forward, train_step

LABELS = torch.tensor([0, 1, 2, 3, 4, 5, -100, -100])


def prepared(model):
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return accelerator, model, optimizer, scheduler


def assert_skips_then_trains(model, batch, forward, changed: str):
    accelerator, model, optimizer, scheduler = prepared(model)
    poisoned = {**batch, "pixel_values": torch.full_like(batch["pixel_values"], float("nan"))}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    out, finite = train_step(accelerator, model, poisoned, optimizer, scheduler, 1.0, True, forward)
    assert not finite and not torch.isfinite(out.loss)
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters()), "no update from a NaN step"
    assert all(p.grad is None for p in model.parameters())
    out, finite = train_step(accelerator, model, batch, optimizer, scheduler, 1.0, True, forward)
    assert finite and torch.isfinite(out.loss)
    assert not torch.equal(before[changed], dict(model.named_parameters())[changed])


def test_a_non_finite_pretraining_step_is_skipped_and_training_continues(model, batch):
    forward = functools.partial(contrastive_forward, device=torch.device("cpu"))
    assert_skips_then_trains(
        model, {**batch, "report_type_labels": LABELS}, forward, "vision_model.image_projection.weight"
    )


@pytest.mark.parametrize("task", ["classification", "contrastive"])
def test_finetuning_steps_are_guarded_the_same_way(task, nano_config, batch):
    from medmoe.training.finetune import task_forward
    from modeling_medmoe import MedMoEForImageClassification, MedMoEModel

    classes = ["CT", "MRI", "X-ray"]
    if task == "classification":
        labels = {"id2label": dict(enumerate(classes)), "label2id": {name: i for i, name in enumerate(classes)}}
        model = MedMoEForImageClassification(nano_config.__class__.from_dict({**nano_config.to_dict(), **labels}))
        changed = "classifier.weight"
    else:
        model, changed = MedMoEModel(nano_config), "text_projection.weight"
    rows = {**batch, "report_type_labels": LABELS, "metadata": {"modality": ["CT", "MRI", "X-ray", "CT"] * 2}}
    forward = task_forward(Namespace(task=task, label_column="modality"), classes, torch.device("cpu"))
    assert_skips_then_trains(model, rows, forward, changed)


FIXTURES = Path(__file__).parent / "fixtures"


def test_pretraining_through_the_shared_loop_matches_the_loop_it_replaced(tmp_path):
    """The losses and held-out figures of a seeded 8-step nano run (checkpoints and evaluations at steps 4 and 8)
    equal those recorded in fixtures/pretrain_nano_reference.json by pretrain.py's own loop before it moved into
    training/loop.py (commit 3f0f8c8 run with the modeling_medmoe/ of 2026-12-04: idle experts keep no gradient in
    one process, the initialisation goes through _init_weights), with the same saved vocabulary (a learnt one may
    differ where pieces tie)."""
    from .test_pretrain import run_script

    output_dir = tmp_path / "run"
    run_script(reference_run_arguments(FIXTURES / "reference_tokenizer", output_dir))
    logged = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    summary = json.loads((output_dir / "run_summary.json").read_text())
    reference = json.loads((FIXTURES / "pretrain_nano_reference.json").read_text())
    assert [entry["step"] for entry in logged] == list(range(1, 9))
    # rel: another thread count sums in another order (1 thread instead of 2 moves losses ~6e-6 relative)
    assert [entry["loss"] for entry in logged] == pytest.approx(reference["losses"], rel=1e-5, abs=1e-5)
    figures = [evaluation["metrics"] for evaluation in summary["evaluations"]]
    assert [evaluation["step"] for evaluation in summary["evaluations"]] == [4, 8]
    for measured, recorded in zip(figures, reference["evaluations"], strict=True):
        assert measured == pytest.approx(recorded, rel=1e-5, abs=1e-5)
    assert summary["images_seen"] == reference["images_seen"]


def reference_run_arguments(tokenizer_dir: Path, output_dir: Path) -> list[str]:
    return [
        "--tokenizer", str(tokenizer_dir), "--output_dir", str(output_dir), "--max_steps", "8", "--seed", "42",
        "--per_device_train_batch_size", "8", "--logging_steps", "1", "--eval_steps", "4", "--max_eval_samples",
        "16", "--checkpointing_steps", "4", "--warmup_steps", "1", "--report_to", "none", "--num_workers", "0",
    ]  # fmt: skip
