"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`, `ProcessorTesterMixin`), run unchanged on
the MedMoE classes by tests/test_transformers_common.py.

The three files ship in the sdist of the installed transformers version on the package index (not in its wheel):

    python -m tests.transformers_common.fetch      # .ci/run does this; about 11 MB, once per version

keeps them in ~/.cache/medmoe/transformers-common-tests/VERSION (or $MEDMOE_TRANSFORMERS_TESTS). They import four
helpers of transformers' repository that the sdist does not carry; `assemble` puts small stand-ins beside them (see
STAND_INS), so the files themselves run unchanged.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import transformers

COMMON_FILES = ("test_modeling_common.py", "test_configuration_common.py", "test_processing_common.py")
PACKAGE = "transformers_common_tests"
STAND_INS = {
    # ModelTesterMixin inherits the export tests of tests/exporters/ (not in the sdist): none run here;
    # tests/test_transformers_common.py tests torch.export of MedMoE itself.
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    # Only generative models' testers inherit it; the common file checks that a non-generative one does not.
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    # ConfigTester sets every argument of PreTrainedConfig.__init__ to a value other than its default.
    "utils/test_configuration_utils.py": (
        "config_common_kwargs = {\n"
        '    "output_hidden_states": True,\n'
        '    "return_dict": False,\n'
        '    "dtype": "float16",\n'
        '    "chunk_size_feed_forward": 5,\n'
        '    "is_encoder_decoder": True,\n'
        '    "architectures": ["BertModel"],\n'
        '    "problem_type": "regression",\n'
        "}\n"
    ),
}
# test_processing_common puts the repository's utils/ folder on sys.path for this helper, which maps the URLs of its
# chat-template examples to files fetched for transformers' CI; here a URL stays a URL (those tests do not apply).
FETCH_HELPER = "def url_to_local_path(url, return_url_if_not_found=True):\n    return url\n"


def cache_folder() -> Path:
    """Where the fetched files of the installed transformers version are kept."""
    default = Path.home() / ".cache" / "medmoe" / "transformers-common-tests"
    return Path(os.environ.get("MEDMOE_TRANSFORMERS_TESTS") or default) / transformers.__version__


def missing_reason() -> str | None:
    """Why the common tests cannot run here (None when they can)."""
    folder = cache_folder()
    if all((folder / name).is_file() for name in COMMON_FILES):
        return None
    return (
        f"transformers {transformers.__version__}'s common test files are not in {folder}: "
        "python -m tests.transformers_common.fetch"
    )


def assemble(work: Path) -> None:
    """A package `transformers_common_tests` in `work` (the fetched files and the stand-ins), importable."""
    package = work / PACKAGE
    for relative, source in {**dict.fromkeys(COMMON_FILES), **STAND_INS}.items():
        target = package / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source is None:
            shutil.copyfile(cache_folder() / relative, target)
        else:
            target.write_text(source)
        for folder in (target.parent, package):
            (folder / "__init__.py").touch()
    (work / "utils").mkdir(exist_ok=True)
    (work / "utils" / "fetch_hub_objects_for_ci.py").write_text(FETCH_HELPER)
    sys.path.insert(0, str(work))
