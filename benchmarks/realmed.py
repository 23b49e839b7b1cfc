"""Real-data benchmark: MedMoE (and its ablations) vs open_clip on realmed, each sized to the same wall-clock budget.

Every system trains on realmed's train rows outside a validation split carved from them (about 10% of the source
cases and patients, by a hash of realmed's `group` column, so rows of one case or patient stay on one side) and is
scored on that validation split (--score_on validation, for every screen and choice) and, for the final table only,
on realmed's eval split (--score_on validation,eval: the same trained models scored on both). The MedMoE runs train
the number of steps a calibration sized (images/s x budget, recorded in OUT/SYSTEM/scheduled_steps.txt; later seeds
of a system reuse its first seed's), not until a clock runs out (--clock_stop for that).

    python -m benchmarks.realmed --data ../shared/datasets/realmed --minutes 12      # screens, on validation
    python -m benchmarks.realmed --systems medmoe,open_clip_train --seeds 42,43,44 --minutes 12 \
        --score_on eval --output_dir outputs/benchmark-realmed-final   # the final table (2026-12-02, ~90 min)

Every MedMoE system and the equal-size open_clip train on the realmed train split (same rows, tokens, 128-px images,
batch of 64, learning rate 2e-3, schedule, half the reports cut to one sentence) for the steps --minutes of training
on this machine allows: a short calibration run per system measures its images/s, and the cosine schedule is that
many steps long. open_clip_train is the peer anchor
(../shared/anchors/open_clip_train_realmed.md): open_clip's own training CLI with its own recipe, tokenizer and
transforms, stopped at the same budget (benchmarks/open_clip_train_anchor.py). All are scored by
training/run_evaluation.py on each scored split: strict R@1/5/10 both ways (ties broken at random) and text-match R@K
(pool: the eval split), zero-shot modality accuracy and balanced accuracy with the anchor's neutral prompts
(benchmarks/configs/) and with the project's own, routing purity and NMI vs modality, linear-probe accuracy on modality
and on label.

Systems: medmoe (the `small` preset as training/pretrain.py runs it: global loss only, report types read from the
report text, one expert per modality of the train split (a user knows which modalities an archive holds), as every
MedMoE system unless it sets its own experts), modality_labels (the ablation that trains the routers on realmed's
`modality` column, the column zero-shot accuracy and purity are scored against: never the headline), medmoe_seed43
(the same as medmoe, a second seed),
single_expert (the uniform feature path: one expert, no router, no report-type loss), unsupervised_router (the experts
with no report-type loss: nothing supervises the router), preset_experts (the preset's six experts, the paper's
modalities), local_loss_on, local_loss_0.25,
router_text_teacher, expert_depth_3, router_last_level (the paper's router, on the coarsest level only), text_tower_256
(the anchor's text width and depth), no_sentence_sampling (each changes one thing), open_clip (random-init CLIP of about
the same size; see benchmarks/open_clip_baseline.py) and open_clip_train, both in a separate virtual environment this
script creates with `open_clip_torch` (and the CLI's webdataset and braceexpand). Writes OUT/data (the carved
splits), OUT/SYSTEM/ for each run (its scores in OUT/SYSTEM/run/scored_on_SPLIT), OUT/summary.json and OUT/table.md
(a table per scored split), and prints the table and, when medmoe and open_clip both ran, JSON with
pretrain_medmoe_vs_open_clip_images_per_s (training images/s, the median logged window after the first, at about equal
parameters; the table's images/s is the whole budget's, start-up and in-loop evaluation included). A system that already
finished in OUT is reused (delete OUT/SYSTEM to rerun it). When --data does not hold realmed, it says so and exits 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import venv
from pathlib import Path

import pyarrow
import pyarrow.parquet as parquet

from benchmarks.common import print_json
from modeling_medmoe.configuration_medmoe import DEFAULT_EXPERT_NAMES

REPO = Path(__file__).resolve().parents[1]

MEDMOE_SYSTEMS = {  # every MedMoE system reads report types from the report text, as the paper does
    "medmoe": [],
    "modality_labels": ["--report_type_column", "modality"],  # ablation: the scored modality column as labels
    "medmoe_seed43": ["--seed", "43"],  # the same system, a second seed
    "single_expert": ["--num_experts", "1"],  # the uniform feature path: one expert, no router, no report types
    # experts whose router nothing supervises (no report-type losses): the paper's ablation of the supervision
    "unsupervised_router": ["--config_overrides", "report_type_loss_weight=0,router_loss_weight=0"],
    "local_loss_on": ["--local_loss_weight", "1"],
    "local_loss_0.25": ["--local_loss_weight", "0.25"],
    "router_text_teacher": ["--router_input", "text_teacher"],
    "expert_depth_3": ["--expert_depth", "3"],
    "preset_experts": ["--expert_names", ",".join(DEFAULT_EXPERT_NAMES)],  # `small`'s six (the paper's modalities)
    "no_sentence_sampling": ["--sentence_sampling", "0"],
    "router_last_level": ["--config_overrides", "vision_config.router_levels=last"],  # the paper's router
    "text_tower_256": [  # the anchor's text width and depth
        "--config_overrides",
        "text_config.hidden_size=256,text_config.num_hidden_layers=4,text_config.num_attention_heads=4,"
        "text_config.intermediate_size=1024",
    ],
}
SYSTEMS = (*MEDMOE_SYSTEMS, "open_clip", "open_clip_train")
DATA_EXPERTS = ["--expert_names", "{train_modalities}"]  # one expert per modality of the train split (section 5)
RECIPE_PACKAGES = ["webdataset>=0.2.5,<=0.2.86", "braceexpand"]  # what open_clip_train.main imports beyond open_clip
RUN_DIR = "run"  # OUT/SYSTEM/run: the system's training run (for MedMoE, the model folder pretrain.py writes)
EVAL_TASKS = "zero_shot,retrieval,linear_probe,routing"
ANCHOR_PROMPTS = [  # the anchor's neutral prompt ensemble (../shared/anchors/open_clip_train_realmed.md)
    "--templates", "benchmarks/configs/anchor_prompt_templates.txt",
    "--class_phrases", "benchmarks/configs/anchor_class_phrases.json",
]  # fmt: skip
ANCHOR_PROMPT_EVAL = "anchor_prompts"  # OUT/SYSTEM/run/scored_on_SPLIT/anchor_prompts: zero-shot with those prompts
SCORED_SPLITS = ("validation", "eval")
TABLE_COLUMNS = (  # (heading, metric; anchor/ = zero-shot with the anchor's prompts), the anchor's figures first
    ("i→t R@1", "retrieval/image_to_text_R@1"),
    ("i→t R@5", "retrieval/image_to_text_R@5"),
    ("i→t R@10", "retrieval/image_to_text_R@10"),
    ("t→i R@1", "retrieval/text_to_image_R@1"),
    ("t→i R@5", "retrieval/text_to_image_R@5"),
    ("t→i R@10", "retrieval/text_to_image_R@10"),
    ("text-match i→t R@10", "retrieval/image_to_text_text_match_R@10"),
    ("text-match t→i R@1", "retrieval/text_to_image_text_match_R@1"),
    ("text-match t→i R@5", "retrieval/text_to_image_text_match_R@5"),
    ("text-match t→i R@10", "retrieval/text_to_image_text_match_R@10"),
    ("zero-shot acc", "anchor/zero_shot/accuracy"),
    ("zero-shot balanced", "anchor/zero_shot/mean_per_class_accuracy"),
    ("own prompts acc", "zero_shot/accuracy"),
    ("own prompts balanced", "zero_shot/mean_per_class_accuracy"),
    ("routing purity", "routing/purity"),
    ("routing NMI", "routing/nmi"),
    ("probe modality", "linear_probe/accuracy_100%"),
    ("probe label", "linear_probe_label/accuracy_100%"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/datasets/realmed", help="realmed folder")
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget per system")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/benchmark-realmed"))
    parser.add_argument("--batch_size", type=int, default=64, help="the anchor's (screened: BENCHMARKS.md section 5)")
    parser.add_argument("--max_length", type=int, default=48, help="report tokens (realmed's reports are short)")
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="screened against 1e-3 at batch 64")
    parser.add_argument(
        "--sentence_sampling", type=float, default=0.5, help="share of training reports cut to one sentence"
    )
    parser.add_argument(
        "--seed", type=int, default=42, help="seed of the MedMoE systems (medmoe_seed43 keeps its own: 43)"
    )
    parser.add_argument(
        "--seeds",
        help="comma-separated seeds: every MedMoE system and the anchor run once per seed (as SYSTEM@SEED), and the "
        "table gives mean ± standard deviation, ahead or behind the anchor only beyond the larger deviation",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="train every MedMoE system this many steps (no calibration): the systems compared at equal steps",
    )
    parser.add_argument(
        "--calibration_steps",
        type=int,
        default=100,
        help="steps timed to size each schedule (about two passes over the train rows: the passes' starts are slow)",
    )
    parser.add_argument(
        "--score_on",
        default="validation",
        help="comma-separated splits the trained models are scored on: validation (carved from the train rows, for "
        "screens and choices) and eval (realmed's eval split, for the final table only)",
    )
    parser.add_argument("--validation_share", type=float, default=0.1, help="share of train groups held out")
    parser.add_argument(
        "--clock_stop",
        action="store_true",
        help="also stop the MedMoE runs at the --minutes budget (by default they train the calibrated steps, so "
        "that a run's result does not depend on what else the machine was doing)",
    )
    parser.add_argument("--open_clip_venv", type=Path, default=REPO / ".venv-open_clip")
    parser.add_argument("--num_workers", type=int, default=2)
    args = parser.parse_args(argv)
    args.systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    args.seeds = [int(seed) for seed in args.seeds.split(",")] if args.seeds else None
    args.score_on = [split.strip() for split in args.score_on.split(",") if split.strip()]
    if not args.score_on or set(args.score_on) - set(SCORED_SPLITS):
        parser.error(f"--score_on takes a comma-separated subset of {','.join(SCORED_SPLITS)}")
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    if "open_clip" in args.systems and not set(args.systems) & set(MEDMOE_SYSTEMS):
        parser.error("open_clip reads the tokenizer a MedMoE run learns: include at least one MedMoE system")
    return args


SPLIT_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: validation
    path: data/validation-*.parquet
  - split: eval
    path: data/eval-*.parquet
---
Derived by benchmarks/realmed.py from realmed (not for redistribution): train = {train}; validation = {validation};
eval = realmed's eval split ({eval}).
"""


