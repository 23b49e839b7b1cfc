"""Run archive commands one after the other in this process, as their console scripts would:

    python -m tests.archive_runs PLAN.json

PLAN.json is a list of [tool, [arguments...]] with tool one of index, search, classify, page. A command that exits
with an error message prints it and the next one runs; the exit status is the number of commands that failed.
`page INDEX MODEL OUT TEXT IMAGE` serves the search page (medmoe_archive/app.py, logging as its command does), asks
it what a browser asks (the page, its facets, a text and an image query, the hits' thumbnails) and writes every answer
into the folder OUT.
"""

import base64
import json
import logging
import sys
import urllib.request
from pathlib import Path

from medmoe_archive import app, classify, index, search


def query_the_page(arguments: list[str]) -> None:
    index_dir, model, out, text, image = arguments
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    page = app.SearchPage(search.ArchiveSearch(Path(index_dir), model), None, 24)
    server = app.serve(page, "127.0.0.1", 0)
    root = f"http://127.0.0.1:{server.server_address[1]}/"
    queries = {"text": {"text": text}, "image": {"image_base64": base64.b64encode(Path(image).read_bytes()).decode()}}
    answers = {
        "page.html": urllib.request.urlopen(root).read(),
        "info.json": urllib.request.urlopen(root + "api/info").read(),
    }
    for name, body in queries.items():
        request = urllib.request.Request(root + "api/search", data=json.dumps(body).encode(), method="POST")
        answers[f"{name}.json"] = answer = urllib.request.urlopen(request).read()
        for hit in json.loads(answer)["hits"]:
            answers[f"{name}_{hit['rank']}.png"] = urllib.request.urlopen(root + hit["thumbnail"]).read()
    server.shutdown()
    Path(out).mkdir(mode=0o700, parents=True, exist_ok=True)  # as private as the tools' own outputs
    for name, content in answers.items():
        (Path(out) / name).write_bytes(content)
        (Path(out) / name).chmod(0o600)


TOOLS = {"index": index.main, "search": search.main, "classify": classify.main, "page": query_the_page}


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
