"""training/pretrain.py end to end, as subprocesses: the saved folder, resume, 2 processes, towers, Hub upload."""

import json
import math
import shutil
import sys

import pytest
from PIL import Image

from benchmarks.hostile_inputs import png_bytes
from modeling_medmoe import MedMoEConfig

from .helpers import (
    FAKE_TOKEN,
    assert_upload_failed_keeping_the_result_and_hiding_the_token,
    kill_once_checkpointed,
    load_in_fresh_process,
    logged_losses,
    run_training_script,
)

FAST = [
    "--per_device_train_batch_size",
    "8",
    "--eval_steps",
    "0",
    "--max_eval_samples",
    "16",
    "--tokenizer_training_rows",
    "120",
    "--tokenizer_vocab_size",
    "300",
    "--report_to",
    "none",
    "--logging_steps",
    "1",
    "--warmup_steps",
    "1",
]


def run_script(arguments, **options):
    return run_training_script("pretrain.py", arguments, **options)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run") / "medmoe-nano"
    completed = run_script(["--max_steps", "6", "--checkpointing_steps", "3", "--output_dir", str(output_dir), *FAST])
    return output_dir, completed


def test_short_run_saves_a_complete_model_folder(short_run):
    output_dir, completed = short_run
    model_dir = output_dir  # --output_dir is the model folder, the run's files beside the model's
    for name in (
        "config.json",
        "model.safetensors",
        "modeling_medmoe.py",
        "configuration_medmoe.py",
        "processing_medmoe.py",
        "image_processing_medmoe.py",
        "dicom.py",
        "processor_config.json",
        "tokenizer.json",
        "README.md",
        "args.json",
        "eval_results.json",
        "handler.py",
        "examples/xray.png",
    ):
        assert (model_dir / name).is_file(), name
    assert not list(model_dir.glob("*.bin")) and not list(model_dir.glob("*.pt")), "safetensors only"
    assert "routing purity vs modality" in completed.stdout and "x chance" in completed.stdout
    assert str(model_dir) in completed.stdout
    for name in (
        "checkpoints/step_6/model.safetensors",
        "train_log.jsonl",
        "run_summary.json",
        "tokenizer/tokenizer.json",
    ):
        assert (output_dir / name).is_file(), name  # the run beside the model
    summary = json.loads((output_dir / "run_summary.json").read_text())
    assert summary["steps"] == 6 and summary["images_seen"] == 48
    assert sorted(logged_losses(output_dir)) == [1, 2, 3, 4, 5, 6]
    assert "Skipped rows: none; skipped (non-finite) steps: 0" in completed.stdout


def test_the_upload_leaves_checkpoints_and_logs_out(short_run):
    """finish() uploads --output_dir with RUN_FILES ignored, as huggingface_hub's upload_folder filters them."""
    from huggingface_hub.utils import filter_repo_objects

    from medmoe.training.pretrain import RUN_FILES

    output_dir, _ = short_run
    files = [str(path.relative_to(output_dir)) for path in output_dir.rglob("*") if path.is_file()]
    uploaded = set(filter_repo_objects(files, ignore_patterns=RUN_FILES))
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json", "examples/xray.png"} <= uploaded
    assert not [name for name in uploaded if name.startswith(("checkpoints/", "tokenizer/", "medmoe-pretrain/"))]
    assert not {"train_log.jsonl", "run_summary.json"} & uploaded


def test_an_earlier_run_is_never_overwritten_silently(short_run, tmp_path):
    """A second run into the same folder stops and names both ways on; --overwrite_output_dir starts over."""
    output_dir, _ = short_run
    again = tmp_path / "again"
    shutil.copytree(output_dir, again)
    before = (again / "model.safetensors").read_bytes()
    completed = run_script(["--max_steps", "1", "--output_dir", str(again), *FAST], check=False)
    assert completed.returncode != 0
    assert "--resume_from_checkpoint latest" in completed.stderr and "--overwrite_output_dir" in completed.stderr
    assert (again / "model.safetensors").read_bytes() == before and (again / "checkpoints" / "step_6").is_dir()
    run_script(["--max_steps", "1", "--output_dir", str(again), "--overwrite_output_dir", *FAST])
    assert not (again / "checkpoints").exists(), "the earlier run's checkpoints are gone with it"
    assert json.loads((again / "run_summary.json").read_text())["steps"] == 1
    assert sorted(logged_losses(again)) == [1]


