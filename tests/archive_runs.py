"""Run archive commands one after the other in this process, as their console scripts would:

    python -m tests.archive_runs PLAN.json

PLAN.json is a list of [tool, [arguments...]] with tool one of index, search, classify. A command that exits with
an error message prints it and the next one runs; the exit status is the number of commands that failed.
"""

import json
import sys

from medmoe_archive import classify, index, search

TOOLS = {"index": index.main, "search": search.main, "classify": classify.main}


def main(plan_path: str) -> int:
    failed = 0
    for tool, arguments in json.loads(open(plan_path).read()):
        try:
            TOOLS[tool](arguments)
        except SystemExit as stopped:
            if stopped.code not in (None, 0):
                print(f"{tool} exited: {stopped.code}", file=sys.stderr)
                failed += 1
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