def in_validation(group: str, share: float) -> bool:
    """Whether a group of rows (a source case or patient) belongs to the validation part: a hash of its name, so
    the split is the same on every machine and every run."""
    return int(hashlib.sha256(group.encode()).hexdigest(), 16) % 10_000 < share * 10_000


def carve_splits(data: Path, output_dir: Path, share: float) -> Path:
    """A realmed-shaped folder OUT/data whose train split is realmed's train rows outside the validation groups,
    whose validation split is the rows of those groups (for every screen and choice) and whose eval split is
    realmed's own (the final table only). Rows of one group (realmed's `group` column: a MedPix case, a patient, an
    image; the report text where there is no such column) stay on one side."""
    folder = output_dir / "data"
    if (folder / "README.md").is_file():
        return folder
    (folder / "data").mkdir(parents=True, exist_ok=True)
    train = pyarrow.concat_tables(
        [parquet.read_table(file) for file in sorted((data / "data").glob("train-*.parquet"))]
    )
    groups = train.column("group" if "group" in train.column_names else "text").to_pylist()
    validation = [in_validation(str(group), share) for group in groups]
    splits = {
        "train": train.filter(pyarrow.array([not held for held in validation])),
        "validation": train.filter(pyarrow.array(validation)),
        "eval": read_split(data, "eval"),
    }
    for split, rows in splits.items():
        parquet.write_table(rows, folder / "data" / f"{split}-0000-of-0001.parquet")
    described = {
        "train": f"{splits['train'].num_rows} of realmed's train rows, outside the validation groups",
        "validation": f"the other {splits['validation'].num_rows}",
        "eval": f"{splits['eval'].num_rows} rows",
    }
    (folder / "README.md").write_text(SPLIT_CARD.format(**described))  # written last: the folder is complete
    return folder