def test_the_upload_folder_loads_in_a_fresh_offline_process(short_run, tmp_path):
    output_dir, _ = short_run
    images = [Image.new("L", (80, 80), color) for color in (20, 200)]
    result = load_in_fresh_process(output_dir, images, ["Axial CT.", "Chest X-ray."], ["ct", "mri"], tmp_path)
    assert len(result["logits_per_image"]) == 2 and len(result["pipeline"]) == 2


def test_checkpoints_load_without_unpickling(short_run):
    """Every checkpoint file is safetensors, JSON, or loads with torch.load(weights_only=True) (accelerate's loader,
    which allows numpy's RNG state); nothing is registered for accelerate's pickled custom checkpoints."""
    import torch
    from accelerate.utils import load as accelerate_load
    from safetensors.torch import load_file

    output_dir, _ = short_run
    checkpoint = output_dir / "checkpoints" / "step_6"
    names = sorted(path.name for path in checkpoint.iterdir())
    assert "model.safetensors" in names and "training_progress.json" in names
    assert not [name for name in names if name.startswith("custom_checkpoint")], names
    for path in checkpoint.iterdir():
        if path.suffix == ".safetensors":
            assert load_file(path)
        elif path.suffix == ".json":
            assert json.loads(path.read_text())["step"] == 6
        else:
            assert accelerate_load(path, map_location="cpu", weights_only=True) is not None, path.name
            if path.suffix == ".bin":
                assert torch.load(path, map_location="cpu", weights_only=True) is not None, path.name


