"""DICOMweb servers for tests: a hostile one on 127.0.0.1 (plain or TLS) whose first path segment picks how it
misbehaves, and the TLS files (a CA, a server and a client certificate) made with the openssl command."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

BOUNDARY = "medmoe-test-boundary"
TRICKLE_SECONDS = 0.3


def uid_item(**tags: str) -> dict:
    """A DICOM JSON object: {keyword-tag: value}."""
    return {tag: {"vr": "UI", "Value": [value]} for tag, value in tags.items()}


STUDY, SERIES, SOP = "0020000D", "0020000E", "00080018"
GOOD = {"study": "1.2.7.1", "series": "1.2.7.1.1", "instance": "1.2.7.1.1.2"}


class HostileHandler(BaseHTTPRequestHandler):
    """GET /MODE/dicom-web/...: MODE is one of the `answer_*` methods."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.server.requests.append({"path": self.path, "headers": dict(self.headers)})
        parts = urlsplit(self.path)
        mode, _, resource = parts.path.lstrip("/").partition("/dicom-web")
        self.query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        try:
            getattr(self, f"answer_{mode}")(resource)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            self.close_connection = True

    def send_json(self, value, status: int = 200) -> None:
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_instance(self) -> None:
        from pydicom.data import get_testdata_file

        data = Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes()
        body = (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
                + f"\r\n--{BOUNDARY}--\r\n".encode())  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", f'multipart/related; type="application/dicom"; boundary={BOUNDARY}')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_status(self, status: int, content_type: str = "text/plain", body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def answer_good_path(self, resource: str) -> None:
        """One study, one series, one instance that decodes."""
        if resource == "/studies":
            self.send_json([uid_item(**{STUDY: GOOD["study"]})])
        elif resource.endswith("/series"):
            self.send_json([uid_item(**{SERIES: GOOD["series"]})])
        elif resource.endswith("/instances"):
            self.send_json([uid_item(**{SOP: GOOD["instance"]})])
        else:
            self.send_instance()

    def answer_trickle_body(self, resource: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Connection", "close")
        self.end_headers()
        for _ in range(200):
            self.wfile.write(b" ")
            self.wfile.flush()
            time.sleep(TRICKLE_SECONDS)

    def answer_trickle_headers(self, resource: str) -> None:
        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(200):
            self.wfile.write(b"a")
            self.wfile.flush()
            time.sleep(TRICKLE_SECONDS)

    def answer_oversize(self, resource: str) -> None:
        """A study, series and instance listed; the instance is 100 MB of zeros, sent without a declared length."""
        if not resource.startswith("/studies/") or not resource.count("/instances/"):
            return self.answer_good_path(resource)
        self.send_response(200)
        self.send_header("Content-Type", f'multipart/related; type="application/dicom"; boundary={BOUNDARY}')
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = bytes(1 << 20)
        for _ in range(100):
            self.wfile.write(chunk)

    def answer_oversize_declared(self, resource: str) -> None:
        if not resource.startswith("/studies/") or not resource.count("/instances/"):
            return self.answer_good_path(resource)
        self.send_response(200)
        self.send_header("Content-Type", f'multipart/related; type="application/dicom"; boundary={BOUNDARY}')
        self.send_header("Content-Length", str(100 * 2**20))
        self.end_headers()
        self.wfile.write(bytes(1024))

    def answer_endless(self, resource: str) -> None:
        """Every page of studies is full of new ones."""
        offset, limit = int(self.query.get("offset", 0)), int(self.query.get("limit", 100))
        self.send_json([uid_item(**{STUDY: f"1.2.8.{offset + number}"}) for number in range(limit)])

    def answer_login(self, resource: str) -> None:
        self.send_status(200, "text/html", b"<html><body><form>Sign in to the PACS</form></body></html>")

    def answer_error(self, resource: str) -> None:
        self.send_status(500, body=b"internal error")

    def answer_redirect(self, resource: str) -> None:
        self.send_response(302)
        self.send_header("Location", "http://elsewhere.invalid/dicom-web/studies")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def answer_broken(self, resource: str) -> None:
        """A study without a UID, one whose series cannot be listed, a series without a UID, an instance without a
        UID, one that cannot be fetched (500) and one good instance."""
        if resource == "/studies":
            self.send_json([{"00100020": {"vr": "LO", "Value": ["P1"]}}, uid_item(**{STUDY: "1.2.7.1"}),
                            uid_item(**{STUDY: "1.2.7.9"})])  # fmt: skip
        elif resource == "/studies/1.2.7.9/series":
            self.send_status(500)
        elif resource.endswith("/series"):
            self.send_json([{}, uid_item(**{SERIES: "1.2.7.1.1"})])
        elif resource.endswith("/instances"):
            self.send_json([{}, uid_item(**{SOP: "1.2.7.1.1.1"}), uid_item(**{SOP: GOOD["instance"]})])
        elif resource.endswith("/1.2.7.1.1.1"):
            self.send_status(500)
        else:
            self.send_instance()

    def answer_auth(self, resource: str) -> None:
        """The good path, for the right bearer token or basic credentials only."""
        if self.headers.get("Authorization") not in self.server.accepted_authorizations:
            return self.send_status(401, body=b"unauthorised")
        self.answer_good_path(resource)


class HostilePacs(ThreadingHTTPServer):
    """The hostile server on a free 127.0.0.1 port, in a daemon thread; `url(mode)` is a DICOMweb root. With
    `tls` = (certificate, key, client CA or None), it speaks https (requiring a client certificate with a CA)."""

    daemon_threads = True

    def __init__(self, tls: tuple[Path, Path, Path | None] | None = None, accepted_authorizations=()):
        super().__init__(("127.0.0.1", 0), HostileHandler)
        self.requests: list[dict] = []
        self.accepted_authorizations = set(accepted_authorizations)
        self.scheme = "http"
        if tls is not None:
            certificate, key, client_ca = tls
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certificate, key)
            if client_ca is not None:
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(client_ca)
            self.socket = context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def handle_error(self, request, client_address) -> None:  # a client that gave up mid-answer is expected here
        pass

    def url(self, mode: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}/{mode}/dicom-web"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def make_tls_files(folder: Path) -> dict[str, Path]:
    """A test CA and a server (for 127.0.0.1) and a client certificate it signed, as PEM files; FileNotFoundError
    when the openssl command is missing."""
    if shutil.which("openssl") is None:
        raise FileNotFoundError("the openssl command is not installed")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*arguments: str) -> None:
        subprocess.run(["openssl", *arguments], cwd=folder, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=medmoe test CA")  # fmt: skip
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, extension in (("server", ["-extfile", "server.ext"]), ("client", [])):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=medmoe test {name}")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", *extension)  # fmt: skip
    return {name: folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
