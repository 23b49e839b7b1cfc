"""Fetch transformers' common test files for the installed version from the package index (its sdist):

    python -m tests.transformers_common.fetch

Downloads transformers-VERSION.tar.gz with pip (about 11 MB) into a temporary folder and keeps only
tests/test_modeling_common.py, test_configuration_common.py and test_processing_common.py in the cache folder
(tests/transformers_common/__init__.py). Does nothing when they are already there.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

from tests.transformers_common import COMMON_FILES, cache_folder, missing_reason


def main() -> None:
    folder = cache_folder()
    if missing_reason() is None:
        print(f"transformers {transformers.__version__}'s common tests: {folder} (already there)")
        return
    version = transformers.__version__
    with tempfile.TemporaryDirectory() as download:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"transformers=={version}", "--dest", download], check=True)  # fmt: skip
        [sdist] = Path(download).glob("transformers-*.tar.gz")
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as archive:
            for name in COMMON_FILES:
                member = archive.extractfile(f"transformers-{version}/tests/{name}")
                (folder / name).write_bytes(member.read())
    print(f"transformers {version}'s common tests: {folder}")


if __name__ == "__main__":
    main()
