"""A loopback HTTP file server for the data tests: real HTTP/1.1 with ``Range``, counting requests.

It serves ``files`` (name -> bytes) at ``/NAME``; ``requests`` counts GETs per path and
``heads`` HEADs. ``cut_after`` makes the next GET of a path send only that many bytes and
then drop the connection, as a flaky network would.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class DataServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: Counter[str] = Counter()
        self.heads: Counter[str] = Counter()
        self.ranges: list[tuple[str, str | None]] = []
        self.cut_after: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _send(self, body: bool) -> None:
                name = self.path.lstrip("/")
                if name not in server.files:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files[name]
                start, status = 0, 200
                wanted = self.headers.get("Range")
                if body:
                    server.ranges.append((name, wanted))
                match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
                if match:
                    start, status = int(match.group(1)), 206
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                self.send_response(status)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                cut = server.cut_after.pop(name, None)
                if cut is not None:
                    self.wfile.write(data[start:start + cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(data[start:])

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                server.requests[self.path.lstrip("/")] += 1
                self._send(body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                server.heads[self.path.lstrip("/")] += 1
                self._send(body=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


@pytest.fixture
def data_server() -> Iterator[DataServer]:
    server = DataServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
