"""The benchmarks are runnable and compare like with like (their speed is measured by running them, not here)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.local_loss import TEMPERATURES, inputs, per_caption_loop_loss, step
from modeling_medmoe.losses import local_contrastive_loss

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script", ["local_loss", "moe_dispatch", "data_pipeline", "pretrain_throughput", "archive_search"]
)
def test_benchmark_has_help_and_quick(script):
    completed = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{script}", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0 and "--quick" in completed.stdout


def test_gpu_check_dry_run_on_cpu_writes_every_figure(tmp_path):
    output = tmp_path / "gpu_check.json"
    completed = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(output.read_text())
    for part in ("train_sparse", "train_dense", "local_loss", "fsdp2_torchrun"):
        assert "error" not in results[part], results[part]
    assert results["moe_sparse_vs_dense_train_speedup"] > 0 and results["archive_embedding"]["images_per_s"] > 0
    assert set(results["local_loss"]) == {"unchunked", "chunked"}
    fsdp = results["fsdp2_torchrun"]
    assert fsdp["processes"] == 1 and len(fsdp["losses"]) == 2 and all(math.isfinite(loss) for loss in fsdp["losses"])
    # accelerate runs FSDP on GPUs only; on a CPU pretraining refuses the config instead of training unsharded
    accelerate_run = results["accelerate_fsdp"]
    assert accelerate_run["exit_status"] != 0 and "GPUs only" in "\n".join(accelerate_run["lines_naming_fsdp"])


def test_the_loop_baseline_computes_the_same_loss_and_gradients():
    word_embeds, word_mask, regions = inputs(6, 7, 4, 16)
    loop = per_caption_loop_loss(word_embeds, word_mask, regions, *TEMPERATURES)
    loop_gradients = torch.autograd.grad(loop, (word_embeds, regions))
    ours = local_contrastive_loss(word_embeds, word_mask, regions, *TEMPERATURES, chunk_size=4)
    our_gradients = torch.autograd.grad(ours, (word_embeds, regions))
    torch.testing.assert_close(ours, loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_gradients, loop_gradients, atol=1e-5, rtol=1e-4)
    for timed in (
        step(per_caption_loop_loss, *inputs(6, 7, 4, 16)),
        step(local_contrastive_loss, *inputs(6, 7, 4, 16)),
    ):
        assert torch.isfinite(timed())  # what the benchmark times runs as called there


@pytest.fixture(scope="module")
def tiny_realmed(tmp_path_factory):
    """A folder laid out like realmed (a card naming the splits, data/train-*.parquet, data/eval-*.parquet) with
    phantom rows."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medmoe.training.synthetic import make_phantom

    folder = tmp_path_factory.mktemp("tiny_realmed")
    (folder / "data").mkdir()
    rng = np.random.default_rng(0)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [("image", image_type), ("text", pa.string()), ("modality", pa.string()), ("label", pa.string())]
    )
    for split, count in (("train", 48), ("eval", 24)):
        rows = []
        for _ in range(count):
            phantom = make_phantom(rng, image_size=64)
            buffer = io.BytesIO()
            phantom["image"].save(buffer, format="PNG")
            image = {"bytes": buffer.getvalue(), "path": None}
            rows.append(
                {"image": image, "text": phantom["text"], "modality": phantom["modality"], "label": phantom["finding"]}
            )
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "data" / f"{split}-0000-of-0001.parquet")
    splits = "".join(f"  - split: {split}\n    path: data/{split}-*.parquet\n" for split in ("train", "eval"))
    (folder / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n{splits}---\n")
    return folder


def test_realmed_benchmark_skips_cleanly_without_the_data(tmp_path):
    script = ["-m", "benchmarks.realmed"]
    completed = subprocess.run(
        [sys.executable, *script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0 and "--minutes" in completed.stdout
    completed = subprocess.run(
        [sys.executable, *script, "--data", str(tmp_path / "absent"), "--output_dir", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0 and "skipping" in completed.stdout
    assert not (tmp_path / "out").exists()


def test_realmed_benchmark_carves_a_grouped_validation_split_from_train(tiny_realmed, tmp_path):
    import pyarrow.parquet as pq

    from benchmarks import realmed

    folder = realmed.carve_splits(tiny_realmed, tmp_path, 0.25)
    fit, validation, scored = (
        pq.read_table(folder / "data" / f"{split}-0000-of-0001.parquet") for split in ("train", "validation", "eval")
    )
    train = realmed.read_split(tiny_realmed, "train")
    assert fit.num_rows + validation.num_rows == train.num_rows and 0 < validation.num_rows < train.num_rows
    assert not set(fit.column("text").to_pylist()) & set(validation.column("text").to_pylist())  # groups stay whole
    assert scored.equals(realmed.read_split(tiny_realmed, "eval"))  # realmed's eval split, untouched
    card = (folder / "README.md").read_text()
    assert realmed.realmed_present(folder) and "split: validation" in card and "split: eval" in card
    again = realmed.carve_splits(tiny_realmed, tmp_path / "again", 0.25)
    assert pq.read_table(again / "data" / "validation-0000-of-0001.parquet").equals(validation)  # deterministic
    args = realmed.parse_args(["--data", str(tiny_realmed), "--score_on", "validation,eval"])
    assert args.score_on == ["validation", "eval"]
    with pytest.raises(SystemExit):
        realmed.parse_args(["--data", str(tiny_realmed), "--score_on", "test"])


def test_realmed_benchmark_seeds_give_mean_and_deviation_and_calls_only_beyond_the_deviation():
    from benchmarks import realmed

    metric = realmed.TABLE_COLUMNS[0][1]
    rows = [{"system": f"{system}@{seed}", "metrics": {metric: value}}
            for system, values in (("medmoe", (0.10, 0.12, 0.14)), ("open_clip_train", (0.09, 0.10, 0.11)))
            for seed, value in zip((42, 43, 44), values)]  # fmt: skip
    stats = realmed.seed_statistics(rows)
    mean, deviation, runs = stats["medmoe"][metric]
    assert (round(mean, 6), round(deviation, 6), runs) == (0.12, 0.02, 3)
    assert realmed.verdict(stats["medmoe"][metric], stats["open_clip_train"][metric]) == "level"  # 0.02 apart
    assert realmed.verdict((0.20, 0.01, 3), (0.10, 0.02, 3)) == "ahead"
    assert realmed.verdict((0.05, 0.01, 3), (0.10, 0.02, 3)) == "behind"
    assert realmed.verdict((0.20, 0.0, 1), (0.10, 0.0, 3)) == ""  # one run: no deviation, no call
    table = realmed.seeds_table(rows)
    assert "| medmoe (3) | 0.120 ± 0.020 level |" in table.replace(" | –", "")
    assert realmed.seeded("medmoe@43") == ("medmoe", ["--seed", "43"]) and realmed.seeded("medmoe") == ("medmoe", [])


def test_realmed_benchmark_sizes_schedules_and_tabulates_finished_runs(tiny_realmed, tmp_path):
    import json

    from benchmarks import realmed

    argv = ["--data", str(tiny_realmed), "--minutes", "2", "--calibration_steps", "30", "--output_dir", str(tmp_path)]
    args = realmed.parse_args(argv)
    assert realmed.realmed_present(tiny_realmed) and not realmed.realmed_present(tmp_path)
    log = tmp_path / "train_log.jsonl"
    log.write_text("\n".join(json.dumps({"images_per_s": speed}) for speed in (5.0, 30.0, 34.0)))
    assert realmed.schedule_steps(args, log) == int(2 * 60 * (2 / (1 / 30 + 1 / 34)) / 64)  # time-weighted, batch 64
    assert realmed.schedule_steps(realmed.parse_args([*argv, "--minutes", "0.5"]), log) == 30  # never under calibration
    assert realmed.finished_record(args, "medmoe", "validation") is None
    folder = tmp_path / "medmoe"
    scores = realmed.scores_folder(folder / realmed.RUN_DIR, "validation")
    (scores / realmed.ANCHOR_PROMPT_EVAL).mkdir(parents=True)
    summary = {"parameters": 2_800_000, "steps": 50, "train_seconds": 100.0, "images_seen": 1600}
    (folder / realmed.RUN_DIR / "run_summary.json").write_text(json.dumps(summary))
    results = {"metrics": {"retrieval/image_to_text_R@10": 0.25}}
    (scores / "results.json").write_text(json.dumps(results))
    anchor_prompts = {"metrics": {"zero_shot/accuracy": 0.5}}
    (scores / realmed.ANCHOR_PROMPT_EVAL / "results.json").write_text(json.dumps(anchor_prompts))
    assert not realmed.trained(folder)
    (folder / "scheduled_steps.txt").write_text("60\n")
    assert realmed.trained(folder) and realmed.unscored_splits(args, "medmoe") == []
    both = realmed.parse_args([*argv, "--score_on", "validation,eval"])
    assert realmed.unscored_splits(both, "medmoe") == ["eval"]  # a trained run is scored, not trained, again
    windows = (9.0, 20.0, 22.0, 30.0)  # training throughput: the median after the first (start-up) window
    log_lines = [json.dumps({"images_per_s": speed}) for speed in windows]
    (folder / realmed.RUN_DIR / "train_log.jsonl").write_text("\n".join(log_lines))
    row = realmed.finished_record(args, "medmoe", "validation")
    assert row["images_per_s"] == 16.0 and row["train_images_per_s"] == 22.0 and row["scheduled_steps"] == 60
    assert row["metrics"]["anchor/zero_shot/accuracy"] == 0.5
    table = realmed.markdown_table([row], args.minutes)
    assert "| medmoe | 2.80M | 2 min | 50 | 16.0 | – | – | 0.250 |" in table
    (tmp_path / "medmoe@43").mkdir()
    (tmp_path / "medmoe@43" / "scheduled_steps.txt").write_text("77\n")
    assert realmed.calibrated_steps(args, "medmoe@44", []) == 77  # every seed of a system trains one schedule
    assert realmed.train_modalities(tiny_realmed) == ["X-ray", "CT", "MRI", "ultrasound", "pathology", "fundus"]
    command = realmed.pretrain_command(args, tmp_path, realmed.MEDMOE_SYSTEMS["medmoe"], 9, 2)
    assert command[command.index("--expert_names") + 1] == "X-ray,CT,MRI,ultrasound,pathology,fundus"
    assert "--report_type_column" not in command  # report types come from the report text
    labelled = realmed.pretrain_command(args, tmp_path, realmed.MEDMOE_SYSTEMS["modality_labels"], 9, 2)
    assert labelled[labelled.index("--report_type_column") + 1] == "modality"  # the ablation, named as such
    single = realmed.pretrain_command(args, tmp_path, realmed.MEDMOE_SYSTEMS["single_expert"], 9, 2)
    assert "--expert_names" not in single  # a system that sets its own experts keeps them
    assert command[command.index("--sentence_sampling") + 1] == "0.5" and command[-2:] == ["--max_train_minutes", "2"]
    assert command[command.index("--seed") + 1] == "42"  # --seed, for every MedMoE system
    assert command[command.index("--eval_split") + 1] == "validation"  # nothing in training looks at eval
    second_seed = realmed.pretrain_command(args, tmp_path, realmed.MEDMOE_SYSTEMS["medmoe_seed43"], 9, 2)
    last_seed = max(index for index, argument in enumerate(second_seed) if argument == "--seed")
    assert second_seed[last_seed + 1] == "43"  # argparse keeps the last value: the system's own seed


def test_open_clip_baseline_trains_and_is_scored_by_the_evaluation_code(tiny_realmed, tokenizer, tmp_path):
    """Runs where open_clip is importable: the benchmark's own environment (.venv-open_clip/bin/python -m pytest)."""
    pytest.importorskip("open_clip")
    import json

    from benchmarks import open_clip_baseline

    tokenizer.save_pretrained(tmp_path / "tokenizer")
    output_dir = tmp_path / "open_clip"
    summary = open_clip_baseline.main(
        [
            "--dataset_name", str(tiny_realmed), "--tokenizer", str(tmp_path / "tokenizer"), "--image_size", "64",
            "--max_steps", "3", "--per_device_train_batch_size", "8", "--logging_steps", "1", "--num_workers", "0",
            "--max_train_samples", "48", "--output_dir", str(output_dir),
        ]
    )  # fmt: skip
    assert summary["steps"] == 3 and summary["images_seen"] == 24
    assert len((output_dir / "train_log.jsonl").read_text().splitlines()) == 3
    metrics = json.loads((output_dir / "scored_on_eval" / "results.json").read_text())["metrics"]
    for name in ("zero_shot/accuracy", "retrieval/text_to_image_R@10", "linear_probe/accuracy_100%"):
        assert 0 <= metrics[name] <= 1, name
    assert "linear_probe_label/accuracy_100%" in metrics
    assert (output_dir / "model.safetensors").is_file()
    anchor_prompts = json.loads((output_dir / "scored_on_eval" / "anchor_prompts" / "results.json").read_text())
    assert "zero_shot/mean_per_class_accuracy" in anchor_prompts["metrics"]


def test_the_anchor_trains_with_open_clips_own_cli_and_is_scored_by_the_evaluation_code(tiny_realmed, tmp_path):
    """Runs where the recipe's packages are importable: .venv-open_clip/bin/python -m pytest (realmed.py installs
    them there)."""
    for module in ("open_clip_train.main", "webdataset", "braceexpand"):
        pytest.importorskip(module)
    import shutil

    from benchmarks import open_clip_train_anchor

    with pytest.raises(ValueError, match="at least 64 train rows"):  # 48 rows: not one batch of the recipe
        open_clip_train_anchor.main(["--data", str(tiny_realmed), "--output_dir", str(tmp_path / "small" / "run")])
    data = tmp_path / "realmed"
    shutil.copytree(tiny_realmed, data)
    for copy in (1, 2):  # 144 train rows: two batches of 64 per epoch
        shutil.copy(data / "data" / "train-0000-of-0001.parquet", data / "data" / f"train-000{copy}-of-0001.parquet")
    output_dir = tmp_path / "open_clip_train" / "run"
    summary = open_clip_train_anchor.main(
        ["--data", str(data), "--minutes", "0.1", "--epochs", "1", "--max_train_samples", "48"]
        + ["--num_workers", "0", "--output_dir", str(output_dir)]
    )
    assert summary["parameters"] > 20_000_000 and summary["steps"] == 2 and summary["images_seen"] == 128
    assert summary["steps_scheduled"] == 2  # one epoch of 144 rows in batches of 64
    rows = (tmp_path / "open_clip_train" / "csv" / "train.csv").read_text().splitlines()
    assert rows[0] == "filepath,title" and len(rows) > 1
    metrics = json.loads((output_dir / "scored_on_eval" / "results.json").read_text())["metrics"]
    assert "retrieval/text_to_image_text_match_R@10" in metrics
    anchor_prompts = json.loads((output_dir / "scored_on_eval" / "anchor_prompts" / "results.json").read_text())
    assert anchor_prompts["details"]["zero_shot"]["templates"] == [
        "a {} image",
        "a medical {} scan",
        "a {} of a patient",
    ]
    weights = (output_dir / "model.safetensors").read_bytes()
    rescored = open_clip_train_anchor.main(  # a finished run is scored on another split, never retrained
        ["--data", str(data), "--score_splits", "train", "--max_train_samples", "48", "--num_workers", "0"]
        + ["--output_dir", str(output_dir)]
    )
    assert rescored == summary and (output_dir / "model.safetensors").read_bytes() == weights
    assert (output_dir / "scored_on_train" / "results.json").is_file()


def test_archive_index_benchmark_scores_each_index_against_exact_search():
    pytest.importorskip("faiss")
    from benchmarks.archive_search import index_figures

    figures = index_figures(12_000, dimension=32)
    assert set(figures) == {"flat", "ivf", "ivfpq"}
    assert figures["flat"]["recall_at_10"] == 1.0 and figures["flat"]["query_ms"] > 0
    assert 0.5 < figures["ivf"]["recall_at_10"] <= 1.0 and 0.5 < figures["ivfpq"]["recall_at_10"] <= 1.0


def test_report_type_benchmark_scores_the_labeller_against_the_modality_column(tiny_realmed, tmp_path, capsys):
    import shutil

    from benchmarks import report_types

    results = report_types.main(["--data", str(tiny_realmed)])
    assert results["report_type_train_coverage"] > 0.5  # phantom reports name their modality
    assert results["report_type_eval_precision"] == 1.0
    assert "report_type_validation_coverage" not in results  # realmed itself has no validation split
    carved = shutil.copytree(tiny_realmed, tmp_path / "carved")
    shutil.copy(next((carved / "data").glob("eval-*.parquet")), carved / "data" / "validation-0000-of-0001.parquet")
    assert report_types.main(["--data", str(carved)])["report_type_validation_precision"] == 1.0
    assert report_types.main(["--data", str(tiny_realmed / "absent")]) == {}
    assert "nothing to measure" in capsys.readouterr().out
