"""A stand-in for the Hugging Face Hub on 127.0.0.1, for download tests.

It answers what `huggingface_hub.hf_hub_download` asks of one model repository: ``HEAD`` and ``GET`` on
``/<repo_id>/resolve/<revision>/<filename>`` with the headers the client reads (``X-Repo-Commit``, ``ETag`` and
``X-Linked-Etag`` = the file's sha256, ``X-Linked-Size``, ``Content-Length``), ``206`` with ``Content-Range`` for
``Range: bytes=<start>-``, and ``404`` with ``X-Error-Code: EntryNotFound`` for a file it does not hold. Files from
outside the Hub are served at ``/plain/<name>`` (`HubServer.plain_url`). Every request is recorded in
`HubServer.requests`; `HubServer.faults` makes the ``GET`` of one path misbehave (see `FAULTS`).

    with serving(HubServer("user/repo")) as hub:
        hub.files["model.pth"] = b"..."
        # point huggingface_hub at hub.endpoint (HF_ENDPOINT)
"""
from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the one revision the repository has
TRICKLE_INTERVAL_S = 0.05  # pause between the single bytes of the "trickle" fault

FAULTS = {
    "drop_once": "the next GET sends half of its body and closes the connection; later ones are whole",
    "endless": "no Content-Length, then bytes until the client hangs up",
    "oversize": "announces and sends twice the file",
    "stall": "the next GET sends half of its body, then nothing until the server stops; later ones are silent",
    "silent": "headers, then nothing until the server stops",
    "trickle": "one byte at a time, with a pause between them, until the client hangs up",
}
FAULT_AFTERWARDS = {"drop_once": None, "stall": "silent"}  # what a fault of one GET leaves for the next ones


class HubServer(ThreadingHTTPServer):
    """The repository ``repo_id`` at revision ``revision`` (files: name in the repo -> bytes), plus plain files."""
    daemon_threads = True

    def __init__(self, repo_id: str, revision: str = "main"):
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.repo_id, self.revision = repo_id, revision
        self.files: dict[str, bytes] = {}
        self.plain: dict[str, bytes] = {}
        self.faults: dict[str, str] = {}  # URL path -> key of FAULTS
        self.requests: list[tuple[str, str, str | None]] = []  # (method, URL path, Range header)
        self.stopping = threading.Event()

    @property
    def endpoint(self) -> str:
        """What ``HF_ENDPOINT`` is set to."""
        return f"http://127.0.0.1:{self.server_address[1]}"

    def resolve_path(self, filename: str) -> str:
        """The URL path of a repository file."""
        return f"/{self.repo_id}/resolve/{self.revision}/{filename}"

    def plain_url(self, name: str) -> str:
        """The URL of a plain file."""
        return f"{self.endpoint}/plain/{name}"

    def set_fault(self, path: str, fault: str | None) -> None:
        """Make the GETs of a URL path misbehave as `FAULTS` says (None: answer them properly)."""
        if fault is None:
            self.faults.pop(path, None)
        else:
            self.faults[path] = fault

    def lookup(self, path: str) -> tuple[bytes | None, bool]:
        """The bytes at a URL path (None when absent), and whether it is a repository file."""
        prefix = f"/{self.repo_id}/resolve/{self.revision}/"
        if path.startswith(prefix):
            return self.files.get(path.removeprefix(prefix)), True
        return self.plain.get(path.removeprefix("/plain/")), False


class _HubHandler(BaseHTTPRequestHandler):
    server: HubServer

    def do_HEAD(self):  # noqa: N802 (http.server's name)
        self._answer(send_body=False)

    def do_GET(self):  # noqa: N802 (http.server's name)
        self._answer(send_body=True)

    def log_message(self, *args):
        pass

    def _answer(self, send_body: bool) -> None:
        self.server.requests.append((self.command, self.path, self.headers.get("Range")))
        data, in_repo = self.server.lookup(self.path)
        if data is None:
            self._not_found(in_repo)
            return
        fault = self.server.faults.get(self.path) if send_body else None
        if fault in FAULT_AFTERWARDS:
            self.server.set_fault(self.path, FAULT_AFTERWARDS[fault])
        start = self._range_start()
        self.send_response(206 if start else 200)
        if in_repo:
            self._send_repo_headers(data)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        body = data[start:]
        if fault != "endless":
            self.send_header("Content-Length", str(2 * len(body) if fault == "oversize" else len(body)))
        self.end_headers()
        if send_body:
            self._send_body(body, fault)

    def _range_start(self) -> int:
        requested = self.headers.get("Range")
        return int(re.fullmatch(r"bytes=(\d+)-", requested).group(1)) if requested else 0

    def _send_repo_headers(self, data: bytes) -> None:
        digest = hashlib.sha256(data).hexdigest()
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{digest}"')
        self.send_header("X-Linked-Etag", f'"{digest}"')
        self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")

    def _not_found(self, in_repo: bool) -> None:
        self.send_response(404)
        if in_repo:
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_body(self, body: bytes, fault: str | None) -> None:
        send = {"drop_once": self._send_half_and_hang_up, "stall": self._send_half_and_wait, "silent": self._wait,
                "endless": self._send_forever, "trickle": self._send_byte_by_byte,
                "oversize": lambda data: self.wfile.write(data * 2)}.get(fault, self.wfile.write)
        try:
            send(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client hung up: what the faults wait for

    def _send_half_and_hang_up(self, body: bytes) -> None:
        self.wfile.write(body[:len(body) // 2])
        self.close_connection = True

    def _send_half_and_wait(self, body: bytes) -> None:
        self.wfile.write(body[:len(body) // 2])
        self._wait(body)

    def _wait(self, body: bytes) -> None:
        self.wfile.flush()
        self.server.stopping.wait()
        self.close_connection = True

    def _send_forever(self, body: bytes) -> None:
        while not self.server.stopping.is_set():
            self.wfile.write(body)

    def _send_byte_by_byte(self, body: bytes) -> None:
        for index in range(len(body)):
            self.wfile.write(body[index:index + 1])
            self.wfile.flush()
            if self.server.stopping.wait(TRICKLE_INTERVAL_S):
                return


@contextmanager
def serving(server: HubServer) -> Iterator[HubServer]:
    """Run ``server`` in a thread for the block; then release stalled answers and stop it."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