def read_split(data: Path, split: str):
    return pyarrow.concat_tables(
        [parquet.read_table(file) for file in sorted((data / "data").glob(f"{split}-*.parquet"))]
    )


def realmed_present(folder: Path) -> bool:
    data = folder / "data"
    return any(data.glob("train-*.parquet")) and any(data.glob("eval-*.parquet"))


def train_modalities(folder: Path) -> list[str]:
    """The modalities of realmed's train split (its `modality` column), the preset's expert order first."""
    present = set()
    for file in sorted((folder / "data").glob("train-*.parquet")):
        present.update(parquet.read_table(file, columns=["modality"])["modality"].to_pylist())
    known = [name for name in DEFAULT_EXPERT_NAMES if name in present]
    return known + sorted(present - set(known) - {None})


def run(command: list[str], log: Path) -> None:
    """Run a step with its output in `log` (and a clear failure naming the log)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as handle:
        finished = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if finished.returncode != 0:
        sys.exit(f"failed ({finished.returncode}): {' '.join(command)}\n  see {log}")


def images_per_second(train_log: Path) -> float:
    """Throughput after start-up: the logging windows after the first, time-weighted (their harmonic mean), so that
    the slow windows where the stream starts another pass over the data count as much as they last."""
    records = [json.loads(line) for line in train_log.read_text().splitlines()]
    return statistics.harmonic_mean([record["images_per_s"] for record in records[1:] or records])


def schedule_steps(args, train_log: Path) -> int:
    """Steps of the budget: calibrated images/s x --minutes / batch, never fewer than the calibration's own."""
    return max(args.calibration_steps, int(args.minutes * 60 * images_per_second(train_log) / args.batch_size))


