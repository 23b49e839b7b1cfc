"""Imports run one way: the model package (modeling_medmoe) imports none of the others; training's modules import the
model package; the model card and archive tools import both; training's scripts (pretrain, finetune, run_evaluation,
export) import all of these but the archive tools; benchmarks may import anything. Within the project no module
imports itself back through others (no import circle), lazy imports inside functions included."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {  # folder -> its layer (the import name it installs under)
    "modeling_medmoe": "modeling_medmoe",
    "training": "medmoe.training",
    "medmoe_archive": "medmoe_archive",
    "model_card": "medmoe.model_card",
    "benchmarks": "benchmarks",
}
TRAINING_SCRIPTS = {f"medmoe.training.{name}" for name in ("pretrain", "finetune", "run_evaluation", "export")}
MAY_IMPORT = {  # layer -> the layers below it that it may import (besides itself)
    "modeling_medmoe": set(),
    "medmoe.training": {"modeling_medmoe"},
    "medmoe.model_card": {"modeling_medmoe", "medmoe.training"},
    "medmoe_archive": {"modeling_medmoe", "medmoe.training"},
    "training scripts": {"modeling_medmoe", "medmoe.training", "medmoe.model_card"},
    "benchmarks": {"modeling_medmoe", "medmoe.training", "medmoe.model_card", "medmoe_archive", "training scripts"},
}


def project_modules() -> dict[str, Path]:
    """Import name -> file, for every module of the folders above (training/metrics/* are loaded by path: left out)."""
    modules = {}
    for folder, layer in FOLDERS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = layer if path.stem == "__init__" else f"{layer}.{path.stem}"
            modules[name] = path
    return modules


def imported_project_modules(path: Path, modules: dict[str, Path], name: str) -> set[str]:
    """The project modules `path` imports anywhere in its body (relative imports resolved against `name`)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def layer_of(module: str) -> str:
    if module in TRAINING_SCRIPTS:
        return "training scripts"
    return next(layer for layer in FOLDERS.values() if module == layer or module.startswith(f"{layer}."))


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_project_modules(path, modules, name) for name, path in modules.items()}


def test_every_import_runs_down_the_layers(graph):
    upward = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target) != layer_of(module) and layer_of(target) not in MAY_IMPORT[layer_of(module)]
    ]
    assert upward == []


def test_no_module_imports_itself_back(graph):
    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for target in graph[start]:
            if target == goal or (target not in seen and reaches(target, goal, seen | {target})):
                return True
        return False

    assert [module for module in graph if reaches(module, module, set())] == []
