"""A PACS that is hostile, broken or strict cannot stall, flood or crash the archive tools: a local DICOMweb server on
127.0.0.1 trickles, floods, pages without end, answers a login page, a 500 or a redirect, leaves out UIDs, asks for
credentials or a client certificate. Every failure is one line naming the PACS and what failed; a listing or a fetch
that fails skips its entry and counts it; requests keep their deadline, answers their byte cap, the client its rate."""

import base64
import json
import os
import time
import tracemalloc

import pytest

pytest.importorskip("faiss")
pytest.importorskip("pydicom")

from medmoe_archive import index as index_script  # noqa: E402
from medmoe_archive.dicomweb import DicomWebClient, PacsError, PacsSettings  # noqa: E402

from .pacs_servers import GOOD, TRICKLE_SECONDS, HostilePacs, make_tls_files  # noqa: E402

DEADLINE = 1.5
BOUNDS = ["--pacs_timeout", "1", "--pacs_deadline", str(DEADLINE), "--qido_page_size", "10",
          "--qido_max_results", "50"]  # fmt: skip
TOKEN, USER, PASSWORD = "tok-7f3a9c", "pacsuser", "s3cret-pacs-pw"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


@pytest.fixture(scope="module")
def pacs():
    server = HostilePacs(accepted_authorizations={f"Bearer {TOKEN}", BASIC})
    yield server
    server.stop()


def client(url: str, **settings) -> DicomWebClient:
    return DicomWebClient(PacsSettings(url, allow_insecure_http=url.startswith("http:"), timeout_seconds=1,
                                       deadline_seconds=DEADLINE, **settings))  # fmt: skip


def run_index(nano_folder, url: str, out, *extra: str) -> dict:
    arguments = ["--model", str(nano_folder), "--dicomweb", url, "--allow_insecure_http", *BOUNDS,
                 "--output_dir", str(out), *extra]  # fmt: skip
    return index_script.index_archive(index_script.parse_args(arguments))


@pytest.mark.parametrize("mode", ["trickle_body", "trickle_headers"])
def test_a_trickled_answer_ends_at_the_request_deadline(pacs, mode):
    start = time.monotonic()
    with pytest.raises(PacsError, match=f"listing the studies failed: no complete answer within {DEADLINE:g} s"):
        client(pacs.url(mode)).search("/studies", {}, "listing the studies")
    assert time.monotonic() - start < DEADLINE + 2 * TRICKLE_SECONDS + 1.0


@pytest.mark.parametrize("mode", ["oversize", "oversize_declared"])
def test_an_oversized_instance_is_refused_while_it_streams_within_the_cap(pacs, mode):
    cap = 8 * 2**20
    tracemalloc.start()
    try:
        with pytest.raises(PacsError, match=f"fetching an instance failed: the answer .*limit of {cap:,}"):
            client(pacs.url(mode), max_instance_bytes=cap).retrieve_instance(*GOOD.values())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < cap + 200 * 2**20


@pytest.mark.parametrize(
    "mode, message",
    [
        ("trickle_body", f"no complete answer within {DEADLINE:g} s"),
        ("login", "the answer is text/html, not DICOM JSON (a login page or a proxy?)"),
        ("error", "HTTP 500 Internal Server Error"),
        ("redirect", "HTTP 302: the PACS redirects elsewhere (not followed; give the final address as --dicomweb)"),
        ("endless", "more than 50 results: narrow the query (--qido) or raise --qido_max_results"),
    ],
)
def test_a_pacs_that_cannot_list_its_studies_stops_the_run_with_one_line(pacs, nano_folder, tmp_path, capsys, mode,
                                                                         message):  # fmt: skip
    arguments = ["--model", str(nano_folder), "--dicomweb", pacs.url(mode), "--allow_insecure_http", *BOUNDS,
                 "--output_dir", str(tmp_path / "index")]  # fmt: skip
    with pytest.raises(SystemExit) as stopped:
        index_script.main(arguments)
    line = str(stopped.value.code)
    assert line == f"error: PACS {pacs.url(mode)}: listing the studies failed: {message}"
    assert "Traceback" not in capsys.readouterr().err


def test_connection_and_tls_failures_are_one_line(pacs, tmp_path):
    closed = HostilePacs()
    closed_url = closed.url("good_path")
    closed.stop()
    with pytest.raises(PacsError, match="listing the studies failed: connection refused$"):
        client(closed_url).search("/studies", {}, "listing the studies")
    with pytest.raises(PacsError, match=r"listing the studies failed: TLS failed \("):
        client(pacs.url("good_path").replace("http:", "https:")).search("/studies", {}, "listing the studies")