def test_resume_continues_exactly(short_run, tmp_path):
    """A run resumed from its step-3 checkpoint reproduces the uninterrupted run's losses at steps 4-6."""
    output_dir, _ = short_run
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(output_dir / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    shutil.copytree(output_dir / "tokenizer", resumed / "tokenizer")
    completed = run_script(
        ["--max_steps", "6", "--output_dir", str(resumed), "--resume_from_checkpoint", "latest", *FAST]
    )
    assert "Resumed from" in completed.stdout
    uninterrupted, continued = logged_losses(output_dir), logged_losses(resumed)
    assert sorted(continued) == [4, 5, 6]
    for step in (4, 5, 6):
        assert continued[step] == uninterrupted[step], step


def test_two_real_processes_on_cpu(tmp_path):
    output_dir = tmp_path / "two"
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    completed = run_script(
        ["--max_steps", "3", "--output_dir", str(output_dir), "--num_workers", "1", *FAST], launcher=launcher
    )
    assert "2 process(es)" in completed.stdout
    args = json.loads((output_dir / "args.json").read_text())
    assert args["num_processes"] == 2
    assert json.loads((output_dir / "run_summary.json").read_text())["images_seen"] == 3 * 8 * 2


def test_text_model_from_a_local_folder(tmp_path, tokenizer):
    from transformers import BertConfig, BertModel

    bert_dir = tmp_path / "tiny-bert"
    BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=96,
        )
    ).save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)
    output_dir = tmp_path / "with-bert"
    run_script(["--max_steps", "2", "--output_dir", str(output_dir), "--text_model", str(bert_dir), *FAST])
    config = json.loads((output_dir / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 48


@pytest.mark.parametrize("flag", [["--text_model", "some-org/biomedical-bert"], ["--vision_backbone_pretrained"]])
def test_pretrained_towers_fail_clearly_when_offline(flag, tmp_path):
    completed = run_script(["--max_steps", "1", "--output_dir", str(tmp_path / "x"), *flag, *FAST], check=False)
    assert completed.returncode != 0
    assert "Without network access" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_upload_without_network_keeps_the_model_and_never_shows_the_token(tmp_path):
    output_dir = tmp_path / "upload"
    completed = run_script(
        [
            "--max_steps",
            "2",
            "--output_dir",
            str(output_dir),
            "--push_to_hub",
            "--hub_model_id",
            "someone/medmoe-test",
            "--checkpointing_steps",
            "1",
            *FAST,
        ],
        check=False,
        extra_environment={"HF_TOKEN": FAKE_TOKEN},
    )
    assert (output_dir / "checkpoints" / "step_2" / "training_progress.json").is_file()
    assert_upload_failed_keeping_the_result_and_hiding_the_token(completed, output_dir, "model.safetensors")


def test_bf16_autocast_runs_on_cpu(tmp_path):
    output_dir = tmp_path / "bf16"
    run_script(["--max_steps", "2", "--mixed_precision", "bf16", "--output_dir", str(output_dir), *FAST])
    assert json.loads((output_dir / "args.json").read_text())["mixed_precision"] == "bf16"
    assert all(math.isfinite(loss) for loss in logged_losses(output_dir).values())


def test_profile_steps_attribute_a_steps_time_to_its_components(tmp_path):
    output_dir = tmp_path / "profiled"
    completed = run_script(["--max_steps", "7", "--profile_steps", "2", "--output_dir", str(output_dir), *FAST])
    assert "Training step profile: steps 6-7" in completed.stdout + completed.stderr
    profile = json.loads((output_dir / "profile.json").read_text())
    components = profile["components"]
    for component in ("Swin backbone (4-scale pyramid)", "text tower", "local loss", "optimizer (clip + AdamW)"):
        assert components[component]["forward"] > 0, component
    for component in ("Swin backbone (4-scale pyramid)", "text tower", "local loss"):
        assert components[component]["backward"] > 0, component  # backward time reaches the forward's component
    total = sum(sum(parts.values()) for parts in components.values())
    assert abs(total - profile["ms_per_step"]) < 1e-6 * total
    assert "| component |" in (output_dir / "profile.md").read_text()


def test_sigkill_then_resume_latest_matches_the_uninterrupted_run(short_run, tmp_path):
    """Kill -9 a run once its step-3 checkpoint exists (a half-written checkpoint folder is left beside it), then
    `--resume_from_checkpoint latest`: steps 4-6 reproduce the uninterrupted run's losses exactly."""

    uninterrupted_dir, _ = short_run
    output_dir = tmp_path / "killed"
    arguments = [
        "--max_steps",
        "6",
        "--checkpointing_steps",
        "3",
        "--output_dir",
        str(output_dir),
        *FAST,
        "--tokenizer",
        str(uninterrupted_dir / "tokenizer"),
    ]  # the learnt vocabulary may differ on ties
    kill_once_checkpointed("pretrain.py", arguments, output_dir / "checkpoints" / "step_3")
    (output_dir / "checkpoints" / ".tmp_step_6").mkdir(exist_ok=True)  # what a kill during a save leaves
    (output_dir / "checkpoints" / ".tmp_step_6" / "model.safetensors").write_bytes(b"partial")
    run_script([*arguments, "--resume_from_checkpoint", "latest"])
    resumed, uninterrupted = logged_losses(output_dir), logged_losses(uninterrupted_dir)
    for step in (4, 5, 6):
        assert resumed[step] == uninterrupted[step], step


def test_pretraining_on_parquet_files_without_eval_files(tmp_path):
    from medmoe.training.synthetic import synthetic_stream

    from .test_data import write_parquet

    write_parquet(list(synthetic_stream(num_shards=1, rows_per_shard=40, image_size=48)), tmp_path / "train.parquet")
    output_dir = tmp_path / "files"
    completed = run_script(
        ["--max_steps", "2", "--train_files", str(tmp_path / "*.parquet"), "--output_dir", str(output_dir), *FAST]
    )
    assert "No held-out evaluation" in completed.stdout and "text column 'caption'" in completed.stdout
    assert (output_dir / "model.safetensors").is_file()


def test_held_out_figures_equal_the_evaluation_cli_on_the_same_rows(short_run, tmp_path):
    """Pretraining's held-out check and the evaluation CLI are one code path: same model, same rows, same R@K."""
    from medmoe.training import run_evaluation

    output_dir, _ = short_run
    held_out = json.loads((output_dir / "eval_results.json").read_text())
    arguments = ["--model", str(output_dir), "--output_dir", str(tmp_path), "--tasks", "retrieval,routing"]
    cli = run_evaluation.main(
        [*arguments, "--max_eval_samples", "16", "--per_device_eval_batch_size", "5", "--num_workers", "0"]
    )
    assert held_out["num_samples"] == cli["num_samples"] == 16
    assert held_out["details"]["retrieval"] == cli["details"]["retrieval"]
    names = [name for name in cli["metrics"] if name.startswith(("retrieval/", "routing/"))]
    assert len(names) == 18
    for name in names:
        assert held_out["metrics"][name] == pytest.approx(cli["metrics"][name], abs=1e-6), name


def test_card_states_what_happened_in_a_run_stopped_by_the_budget(tmp_path):
    """Steps actually trained, the evaluation pool, the backbone as built, and the data by name, never by path."""
    from medmoe.training.synthetic import synthetic_stream
    from modeling_medmoe import MedMoEConfig

    from .test_data import write_parquet

    private = tmp_path / "st-elsewhere-hospital" / "realmed-like"
    rows = list(synthetic_stream(num_shards=1, rows_per_shard=48, image_size=48))
    write_parquet(rows[:32], private / "data" / "train-0000.parquet")
    write_parquet(rows[32:], private / "data" / "eval-0000.parquet")
    output_dir = tmp_path / "out"
    budget = [*FAST, "--max_steps", "50", "--max_train_minutes", "0.0001", "--router_loss_weight", "2"]
    files = ["--train_files", str(private / "data" / "train-*.parquet")]
    files += ["--eval_files", str(private / "data" / "eval-*.parquet")]
    completed = run_script([*files, "--output_dir", str(output_dir), *budget])
    summary = json.loads((output_dir / "run_summary.json").read_text())
    assert summary["steps"] == 1 and summary["train_seconds"] > 0 and summary["parameters"] > 1e6
    assert "routing purity" in completed.stdout, "the final evaluation still runs"
    model_dir = output_dir
    assert json.loads((model_dir / "config.json").read_text())["router_loss_weight"] == 2
    card = (model_dir / "README.md").read_text()
    assert "| steps trained | 1 (stopped by the 0.0001-minute budget" in card
    assert "the retrieval pool is the first 16 rows of the split" in card
    backbone = MedMoEConfig.from_preset("nano").vision_config
    built = card.split("fuses a 4-level ")[1].split(" feature pyramid")[0]
    assert built.startswith(f"`{backbone.backbone}` (") and built.endswith(") at 64 px")
    assert "embed_dim=32" in built and "depths=[1, 1, 2, 1]" in built
    assert "| data | local dataset |" in card and "`local dataset`, split `eval`" in card
    for name in ("README.md", "args.json", "eval_results.json", "config.json"):
        text = (model_dir / name).read_text()
        for folder in ("st-elsewhere-hospital", "realmed-like"):  # the data's folders (the model's own path may appear)
            assert folder not in text, name


def test_local_data_is_named_on_cards_only_as_the_user_chooses(tmp_path):
    from medmoe.training.evaluation_metrics import dataset_description, public_dataset_name

    folder = tmp_path / "st-elsewhere-oncology"
    folder.mkdir()
    assert public_dataset_name(str(folder)) == "local dataset"
    assert public_dataset_name("synthetic", str(folder / "*.parquet")) == "local dataset"
    assert public_dataset_name(str(folder), card_name="oncology-reports-2024") == "oncology-reports-2024"
    assert public_dataset_name("org/public-set") == "org/public-set" and public_dataset_name("synthetic") == "synthetic"
    described = dataset_description(str(folder), None, "eval", "oncology-reports-2024")
    assert described == {"name": "oncology-reports-2024", "type": "oncology-reports-2024", "split": "eval"}


def test_config_overrides_reach_the_sub_configs_and_refuse_unknown_keys():
    from medmoe.training.pretrain import apply_config_overrides, parse_args

    config = MedMoEConfig.from_preset("small")
    apply_config_overrides(config, "vision_config.router_levels=all, text_config.num_hidden_layers=4,projection_dim=64")
    assert (config.vision_config.router_levels, config.text_config.num_hidden_layers) == ("all", 4)
    assert config.projection_dim == 64
    for bad, message in [
        ("vision_config.router_levels=both", "router_levels must be"),
        ("vision_config.no_such_key=1", "a key the config has"),
        ("nothing.key=1", "names no sub-config"),
        ("projection_dim", "KEY=VALUE"),
    ]:
        with pytest.raises(ValueError, match=message):
            apply_config_overrides(MedMoEConfig.from_preset("small"), bad)
    with pytest.raises(SystemExit):  # argparse's error, before any work
        parse_args(["--preset", "small", "--config_overrides", "text_config.hidden_size=wide"])


def test_a_folder_dataset_with_relative_jsonl_image_paths_trains(tmp_path):
    folder = tmp_path / "dataset"
    (folder / "images").mkdir(parents=True)
    rows = []
    for index in range(12):
        (folder / "images" / f"{index}.png").write_bytes(png_bytes(seed=index))
        rows.append({"image": f"images/{index}.png", "text": f"Axial CT of the abdomen, study {index}."})
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    output_dir = tmp_path / "out"
    completed = run_script(["--dataset_name", str(folder), "--max_steps", "2", "--output_dir", str(output_dir),
                            *FAST, "--tokenizer_training_rows", "12"], timeout=300)  # fmt: skip
    assert json.loads((output_dir / "run_summary.json").read_text())["steps"] == 2, completed.stdout


def test_resume_latest_falls_back_past_a_damaged_checkpoint(short_run, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(short_run[0], output_dir)
    newest = output_dir / "checkpoints" / "step_6" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    (output_dir / "checkpoints" / ".tmp_step_9").mkdir()  # a write cut short
    completed = run_script(["--max_steps", "6", "--checkpointing_steps", "3", "--output_dir", str(output_dir),
                            "--resume_from_checkpoint", "latest", *FAST])  # fmt: skip
    assert "Skipping checkpoint" in completed.stdout + completed.stderr and "step_6" in completed.stdout
    assert "Resumed from" in completed.stdout and "step_3 at step 3" in completed.stdout
    assert not (output_dir / "checkpoints" / ".tmp_step_9").exists()
    logged = [json.loads(line)["step"] for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    assert logged == sorted(set(logged)) == [1, 2, 3, 4, 5, 6]
    assert logged_losses(output_dir) == pytest.approx(logged_losses(short_run[0]), abs=1e-5)


def test_a_resume_with_no_loadable_checkpoint_names_each(short_run, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(short_run[0], output_dir)
    for step in (3, 6):
        (output_dir / "checkpoints" / f"step_{step}" / "model.safetensors").write_bytes(b"")
    completed = run_script(["--max_steps", "6", "--output_dir", str(output_dir), "--resume_from_checkpoint",
                            "latest", *FAST], check=False)  # fmt: skip
    assert completed.returncode != 0 and "No checkpoint could be loaded" in completed.stderr
    assert "step_6" in completed.stderr and "step_3" in completed.stderr and "Traceback" not in completed.stderr
