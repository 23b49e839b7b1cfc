"""The archive's search page: a text or image/DICOM query over an index folder in the browser, with filters,
grouping, paging, thumbnails and links into the hospital's viewer.

    medmoe-search-page --index outputs/archive-index                                # http://127.0.0.1:8000
    medmoe-search-page --index outputs/archive-index --viewer_url "https://pacs/viewer?StudyInstanceUIDs={study}"
    python -m medmoe_archive.app --index outputs/archive-index                      # the same

It answers with the same search code as medmoe-search (medmoe_archive/search.py). Safe by default: it listens on
127.0.0.1 unless --host says otherwise; --auth_file (JSON {"username", "password"}, readable by you alone) turns on a
login (HTTP basic; add --tls_cert and --tls_key to serve https beyond this machine); its log names the method, path
and status of each request, never a query or an identifier; queries are held to the model's input limits and get a
clear error. On a de-identified index (medmoe-index --deidentify) the page shows pseudonyms only: no paths, no
thumbnails (grey tiles), no viewer links.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import json
import logging
import ssl
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from string import Formatter

import torch

from medmoe_archive.deidentify import warn_if_readable_by_others
from medmoe_archive.search import ArchiveSearch, positive_int
from modeling_medmoe.limits import InputTooLarge

logger = logging.getLogger(__name__)

PAGE_FILES = {  # path -> (file beside this module, content type)
    "/": ("search_page.html", "text/html; charset=utf-8"),
    "/search_page.js": ("search_page.js", "text/javascript; charset=utf-8"),
    "/search_page.css": ("search_page.css", "text/css; charset=utf-8"),
}
VIEWER_FIELDS = {"study": "study_uid", "series": "series_uid", "instance": "sop_instance_uid"}
GROUPS = {"series": "series_uid", "study": "study_uid"}
FILTER_COLUMNS = {"modality": "modality", "study": "study_uid", "patient": "patient_id"}
MAX_PAGE = 50  # pages of results one query may ask for
GREY_TILE = base64.b64decode(  # 1 x 1 grey PNG: a hit without a thumbnail (de-identified or none stored)
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGO4DwAA+wD6hC8WXQAAAABJRU5ErkJggg=="
)


class RequestError(ValueError):
    """A request the page cannot answer; `status` is the HTTP status, the message says why."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(parser)
    parser.add_argument("--index", required=True, type=Path, help="the folder medmoe-index wrote")
    parser.add_argument("--model", help="default: the model the index was built with")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def add_serve_arguments(parser) -> None:
    """How the page is served."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--auth_file", type=Path, help='a JSON file {"username": ..., "password": ...}: a login')
    parser.add_argument("--tls_cert", type=Path, help="serve https with this certificate (PEM)")
    parser.add_argument("--tls_key", type=Path, help="and this private key (PEM)")
    parser.add_argument(
        "--viewer_url",
        help="link each hit to the hospital's viewer, e.g. https://pacs/ohif/viewer?StudyInstanceUIDs={study} "
        "(fields {study}, {series}, {instance})",
    )
    parser.add_argument("--page_size", type=positive_int, default=24, help="hits per page")


def check_viewer_template(template: str | None) -> str | None:
    if template is None:
        return None
    fields = {name for _, name, _, _ in Formatter().parse(template) if name is not None}
    unknown = sorted(fields - set(VIEWER_FIELDS))
    if unknown or not template.startswith(("http://", "https://")):
        raise ValueError(f"--viewer_url must be an http(s) URL using only {{study}}, {{series}}, {{instance}}; got "
                         f"{template!r}" + (f" (unknown fields {unknown})" if unknown else ""))  # fmt: skip
    return template


def read_login(auth_file: Path | None) -> tuple[str, str] | None:
    if auth_file is None:
        return None
    warn_if_readable_by_others(auth_file, "the login file")
    try:
        login = json.loads(auth_file.read_text())
        return str(login["username"]), str(login["password"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f'--auth_file {auth_file} must be JSON {{"username": ..., "password": ...}} ({error})'
        ) from None


class SearchPage:
    """What the page serves, free of HTTP: the archive's facets (`describe`) and a query's page of hits (`answer`)."""

    def __init__(self, searcher: ArchiveSearch, viewer_url: str | None, page_size: int):
        self.searcher, self.page_size = searcher, page_size
        self.deidentified = bool(searcher.info.get("holds", {}).get("deidentified"))
        self.viewer_url = None if self.deidentified else viewer_url  # pseudonyms open nothing in a viewer
        self.limits = searcher.image_processor.limits
        self.lock = threading.Lock()  # one query at a time through the model
        columns = searcher.dataset.column_names
        self.filters = [name for name, column in FILTER_COLUMNS.items() if column in columns]
        self.dates = "study_date" in columns and not self.deidentified  # pseudonymised dates do not order
        self.modalities = (
            sorted({value for value in searcher.dataset.unique("modality") if value}) if "modality" in columns else []
        )

    def describe(self) -> dict:
        return {
            "rows": len(self.searcher.dataset),
            "experts": self.searcher.info["expert_names"],
            "modalities": self.modalities,
            "filters": self.filters,
            "dates": self.dates,
            "groups": [name for name, column in GROUPS.items() if column in self.searcher.dataset.column_names],
            "deidentified": self.deidentified,
            "viewer": self.viewer_url is not None,
            "page_size": self.page_size,
        }

    def answer(self, request: dict) -> dict:
        """One page of hits for `request` (JSON: text or image_base64 (+ window), modality, study, patient, expert,
        date_from, date_to (YYYYMMDD), group (series | study), page (1, 2, ...))."""
        query = self.query(request)
        where = {FILTER_COLUMNS[name]: str(request[name]) for name in self.filters if request.get(name)}
        within = {}
        if self.dates and (request.get("date_from") or request.get("date_to")):
            within["study_date"] = (request.get("date_from") or None, request.get("date_to") or None)
        page = int(request.get("page") or 1)
        if not 1 <= page <= MAX_PAGE:
            raise RequestError(f"page must be between 1 and {MAX_PAGE}.")
        group = GROUPS.get(request.get("group") or "")
        expert = request.get("expert") or None
        with self.lock:
            hits = self.searcher.search(query, page * self.page_size + 1, expert, where, group, within=within)
        shown = hits[(page - 1) * self.page_size : page * self.page_size]
        return {"page": page, "more": len(hits) > page * self.page_size, "hits": [self.card(hit) for hit in shown]}

    def query(self, request: dict) -> torch.Tensor:
        text, image = request.get("text"), request.get("image_base64")
        if bool(text) == bool(image):
            raise RequestError("Send a text query or an image, one of the two.")
        if text:
            if len(text) > self.limits.max_text_characters:
                raise RequestError(f"The text query is longer than {self.limits.max_text_characters:,} characters.")
            with self.lock:
                return self.searcher.text_query(str(text))
        try:
            data = base64.b64decode(image, validate=True)
        except (binascii.Error, TypeError):
            raise RequestError("The image is not valid base64.") from None
        if len(data) > self.limits.max_image_bytes:
            raise RequestError(f"The image is larger than {self.limits.max_image_bytes:,} bytes.",
                               HTTPStatus.REQUEST_ENTITY_TOO_LARGE)  # fmt: skip
        try:
            with self.lock:
                return self.searcher.image_query(data, request.get("window") or None)
        except InputTooLarge as error:
            raise RequestError(str(error), HTTPStatus.REQUEST_ENTITY_TOO_LARGE) from None

    def card(self, hit: dict) -> dict:
        """What the grid shows of a hit (never a path on a de-identified index: it holds none)."""
        fields = ("rank", "score", "expert", "id", "study_uid", "series_uid", "sop_instance_uid", "study_date",
                  "modality", "matches", "path")  # fmt: skip
        card = {field: hit[field] for field in fields if hit.get(field) is not None}
        card["thumbnail"] = f"thumbnail/{hit['row']}"
        if self.viewer_url and all(hit.get(column) for column in VIEWER_FIELDS.values() if column in self.needed):
            card["viewer"] = self.viewer_url.format(**{name: hit.get(column) for name, column in VIEWER_FIELDS.items()})
        return card

    @property
    def needed(self) -> set[str]:
        return {VIEWER_FIELDS[name] for _, name, _, _ in Formatter().parse(self.viewer_url or "") if name}

    def thumbnail(self, row: int) -> bytes:
        if not 0 <= row < len(self.searcher.dataset) or "thumbnail" not in self.searcher.dataset.column_names:
            return GREY_TILE
        return self.searcher.dataset[row]["thumbnail"] or GREY_TILE


def handler_for(page: SearchPage, login: tuple[str, str] | None):
    """The request handler class of `page` (a login when `login` is given)."""
    files = {path: ((Path(__file__).parent / name).read_bytes(), kind) for path, (name, kind) in PAGE_FILES.items()}
    expected = None if login is None else "Basic " + base64.b64encode(":".join(login).encode()).decode()
    max_body = page.limits.max_image_bytes * 4 // 3 + 2**16

    class Handler(BaseHTTPRequestHandler):
        server_version = "MedMoE"
        sys_version = ""

        def log_message(self, format: str, *args) -> None:  # method, path without its query, status: no query text
            logger.info("%s %s %s", self.command, self.path.split("?")[0], args[1] if len(args) > 1 else "")

        def authorised(self) -> bool:
            if expected is None:
                return True
            given = self.headers.get("Authorization", "")
            if hmac.compare_digest(given.encode(), expected.encode()):
                return True
            self.send_response(HTTPStatus.UNAUTHORIZED)
            self.send_header("WWW-Authenticate", 'Basic realm="MedMoE archive search"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False

        def reply(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy",
                             "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'")  # fmt: skip
            self.end_headers()
            self.wfile.write(body)

        def reply_json(self, status: HTTPStatus, value: dict) -> None:
            self.reply(status, json.dumps(value).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if not self.authorised():
                return
            path = self.path.split("?")[0]
            if path in files:
                self.reply(HTTPStatus.OK, *files[path])
            elif path == "/api/info":
                self.reply_json(HTTPStatus.OK, page.describe())
            elif path.startswith("/thumbnail/") and path.removeprefix("/thumbnail/").isdigit():
                self.reply(HTTPStatus.OK, page.thumbnail(int(path.removeprefix("/thumbnail/"))), "image/png")
            else:
                self.reply_json(HTTPStatus.NOT_FOUND, {"error": "No such page."})

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            if not self.authorised():
                return
            if self.path.split("?")[0] != "/api/search":
                self.reply_json(HTTPStatus.NOT_FOUND, {"error": "No such page."})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length > max_body:
                    raise RequestError(f"The request is larger than {max_body:,} bytes.",
                                       HTTPStatus.REQUEST_ENTITY_TOO_LARGE)  # fmt: skip
                request = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(request, dict):
                    raise RequestError("The request must be a JSON object.")
                self.reply_json(HTTPStatus.OK, page.answer(request))
            except RequestError as error:
                self.reply_json(error.status, {"error": str(error)})
            except (ValueError, FileNotFoundError) as error:  # bad JSON, an undecodable image, an unknown filter
                self.reply_json(HTTPStatus.BAD_REQUEST, {"error": str(error).splitlines()[0]})

    return Handler


def serve(page: SearchPage, host: str, port: int, login=None, tls: tuple[Path, Path] | None = None):
    """A started server (in its own thread) for `page`; `server.server_address` says where, `shutdown()` stops."""
    server = ThreadingHTTPServer((host, port), handler_for(page, login))
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(tls[0]), str(tls[1]))
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run(args: argparse.Namespace) -> None:
    """Serve the page `args` describe until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        viewer = check_viewer_template(args.viewer_url)
        login = read_login(args.auth_file)
        if bool(args.tls_cert) != bool(args.tls_key):
            raise ValueError("--tls_cert and --tls_key go together.")
        page = SearchPage(ArchiveSearch(args.index, args.model, args.device), viewer, args.page_size)
        server = serve(page, args.host, args.port, login, (args.tls_cert, args.tls_key) if args.tls_cert else None)
    except (FileNotFoundError, ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    scheme = "https" if args.tls_cert else "http"
    if args.host not in ("127.0.0.1", "localhost", "::1") and not (login and args.tls_cert):
        logger.warning("The page is reachable from other machines %s; add --auth_file and --tls_cert/--tls_key.",
                       "without a login" if not login else "over plain http")  # fmt: skip
    host, port = server.server_address[:2]
    print(f"Archive search on {scheme}://{host}:{port}/ ({len(page.searcher.dataset):,} images; Ctrl-C stops it)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