def test_entries_the_pacs_answers_badly_are_skipped_and_counted(pacs, nano_folder, tmp_path):
    info = run_index(nano_folder, pacs.url("broken"), tmp_path / "index")
    assert info["rows"] == 1 and info["rows_read"] == 6
    assert info["skipped"] == {"pacs_answer_without_uid": 3, "pacs_listing_failed": 1, "fetch_failed": 1}
    listed = [json.loads(line) for line in (tmp_path / "index" / "skipped.jsonl").read_text().splitlines()]
    failed = next(entry for entry in listed if entry["reason"] == "fetch_failed")
    assert failed["detail"] == f"PACS {pacs.url('broken')}: fetching an instance failed: HTTP 500 Internal Server Error"


def test_an_oversized_instance_from_the_pacs_is_skipped_and_counted(pacs, nano_folder, tmp_path):
    with pytest.raises(ValueError, match="No image could be embedded"):
        run_index(nano_folder, pacs.url("oversize_declared"), tmp_path / "index")
    [entry] = [json.loads(line) for line in (tmp_path / "index" / "skipped.jsonl").read_text().splitlines()]
    assert entry["reason"] == "fetch_failed" and "above the limit of 67,108,864" in entry["detail"]


def test_credentials_from_the_environment_a_file_or_the_url_reach_the_pacs_and_are_never_stored(
    pacs, nano_folder, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("MEDMOE_PACS_TOKEN", TOKEN)
    assert run_index(nano_folder, pacs.url("auth"), tmp_path / "token")["rows"] == 1
    assert pacs.requests[-1]["headers"]["Authorization"] == f"Bearer {TOKEN}"
    monkeypatch.delenv("MEDMOE_PACS_TOKEN")
    credentials = tmp_path / "pacs.json"
    credentials.write_text(json.dumps({"username": USER, "password": PASSWORD}))
    os.chmod(credentials, 0o644)
    caplog.clear()
    run_index(nano_folder, pacs.url("auth"), tmp_path / "file", "--pacs_credentials_file", str(credentials))
    assert pacs.requests[-1]["headers"]["Authorization"] == BASIC
    warned, _ = caplog.text, caplog.clear()
    assert f"The PACS credentials file {credentials} is readable by group or others (mode 0644)" in warned
    in_url = pacs.url("auth").replace("http://", f"http://{USER}:{PASSWORD}@")
    run_index(nano_folder, in_url, tmp_path / "url")
    request = pacs.requests[-1]["headers"]
    host, port = pacs.server_address
    assert request["Authorization"] == BASIC and request["Host"] == f"{host}:{port}"  # not the user name
    warned = caplog.text
    assert "visible in the process list" in warned and PASSWORD not in warned
    for folder in ("token", "file", "url"):
        for path in (tmp_path / folder).rglob("*"):
            if path.is_file():
                assert PASSWORD.encode() not in path.read_bytes() and TOKEN.encode() not in path.read_bytes(), path
    with pytest.raises(PacsError, match="HTTP 401: the PACS refused the credentials"):
        client(pacs.url("auth"), authorization="Bearer wrong").search("/studies", {}, "listing the studies")


def test_requests_keep_to_the_rate_limit(pacs):
    """A burst of one second's worth, then the rate: 16 requests at 10 per second take at least 0.6 s."""
    rate_limited = client(pacs.url("good_path"), requests_per_second=10)
    start = time.monotonic()
    for _ in range(16):
        rate_limited.search("/studies", {}, "listing the studies")
    assert time.monotonic() - start >= 0.6


def test_tls_with_a_ca_bundle_and_a_client_certificate(tmp_path):
    try:
        files = make_tls_files(tmp_path / "tls")
    except FileNotFoundError as missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing}: CI machines have openssl")
        pytest.skip(str(missing))
    server = HostilePacs(tls=(files["server.pem"], files["server.key"], files["ca.pem"]))
    try:
        url = server.url("good_path")
        mutual = client(url, ca_bundle=files["ca.pem"], client_certificate=files["client.pem"],
                        client_key=files["client.key"])  # fmt: skip
        assert mutual.search("/studies", {}, "listing the studies")[0]["0020000D"]["Value"] == [GOOD["study"]]
        assert mutual.retrieve_instance(*GOOD.values())[128:132] == b"DICM"
        with pytest.raises(PacsError, match="TLS certificate not trusted"):
            client(url).search("/studies", {}, "listing the studies")
        with pytest.raises(PacsError, match="listing the studies failed"):  # the server wants a client certificate
            client(url, ca_bundle=files["ca.pem"]).search("/studies", {}, "listing the studies")
    finally:
        server.stop()