def logging_steps(args) -> int:
    """Steps per logged images/s window: three windows in a calibration run, at most 10 steps."""
    return min(10, max(1, args.calibration_steps // 3))


def pretrain_command(args, output_dir: Path, extra: list[str], max_steps: int, minutes: float | None) -> list[str]:
    """training/pretrain.py for a MedMoE system: the benchmark's recipe, experts named after the train split's
    modalities unless the system sets its own experts, then the system's EXTRA arguments."""
    if not {"--num_experts", "--expert_names"} & set(extra):
        extra = [*DATA_EXPERTS, *extra]
    if any("{train_modalities}" in argument for argument in extra):  # read the train split once, and only then
        modalities = ",".join(train_modalities(args.data))
        extra = [argument.format(train_modalities=modalities) for argument in extra]
    command = [
        sys.executable, "training/pretrain.py", "--dataset_name", str(args.data), "--preset", "small",
        "--per_device_train_batch_size", str(args.batch_size),
        "--max_length", str(args.max_length), "--learning_rate", str(args.learning_rate),
        "--sentence_sampling", str(args.sentence_sampling), "--warmup_steps", str(max(1, max_steps // 10)),
        "--max_steps", str(max_steps), "--eval_steps", "0", "--logging_steps", str(logging_steps(args)),
        "--report_to", "none", "--num_workers", str(args.num_workers), "--output_dir", str(output_dir),
        "--eval_split", "validation",
        "--overwrite_output_dir", "--seed", str(args.seed), *extra,
    ]  # fmt: skip
    return command + (["--max_train_minutes", str(minutes)] if minutes else [])


def scores_folder(run_folder: Path, split: str) -> Path:
    """Where a run's scores on `split` go: RUN/scored_on_SPLIT (and the anchor's prompts in its anchor_prompts/)."""
    return run_folder / f"scored_on_{split}"


def finished_record(args, name: str, split: str) -> dict | None:
    """The record of a system that already ran in OUT and was scored on `split` (delete OUT/SYSTEM to rerun it)."""
    folder = args.output_dir / name
    scores = scores_folder(folder / RUN_DIR, split)
    results = scores / "results.json"
    if not results.is_file() or not (folder / "scheduled_steps.txt").is_file():
        return None
    summary = json.loads((folder / RUN_DIR / "run_summary.json").read_text())
    metrics = json.loads(results.read_text())["metrics"]
    anchor_results = scores / ANCHOR_PROMPT_EVAL / "results.json"
    if anchor_results.is_file():
        metrics.update({f"anchor/{k}": v for k, v in json.loads(anchor_results.read_text())["metrics"].items()})
    steady = steady_images_per_second(folder / RUN_DIR / "train_log.jsonl")
    return record(name, summary, metrics, int((folder / "scheduled_steps.txt").read_text()), steady)


def trained(folder: Path) -> bool:
    """Whether OUT/SYSTEM holds a finished training run (then it is scored, never trained again)."""
    return (folder / "scheduled_steps.txt").is_file() and (folder / RUN_DIR / "run_summary.json").is_file()


def unscored_splits(args, name: str) -> list[str]:
    return [
        split
        for split in args.score_on
        if not (scores_folder(args.output_dir / name / RUN_DIR, split) / "results.json").is_file()
    ]


def seeded(name: str) -> tuple[str, list[str]]:
    """A run name SYSTEM or SYSTEM@SEED -> (the system, the arguments that set its seed)."""
    system, _, seed = name.partition("@")
    return system, ["--seed", seed] if seed else []


def calibrated_steps(args, name: str, extra: list[str]) -> int:
    """The schedule's steps for run NAME: --steps when given; else another seed's of the same system when one has
    trained in OUT (every seed of a system trains the same schedule, sized once on a quiet machine), else a
    calibration run's."""
    if args.steps:
        return args.steps
    system, _ = seeded(name)
    for steps_file in sorted(args.output_dir.glob(f"{system}@*/scheduled_steps.txt")):
        print(f"[{name}] the schedule of {steps_file.parent.name}: {steps_file.read_text().strip()} steps")
        return int(steps_file.read_text())
    folder = args.output_dir / name
    print(f"[{name}] calibrating ({args.calibration_steps} steps) ...", flush=True)
    run(
        pretrain_command(args, folder / "calibration", extra, args.calibration_steps, None),
        folder / "calibration.log",
    )
    return schedule_steps(args, folder / "calibration" / "train_log.jsonl")


def run_medmoe(args, name: str) -> None:
    """Calibrate and train for the budget (unless OUT/NAME has trained), then score on every split not yet scored."""
    system, seed_arguments = seeded(name)
    extra = [*MEDMOE_SYSTEMS[system], *seed_arguments]  # argparse keeps the last --seed
    folder = args.output_dir / name
    if trained(folder):
        print(f"[{name}] reusing the trained run in {folder}")
    else:
        steps = calibrated_steps(args, name, extra)
        print(f"[{name}] training: {args.minutes} min budget, schedule of {steps} steps ... (log: {folder}/train.log)")
        minutes = args.minutes if args.clock_stop else None  # by steps: the calibration (on a quiet machine) sized them
        run(pretrain_command(args, folder / RUN_DIR, extra, steps, minutes), folder / "train.log")
        (folder / "scheduled_steps.txt").write_text(f"{steps}\n")
    for split in unscored_splits(args, name):
        print(f"[{name}] scoring on {split} ...", flush=True)
        scores = scores_folder(folder / RUN_DIR, split)
        common = [
            sys.executable, "training/run_evaluation.py", "--model", str(folder / RUN_DIR),
            "--dataset_name", str(args.data), "--eval_split", split, "--num_workers", str(args.num_workers),
        ]  # fmt: skip
        evaluate = [
            *common, "--tasks", EVAL_TASKS, "--probe_columns", "modality,label", "--max_train_samples", "4000",
            "--output_dir", str(scores),
        ]  # fmt: skip
        run(evaluate, folder / f"evaluate_{split}.log")
        anchor_zero_shot = [
            *common,
            "--tasks",
            "zero_shot",
            *ANCHOR_PROMPTS,
            "--output_dir",
            str(scores / ANCHOR_PROMPT_EVAL),
        ]
        run(anchor_zero_shot, folder / f"evaluate_{split}_anchor_prompts.log")


def run_open_clip_train(args, name: str = "open_clip_train") -> None:
    """The anchor: open_clip's own training CLI with the recipe, budget-stopped, scored alike on every split
    (benchmarks/open_clip_train_anchor.py in the open_clip environment); NAME@SEED sets the CLI's seed. Skipped when
    OUT/NAME was scored on every split already."""
    if not unscored_splits(args, name):
        print(f"[{name}] reusing the finished run in {args.output_dir / name}")
        return
    _, seed_arguments = seeded(name)
    folder = args.output_dir / name
    python = open_clip_python(args)
    check = [str(python), "-c", "import webdataset, braceexpand, open_clip_train.main"]
    if subprocess.run(check, capture_output=True).returncode != 0:
        install = [str(python), "-m", "pip", "install", "--quiet", *RECIPE_PACKAGES]
        run(install, folder / "install_recipe.log")
    rescoring = trained(folder)  # the training log stays as it was
    work = "scoring the trained run" if rescoring else f"training for {args.minutes} min of schedule, scoring"
    log = folder / ("score.log" if rescoring else "train.log")
    print(f"[{name}] {work} ... (log: {log})")
    command = [
        str(python), "-m", "benchmarks.open_clip_train_anchor", "--data", str(args.data),
        "--minutes", str(args.minutes),
        "--num_workers", str(args.num_workers), "--output_dir", str(folder / RUN_DIR), *seed_arguments,
        "--score_splits", ",".join(args.score_on),
        *([] if args.clock_stop else ["--no_clock_stop", *anchor_epochs(args)]),
    ]  # fmt: skip
    run(command, log)
    summary = json.loads((folder / RUN_DIR / "run_summary.json").read_text())
    (folder / "scheduled_steps.txt").write_text(f"{summary['steps_scheduled']}\n")


def anchor_epochs(args) -> list[str]:
    """["--epochs", N] from an anchor run that already finished in OUT (its timing run sized N), so that every seed
    trains the same schedule; [] when none has (this run times one epoch itself)."""
    for summary in sorted(args.output_dir.glob(f"open_clip_train*/{RUN_DIR}/run_summary.json")):
        return ["--epochs", str(json.loads(summary.read_text())["epochs_scheduled"])]
    return []


def open_clip_python(args) -> Path:
    """The separate environment's interpreter: a venv that sees this one's packages (torch, transformers) through
    a .pth file and gets open_clip_torch installed into itself; created once."""
    python = args.open_clip_venv / "bin" / "python"
    if not python.exists():
        print(f"[open_clip] creating {args.open_clip_venv} and installing open_clip_torch ...", flush=True)
        venv.create(args.open_clip_venv, with_pip=True)
        site_packages = subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
        parent = [path for path in sys.path if path.endswith("site-packages")]  # with this project's install
        lines = [f"import site; site.addsitedir({path!r})" for path in parent]  # .pth files there count too
        Path(site_packages, "medmoe_parent_environment.pth").write_text("\n".join(lines) + "\n")
    command = [str(python), "-m", "pip", "install", "--quiet", "open_clip_torch"]
    check = [str(python), "-c", "import open_clip"]
    if subprocess.run(check, capture_output=True).returncode != 0:
        run(command, args.output_dir / "open_clip" / "install.log")
    return python


def run_open_clip(args, tokenizer: Path) -> None:
    """The equal-size open_clip: calibrated, trained by benchmarks/open_clip_baseline.py, scored on every split."""
    folder = args.output_dir / "open_clip"
    if not unscored_splits(args, "open_clip"):
        print(f"[open_clip] reusing the finished run in {folder}")
        return
    python = open_clip_python(args)
    common = [
        str(python), "-m", "benchmarks.open_clip_baseline", "--dataset_name", str(args.data),
        "--tokenizer", str(tokenizer), "--per_device_train_batch_size", str(args.batch_size),
        "--max_length", str(args.max_length), "--learning_rate", str(args.learning_rate),
        "--sentence_sampling", str(args.sentence_sampling), "--num_workers", str(args.num_workers),
    ]  # fmt: skip
    print(f"[open_clip] calibrating ({args.calibration_steps} steps) ...", flush=True)
    calibration = [
        "--output_dir", str(folder / "calibration"), "--max_steps", str(args.calibration_steps),
        "--logging_steps", str(logging_steps(args)), "--skip_evaluation",
    ]  # fmt: skip
    run(common + calibration, folder / "calibration.log")
    steps = schedule_steps(args, folder / "calibration" / "train_log.jsonl")
    print(f"[open_clip] training + evaluating: {args.minutes} min budget, schedule of {steps} steps ...", flush=True)
    training = [
        "--output_dir", str(folder / RUN_DIR), "--max_steps", str(steps), "--warmup_steps", str(max(1, steps // 10)),
        "--max_train_minutes", str(args.minutes), "--logging_steps", str(logging_steps(args)),
        "--score_splits", ",".join(args.score_on),
    ]  # fmt: skip
    run(common + training, folder / "train.log")
    (folder / "scheduled_steps.txt").write_text(f"{steps}\n")


def steady_images_per_second(train_log: Path) -> float:
    """Training throughput: the median of the logged windows after the first (no start-up, no evaluation)."""
    records = [json.loads(line) for line in train_log.read_text().splitlines()]
    return statistics.median(record["images_per_s"] for record in records[1:] or records)


def record(name: str, summary: dict, metrics: dict, scheduled_steps: int, steady_images_per_s: float) -> dict:
    return {
        "system": name,
        "parameters": summary["parameters"],
        "scheduled_steps": scheduled_steps,
        "steps": summary["steps"],
        "train_seconds": summary["train_seconds"],
        "images_per_s": summary["images_seen"] / summary["train_seconds"],
        "train_images_per_s": steady_images_per_s,
        "metrics": metrics,
    }


def markdown_table(rows: list[dict], minutes: float) -> str:
    headings = ["system", "params", "budget", "steps", "images/s", *(heading for heading, _ in TABLE_COLUMNS)]
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    for row in rows:
        params = f"{row['parameters'] / 1e6:.2f}M"
        cells = [row["system"], params, f"{minutes:g} min", str(row["steps"]), f"{row['images_per_s']:.1f}"]
        for _, metric in TABLE_COLUMNS:
            value = row["metrics"].get(metric)
            cells.append("–" if value is None else f"{value:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_statistics(rows: list[dict]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """{system: {metric: (mean, standard deviation, runs)}} over the SYSTEM@SEED runs of `rows`."""
    by_system: dict[str, list[dict]] = {}
    for row in rows:
        by_system.setdefault(seeded(row["system"])[0], []).append(row["metrics"])
    statistics_by_system = {}
    for system, runs in by_system.items():
        figures = {}
        for _, metric in TABLE_COLUMNS:
            values = [run[metric] for run in runs if run.get(metric) is not None]
            if values:
                deviation = statistics.stdev(values) if len(values) > 1 else 0.0
                figures[metric] = (statistics.fmean(values), deviation, len(values))
        statistics_by_system[system] = figures
    return statistics_by_system


def verdict(system: tuple[float, float, int], anchor: tuple[float, float, int]) -> str:
    """ahead / behind when the two means differ by more than the larger standard deviation, else level; no call
    ("") while a side has one run, whose deviation is unknown."""
    if min(system[2], anchor[2]) < 2:
        return ""
    margin = max(system[1], anchor[1])
    if system[0] - anchor[0] > margin:
        return "ahead"
    return "behind" if anchor[0] - system[0] > margin else "level"


def seeds_table(rows: list[dict]) -> str:
    """Mean ± standard deviation per system over its seeds, and each system's verdict against the anchor."""
    stats = seed_statistics(rows)
    anchor = stats.get("open_clip_train", {})
    headings = ["system (runs)", *(heading for heading, _ in TABLE_COLUMNS)]
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    for system, figures in stats.items():
        runs = max((count for _, _, count in figures.values()), default=0)
        cells = [f"{system} ({runs})"]
        for _, metric in TABLE_COLUMNS:
            if metric not in figures:
                cells.append("–")
                continue
            mean, deviation, _ = figures[metric]
            call = (
                verdict(figures[metric], anchor[metric]) if anchor.get(metric) and system != "open_clip_train" else ""
            )
            cells.append(f"{mean:.3f} ± {deviation:.3f} {call}".rstrip())
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    args = parse_args(argv)
    if not realmed_present(args.data):
        print(f"realmed not found at {args.data} (no data/train-*.parquet and data/eval-*.parquet); skipping.")
        return {}
    args.output_dir = args.output_dir.resolve()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    args.data = carve_splits(args.data.resolve(), args.output_dir, args.validation_share)
    scored = " and ".join(args.score_on)
    print(f"Training on realmed's train rows outside the validation groups; scoring on {scored} ({args.data}).")
    medmoe_systems = [name for name in args.systems if name in MEDMOE_SYSTEMS]
    medmoe_runs = [f"{name}@{seed}" for name in medmoe_systems for seed in args.seeds] if args.seeds else medmoe_systems
    names = list(medmoe_runs)
    for name in medmoe_runs:
        run_medmoe(args, name)
    if "open_clip" in args.systems:
        run_open_clip(args, args.output_dir / medmoe_runs[0] / RUN_DIR / "tokenizer")
        names.append("open_clip")
    if "open_clip_train" in args.systems:
        anchors = [f"open_clip_train@{seed}" for seed in args.seeds] if args.seeds else ["open_clip_train"]
        for name in anchors:
            run_open_clip_train(args, name)
        names += anchors
    rows = {split: [finished_record(args, name, split) for name in names] for split in args.score_on}
    tables = []
    for split, split_rows in rows.items():
        table = f"## Scored on {split}\n\n" + markdown_table(split_rows, args.minutes)
        tables.append(table + ("\n\n" + seeds_table(split_rows) if args.seeds else ""))
    table = "\n\n".join(tables)
    summary = {"minutes": args.minutes, "seeds": args.seeds, "scored_on": rows}
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.output_dir / "table.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nResults: {args.output_dir}/summary.json and table.md; each system's runs and logs in {args.output_dir}/")
    speed = {row["system"]: row["train_images_per_s"] for row in rows[args.score_on[0]]}
    if "medmoe" in speed and "open_clip" in speed:
        print_json({"pretrain_medmoe_vs_open_clip_images_per_s": speed["medmoe"] / speed["open_clip"]})
    return rows


if __name__ == "__main__":
    main()
