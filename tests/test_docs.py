"""The README and the guides in docs/ stay readable and true: a short front page, lines a terminal shows, links that
lead somewhere, no issue numbers, and every command they give parses with its script's own parser (a renamed or
removed flag fails here)."""

import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = {  # how a command names a script -> the module whose parse_args reads its flags
    "training/pretrain.py": "medmoe.training.pretrain",
    "training/run_evaluation.py": "medmoe.training.run_evaluation",
    "training/finetune.py": "medmoe.training.finetune",
    "training/export.py": "medmoe.training.export",
    "medmoe-index": "medmoe_archive.index",
    "medmoe-search": "medmoe_archive.search",
    "medmoe-classify": "medmoe_archive.classify",
    "medmoe-search-page": "medmoe_archive.app",
    **{
        f"benchmarks.{path.stem}": f"benchmarks.{path.stem}"  # python -m benchmarks.NAME
        for path in (ROOT / "benchmarks").glob("*.py")
        if "def parse_args(argv" in path.read_text()
    },
}
SCRIPTS.update(
    {module: module for module in list(SCRIPTS.values()) if module.startswith(("medmoe.", "medmoe_archive."))}
)  # -m


def shell_commands(text: str) -> list[str]:
    """The commands of a document's bash blocks: continuation lines joined, comments dropped, `&&` chains split."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                commands.extend(part.strip() for part in line.split("&&"))
    return commands


def script_invocations() -> list[tuple[str, str, list[str]]]:
    """(document, script, its arguments) for every command of README and docs/ that runs one of SCRIPTS."""
    found = []
    for document in DOCUMENTS:
        for command in shell_commands(document.read_text()):
            words = shlex.split(command)
            for position, word in enumerate(words):
                if word in SCRIPTS:
                    found.append((document.name, word, words[position + 1 :]))
                    break
    return found


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    linked = re.findall(r"\]\((docs/[^)]+\.md)\)", "\n".join(lines))
    assert {Path(path).name for path in linked} == {path.name for path in DOCUMENTS[1:]}  # every guide, no more


@pytest.mark.parametrize("document", [*DOCUMENTS, ROOT / "BENCHMARKS.md"], ids=lambda path: path.name)
def test_lines_fit_a_terminal_and_name_no_issue(document):
    text = document.read_text()
    if document.name != "BENCHMARKS.md":  # its measured tables keep their columns
        assert [number for number, line in enumerate(text.splitlines(), 1) if len(line) > 120] == []
    assert re.findall(r"(?<![\w&])#\d+", text) == [], "the documents name no issue numbers"
    for target in re.findall(r"\]\(((?:docs/)?[\w./-]+\.(?:md|png))\)", text):
        assert (document.parent / target).exists() or (ROOT / target).exists(), target


def test_the_documents_give_commands_for_each_script():
    named = {script for _, script, _ in script_invocations()}
    assert {"training/pretrain.py", "training/run_evaluation.py", "training/finetune.py", "medmoe-index",
            "medmoe-search"} <= named  # fmt: skip


@pytest.mark.parametrize(
    "document, script, arguments", script_invocations(), ids=lambda value: value if isinstance(value, str) else ""
)
def test_every_documented_command_parses(document, script, arguments):
    parse_args = importlib.import_module(SCRIPTS[script]).parse_args
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as errors:
        try:
            parse_args(arguments)
        except SystemExit as exit:
            assert exit.code == 0, f"{document}: {script} {' '.join(arguments)}\n{errors.getvalue()}"


def test_the_air_gap_wheelhouse_holds_every_extra_the_tools_use():
    """docs/offline.md's two commands name the same extras: every extra of pyproject.toml a user runs inside
    (all but the test tools and the demo, whose gradio pins Pillow)."""
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    offline = (ROOT / "docs" / "offline.md").read_text()
    built = re.search(r'pip wheel -w wheels "\.\[([a-z,]+)\]"', offline)
    installed = re.search(r'pip install --no-index --find-links wheels "medmoe\[([a-z,]+)\]"', offline)
    assert built and installed
    assert set(built.group(1).split(",")) == set(installed.group(1).split(",")) == extras - {"dev", "demo"}
