"""A PACS over DICOMweb as an archive source: QIDO-RS walks studies -> series -> instances (in UID order, so that a
rerun meets them in the same order and resumes after the rows already indexed), WADO-RS fetches an instance only
when it is embedded.

    export MEDMOE_PACS_TOKEN=...        # or MEDMOE_PACS_USERNAME / MEDMOE_PACS_PASSWORD, or --pacs_credentials_file
    medmoe-index --model outputs/medmoe-nano --dicomweb https://pacs.hospital/dicom-web \
        --qido ModalitiesInStudy=CT --qido StudyDate=20250101-20251231 --output_dir outputs/pacs-index

Each row holds the study's PatientID and StudyDate, the series' Modality, BodyPartExamined and SeriesDescription, and
the three UIDs, so a hit opens in the PACS viewer.

The client is the standard library's HTTP client, bounded as a production PACS and a hostile one both need:
credentials from a file or the environment (never from argv unless the user put them in the URL, and never stored),
TLS verified (a CA bundle and a client certificate as options), plain http refused unless allowed; each request
bounded by a connect/read timeout AND an overall deadline (a watchdog shuts the socket), each answer by a byte cap
enforced while it streams (an instance by the image processor's max_image_bytes), each listing by a page and result
cap, and all requests by a rate limit. Redirects are not followed. Every failure is a `PacsError`: one line naming
the PACS and what failed (never a UID, a query or a credential); a failed listing or fetch skips that entry.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote, unquote, urlencode, urlsplit

from medmoe_archive.deidentify import strip_credentials, warn_if_readable_by_others
from medmoe_archive.rows import DICOM_FIELDS, ArchiveRow

logger = logging.getLogger(__name__)

USERNAME_VARIABLE = "MEDMOE_PACS_USERNAME"
PASSWORD_VARIABLE = "MEDMOE_PACS_PASSWORD"
TOKEN_VARIABLE = "MEDMOE_PACS_TOKEN"
TAGS = {  # DICOM keyword -> the tag as DICOM JSON names it
    "PatientID": "00100020",
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "SOPInstanceUID": "00080018",
    "Modality": "00080060",
    "BodyPartExamined": "00180015",
    "StudyDate": "00080020",
    "SeriesDescription": "0008103E",
    "NumberOfFrames": "00280008",
}
STUDY_FIELDS = ("patient_id", "study_uid", "study_date")
SERIES_FIELDS = ("series_uid", "modality", "body_part", "series_description")
MAX_UID_CHARACTERS = 64  # DICOM's UI value representation
JSON_TYPES = ("application/dicom+json", "application/json")
INSTANCE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
READ_CHUNK_BYTES = 1 << 16


class PacsError(Exception):
    """A request to the PACS failed; the message is one line naming the PACS and what failed."""


@dataclass(frozen=True)
class PacsSettings:
    """How to reach a PACS and how much it may cost.

    url: the DICOMweb root, never with credentials. authorization: the Authorization header (basic or bearer).
    ca_bundle: PEM file of the CAs to trust (default: the system's). client_certificate / client_key: PEM files for
    mutual TLS. allow_insecure_http: accept plain http (credentials and pixels cross the network in clear).
    timeout_seconds: to connect and for each read. deadline_seconds: for one whole request, answer included.
    max_instance_bytes: one instance as sent. max_answer_bytes: one QIDO answer. page_size: QIDO results asked per
    request. max_results: results of one listing (studies of the query, series of a study, instances of a series).
    requests_per_second: requests start at most this often on average (in bursts of at most one second's worth).
    """

    url: str
    authorization: str | None = field(default=None, repr=False)
    ca_bundle: Path | None = None
    client_certificate: Path | None = None
    client_key: Path | None = None
    allow_insecure_http: bool = False
    timeout_seconds: float = 20.0
    deadline_seconds: float = 120.0
    max_instance_bytes: int = 64 * 2**20
    max_answer_bytes: int = 32 * 2**20
    page_size: int = 500
    max_results: int = 100_000
    requests_per_second: float = 100.0

    @classmethod
    def from_arguments(cls, args, max_instance_bytes: int | None = None) -> "PacsSettings":
        """The settings `add_pacs_arguments`' flags give, credentials included (see `authorization_header`)."""
        url, url_authorization = credentials_from_url(args.dicomweb)
        settings = cls(
            url=url.rstrip("/"),
            authorization=authorization_header(url_authorization, args.pacs_credentials_file),
            ca_bundle=args.pacs_ca_bundle,
            client_certificate=args.pacs_client_certificate,
            client_key=args.pacs_client_key,
            allow_insecure_http=args.allow_insecure_http,
            timeout_seconds=args.pacs_timeout,
            deadline_seconds=args.pacs_deadline,
            page_size=args.qido_page_size,
            max_results=args.qido_max_results,
            requests_per_second=args.pacs_requests_per_second,
        )
        if max_instance_bytes is not None:
            settings = replace(settings, max_instance_bytes=max_instance_bytes)
        settings.check()
        return settings

    def check(self) -> None:
        scheme = urlsplit(self.url).scheme
        if scheme not in ("http", "https"):
            raise ValueError(f"--dicomweb takes an http(s) URL of the PACS's DICOMweb root, got {self.url!r}.")
        if scheme == "http" and not self.allow_insecure_http:
            raise ValueError(
                f"Refusing plain http to {self.url}: credentials and images would cross the network unencrypted. Use "
                "the PACS's https address, or add --allow_insecure_http on a network you trust."
            )
        if scheme == "http" and self.authorization:
            logger.warning(f"Credentials are sent in clear to {self.url} (plain http).")


def credentials_from_url(url: str) -> tuple[str, str | None]:
    """(the URL without user:password@, the basic Authorization header they make or None). Credentials in a URL
    work but are visible in the process list and the shell's history: a warning says so; they are never stored."""
    parts = urlsplit(url)
    if parts.username is None:
        return url, None
    logger.warning(
        "The --dicomweb URL holds credentials, visible in the process list and shell history; pass them with "
        f"--pacs_credentials_file or {USERNAME_VARIABLE}/{PASSWORD_VARIABLE} instead (never stored)."
    )
    return strip_credentials(url), basic_authorization(unquote(parts.username), unquote(parts.password or ""))


def basic_authorization(username: str, password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def authorization_header(url_authorization: str | None, credentials_file: Path | None) -> str | None:
    """The Authorization header: from the URL's user:password, else from `credentials_file` (JSON: {"username",
    "password"} for basic, {"token"} for a bearer token; warned about when others can read it), else from the
    MEDMOE_PACS_TOKEN or MEDMOE_PACS_USERNAME / MEDMOE_PACS_PASSWORD variables; None for an open PACS."""
    if credentials_file is not None:
        if url_authorization is not None:
            raise ValueError("PACS credentials given twice (in the --dicomweb URL and --pacs_credentials_file).")
        warn_if_readable_by_others(Path(credentials_file), "the PACS credentials file")
        try:
            values = json.loads(Path(credentials_file).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"Cannot read the PACS credentials file {credentials_file}: {error}") from None
        return authorization_from(values, f"the PACS credentials file {credentials_file}")
    if url_authorization is not None:
        return url_authorization
    variables = {
        "token": os.environ.get(TOKEN_VARIABLE),
        "username": os.environ.get(USERNAME_VARIABLE),
        "password": os.environ.get(PASSWORD_VARIABLE),
    }
    if not any(variables.values()):
        return None
    return authorization_from({key: value for key, value in variables.items() if value}, "the MEDMOE_PACS_* variables")


def authorization_from(values, where: str) -> str:
    if isinstance(values, dict) and set(values) == {"token"} and isinstance(values["token"], str):
        return f"Bearer {values['token']}"
    if (
        isinstance(values, dict)
        and set(values) == {"username", "password"}
        and all(isinstance(value, str) for value in values.values())
    ):
        return basic_authorization(values["username"], values["password"])
    raise ValueError(f"{where} must give a token alone, or a username and a password.")


def add_pacs_arguments(parser) -> None:
    """How --dicomweb is reached (credentials never on the command line: a file or the environment)."""
    group = parser.add_argument_group("PACS over DICOMweb (with --dicomweb)")
    group.add_argument(
        "--pacs_credentials_file",
        type=Path,
        help='JSON file: {"username": ..., "password": ...} (basic) or {"token": ...} (bearer); default: the '
        f"{TOKEN_VARIABLE} or {USERNAME_VARIABLE} / {PASSWORD_VARIABLE} variables",
    )
    group.add_argument("--pacs_ca_bundle", type=Path, help="PEM file of the CAs to trust (default: the system's)")
    group.add_argument("--pacs_client_certificate", type=Path, help="PEM client certificate for mutual TLS")
    group.add_argument("--pacs_client_key", type=Path, help="its PEM key, when not in the certificate's file")
    group.add_argument(
        "--allow_insecure_http", action="store_true", help="accept a plain http PACS (only on a network you trust)"
    )
    defaults = PacsSettings(url="https://pacs")
    group.add_argument("--pacs_timeout", type=float, default=defaults.timeout_seconds,
                       help="seconds to connect and for each read")  # fmt: skip
    group.add_argument("--pacs_deadline", type=float, default=defaults.deadline_seconds,
                       help="seconds for one whole request, its answer included")  # fmt: skip
    group.add_argument("--qido_page_size", type=int, default=defaults.page_size, help="QIDO-RS results per request")
    group.add_argument("--qido_max_results", type=int, default=defaults.max_results,
                       help="results of one listing (studies of the query, series of a study, instances of a series) "
                       "beyond which the run stops: narrow the query with --qido")  # fmt: skip
    group.add_argument("--pacs_requests_per_second", type=float, default=defaults.requests_per_second,
                       help="requests to the PACS per second, on average (bursts of one second's worth)")  # fmt: skip


class WatchedConnection(http.client.HTTPConnection):
    """An HTTP connection, over TLS when given an SSL context, whose socket `abort` shuts from another thread at any
    moment (the TLS handshake included), so that a watchdog bounds a whole request."""

    def __init__(self, host: str, port: int | None, timeout: float, context: ssl.SSLContext | None):
        super().__init__(host, port, timeout=timeout)
        self.context = context
        if context is not None:
            self.default_port = self.port = port or http.client.HTTPS_PORT
        self.current_socket = None

    def connect(self) -> None:
        raw = socket.create_connection((self.host, self.port), self.timeout)
        self.current_socket = raw
        if self.context is not None:
            raw = self.context.wrap_socket(raw, server_hostname=self.host, do_handshake_on_connect=False)
            self.current_socket = raw
            raw.do_handshake()
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = raw

    def abort(self) -> None:
        if self.current_socket is not None:
            try:
                self.current_socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class DicomWebClient:
    """GET requests to one PACS's DICOMweb root, each within `PacsSettings`' bounds; one kept-alive connection."""

    def __init__(self, settings: PacsSettings):
        self.settings = settings
        parts = urlsplit(settings.url)
        self.https = parts.scheme == "https"
        self.host, self.port, self.root = parts.hostname, parts.port, parts.path.rstrip("/")
        self.context = None
        if self.https:
            self.context = ssl.create_default_context(cafile=str(settings.ca_bundle) if settings.ca_bundle else None)
            if settings.client_certificate:
                self.context.load_cert_chain(
                    str(settings.client_certificate), str(settings.client_key) if settings.client_key else None
                )
        self.connection = None
        self.tokens, self.refilled_at = max(1.0, settings.requests_per_second), time.monotonic()

    def __getstate__(self):  # a worker process opens its own connection
        return {**self.__dict__, "connection": None}

    def fail(self, what: str, reason: str) -> PacsError:
        return PacsError(f"PACS {self.settings.url}: {what} failed: {reason}")

    def get(self, path: str, query: dict, accept: str, max_bytes: int, what: str) -> tuple[str, bytes]:
        """(content type, body) of GET root + path, within the timeout, the deadline and `max_bytes`."""
        self.wait_for_rate_limit()
        target = self.root + path + (f"?{urlencode(query)}" if query else "")
        headers = {"Accept": accept, "User-Agent": "medmoe-index"}
        if self.settings.authorization:
            headers["Authorization"] = self.settings.authorization
        if self.connection is None:
            self.connection = WatchedConnection(self.host, self.port, self.settings.timeout_seconds, self.context)
        connection, deadline_passed = self.connection, threading.Event()

        def abort() -> None:
            deadline_passed.set()
            connection.abort()

        watchdog = threading.Timer(self.settings.deadline_seconds, abort)
        watchdog.daemon = True
        watchdog.start()
        failure = None
        try:
            connection.request("GET", target, headers=headers)
            response = connection.getresponse()
            content_type, body = self.read_answer(response, max_bytes, what)
            will_close = response.will_close
        except PacsError as error:
            failure = error
        except (OSError, http.client.HTTPException, ValueError) as error:
            failure = self.fail(what, describe_network_error(error))
        watchdog.cancel()
        if deadline_passed.is_set():
            failure = self.fail(what, f"no complete answer within {self.settings.deadline_seconds:g} s")
        if failure is not None or will_close:
            self.close()
        if failure is not None:
            raise failure
        return content_type, body

    def read_answer(self, response, max_bytes: int, what: str) -> tuple[str, bytes]:
        if response.status in (301, 302, 303, 307, 308):
            raise self.fail(what, f"HTTP {response.status}: the PACS redirects elsewhere (not followed; give the "
                            "final address as --dicomweb)")  # fmt: skip
        if response.status in (401, 403):
            raise self.fail(what, f"HTTP {response.status}: the PACS refused the credentials")
        if response.status not in (200, 204):
            raise self.fail(what, f"HTTP {response.status} {response.reason}")
        declared = response.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise self.fail(what, f"the answer is {int(declared):,} bytes, above the limit of {max_bytes:,}")
        body = bytearray()
        while chunk := response.read1(READ_CHUNK_BYTES):
            body += chunk
            if len(body) > max_bytes:
                raise self.fail(what, f"the answer is over the limit of {max_bytes:,} bytes")
        response.close()  # read to its end: the connection serves the next request
        return response.getheader("Content-Type", ""), bytes(body)

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def __del__(self) -> None:  # the last fetch of a walk may come after the walk has ended
        self.close()

    def wait_for_rate_limit(self) -> None:
        """A token bucket: requests_per_second on average, in bursts of at most one second's worth."""
        rate = self.settings.requests_per_second
        now = time.monotonic()
        self.tokens = min(max(1.0, rate), self.tokens + (now - self.refilled_at) * rate)
        self.refilled_at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return
        time.sleep((1 - self.tokens) / rate)
        self.tokens, self.refilled_at = 0.0, time.monotonic()  # the token that came during the sleep is spent

    def search(self, path: str, filters: dict[str, str], what: str) -> list[dict]:
        """Every QIDO-RS result of `path` with `filters`, page by page, at most `max_results` (PacsError beyond:
        the listing is not silently cut). A page that adds no new result ends the listing."""
        results, seen, offset = [], set(), 0
        size = self.settings.page_size
        while True:
            page = self.json_page(path, {**filters, "limit": size, "offset": offset}, what)
            fresh = [item for item in page if json.dumps(item, sort_keys=True) not in seen]
            seen.update(json.dumps(item, sort_keys=True) for item in fresh)
            results += fresh
            if len(results) > self.settings.max_results:
                raise self.fail(what, f"more than {self.settings.max_results:,} results: narrow the query (--qido) "
                                "or raise --qido_max_results")  # fmt: skip
            if len(page) != size or not fresh:  # a short page ends it; a longer one: the PACS ignores paging
                return results
            offset += len(page)

    def json_page(self, path: str, query: dict, what: str) -> list[dict]:
        content_type, body = self.get(path, query, "application/dicom+json", self.settings.max_answer_bytes, what)
        if not body.strip():
            return []
        if content_type.split(";")[0].strip().lower() not in JSON_TYPES:
            kind = content_type.split(";")[0].strip() or "no content type"
            raise self.fail(what, f"the answer is {kind}, not DICOM JSON (a login page or a proxy?)")
        try:
            page = json.loads(body)
        except ValueError:
            raise self.fail(what, "the answer is not valid JSON") from None
        if not isinstance(page, list) or not all(isinstance(item, dict) for item in page):
            raise self.fail(what, "the answer is not a list of DICOM JSON objects")
        return page

    def retrieve_instance(self, study_uid: str, series_uid: str, instance_uid: str) -> bytes:
        """The DICOM file of one instance (WADO-RS, in its stored transfer syntax), at most max_instance_bytes."""
        path = "/studies/{}/series/{}/instances/{}".format(*(quote(uid, safe=".") for uid in
                                                            (study_uid, series_uid, instance_uid)))  # fmt: skip
        what = "fetching an instance"
        content_type, body = self.get(path, {}, INSTANCE_ACCEPT, self.settings.max_instance_bytes, what)
        if content_type.lower().startswith("application/dicom"):
            return body
        if not content_type.lower().startswith("multipart/related"):
            raise self.fail(what, f"the answer is {content_type or 'of no content type'}, not DICOM")
        part = first_multipart_part(content_type, body)
        if part is None:
            raise self.fail(what, "the multipart answer holds no DICOM part")
        return part


def first_multipart_part(content_type: str, body: bytes) -> bytes | None:
    """The content of the first part of a multipart/related body, None when it has none."""
    boundary = next(
        (parameter.split("=", 1)[1].strip().strip('"') for parameter in content_type.split(";")[1:]
         if parameter.strip().lower().startswith("boundary=")), None,
    )  # fmt: skip
    if not boundary:
        return None
    delimiter = b"--" + boundary.encode()
    start = body.find(delimiter)
    if start < 0:
        return None
    headers_end = body.find(b"\r\n\r\n", start)
    end = body.find(b"\r\n" + delimiter, headers_end)
    if headers_end < 0 or end < 0:
        return None
    return body[headers_end + 4 : end]


def describe_network_error(error: Exception) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({error.verify_message}); see --pacs_ca_bundle"
    if isinstance(error, ssl.SSLError):
        return f"TLS failed ({error.reason or error})"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, socket.timeout):
        return "no answer within the timeout"
    if isinstance(error, socket.gaierror):
        return "unknown host"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def parse_qido_filters(assignments: list[str] | tuple[str, ...]) -> dict[str, str]:
    """["ModalitiesInStudy=CT", "StudyDate=20250101-20251231"] -> QIDO-RS query parameters."""
    filters = {}
    for assignment in assignments:
        key, separator, value = assignment.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"--qido takes KEY=VALUE (a QIDO-RS study query parameter), got {assignment!r}.")
        filters[key.strip()] = value.strip()
    return filters


def attribute(item: dict, keyword: str) -> str | None:
    """The first value of a DICOM JSON attribute as a string, None when absent or malformed."""
    element = item.get(TAGS[keyword])
    values = element.get("Value") if isinstance(element, dict) else None
    value = values[0] if isinstance(values, list) and values else None
    if isinstance(value, dict):  # a person name
        value = value.get("Alphabetic")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    text = str(value).strip()
    return text or None


def fields(item: dict, columns: tuple[str, ...]) -> dict:
    return {column: attribute(item, DICOM_FIELDS[column]) for column in columns}


def valid_uid(uid: str | None) -> bool:
    return uid is not None and len(uid) <= MAX_UID_CHARACTERS


def frame_to_embed(item: dict) -> int:
    """The middle frame of the NumberOfFrames the PACS reports (0 when it reports none or nonsense)."""
    try:
        return max(int(float(attribute(item, "NumberOfFrames") or 1)), 1) // 2
    except ValueError:
        return 0


class FetchedInstance:
    """An instance of the PACS, fetched (WADO-RS) when called: the DICOM file's bytes."""

    def __init__(self, client: DicomWebClient, study_uid: str, series_uid: str, sop_instance_uid: str):
        self.client, self.uids = client, (study_uid, series_uid, sop_instance_uid)

    def __call__(self) -> bytes:
        return self.client.retrieve_instance(*self.uids)


def sorted_by(items: list[dict], column: str) -> list[dict]:
    return sorted(items, key=lambda item: attribute(item, DICOM_FIELDS[column]) or "")


def dicomweb_rows(settings: PacsSettings, filters: dict[str, str]) -> Iterator[ArchiveRow]:
    """Every instance of the studies that match `filters`, in UID order; id = SOPInstanceUID, image fetched lazily,
    metadata = the DICOM fields (folder None, frame: the middle one of NumberOfFrames when the PACS reports it). A
    listing that fails, or an answer without its UID, is a row with a `problem` (skipped and counted); failing to
    list the studies at all raises PacsError."""
    client = DicomWebClient(settings)
    studies = sorted_by(client.search("/studies", filters, "listing the studies"), "study_uid")
    for position, item in enumerate(studies):
        study = fields(item, STUDY_FIELDS)
        if not valid_uid(study["study_uid"]):
            yield problem_row(f"study-{position}", "pacs_answer_without_uid", "a study without a valid UID")
            continue
        yield from study_rows(client, study)


def study_rows(client: DicomWebClient, study: dict) -> Iterator[ArchiveRow]:
    study_path = f"/studies/{quote(study['study_uid'], safe='.')}"
    try:
        series_list = sorted_by(client.search(f"{study_path}/series", {}, "listing a study's series"), "series_uid")
    except PacsError as error:
        yield problem_row(study["study_uid"], "pacs_listing_failed", str(error))
        return
    for position, item in enumerate(series_list):
        series = fields(item, SERIES_FIELDS)
        if not valid_uid(series["series_uid"]):
            yield problem_row(f"{study['study_uid']}#series-{position}", "pacs_answer_without_uid",
                              "a series without a valid UID")  # fmt: skip
            continue
        instances_path = f"{study_path}/series/{quote(series['series_uid'], safe='.')}/instances"
        try:
            instances = sorted_by(client.search(instances_path, {}, "listing a series' instances"), "sop_instance_uid")
        except PacsError as error:
            yield problem_row(series["series_uid"], "pacs_listing_failed", str(error))
            continue
        for number, instance in enumerate(instances):
            uid = attribute(instance, "SOPInstanceUID")
            if not valid_uid(uid):
                yield problem_row(f"{series['series_uid']}#instance-{number}", "pacs_answer_without_uid",
                                  "an instance without a valid UID")  # fmt: skip
                continue
            metadata = {**dict.fromkeys(DICOM_FIELDS), "folder": None, "frame": frame_to_embed(instance)}
            metadata.update(study)
            metadata.update(series)
            metadata["sop_instance_uid"] = uid
            yield ArchiveRow(uid, FetchedInstance(client, study["study_uid"], series["series_uid"], uid), None,
                             metadata)  # fmt: skip


def problem_row(row_id: str, problem: str, detail: str) -> ArchiveRow:
    metadata = {**dict.fromkeys(DICOM_FIELDS), "folder": None, "frame": None}
    return ArchiveRow(row_id, None, None, metadata, problem=problem, detail=detail)
