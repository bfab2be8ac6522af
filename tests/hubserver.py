"""A Hugging Face Hub on loopback for the ``hf`` data source: the endpoints ``huggingface_hub``'s
``repo_info``, ``list_repo_tree`` and ``snapshot_download`` read, in the Hub's wire format.

One dataset repository, ``org/ds``: its ``main`` branch points at a commit named by its files'
hash (changing ``files`` moves the branch). With ``token`` set, the repository is private: without
``Authorization: Bearer <token>`` the Hub answers 401 ``RepoNotFound``, as the real one does.
``downloads`` counts file GETs by path; ``authorizations`` lists what each request sent.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

REPO = "org/ds"


class Hub:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.token: str | None = None
        self.downloads: Counter[str] = Counter()
        self.authorizations: list[str | None] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                      write: bool = True) -> None:
                self.send_response(status)
                for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(key, value)
                self.end_headers()
                if write:
                    self.wfile.write(body)

            def _json(self, data: object, write: bool) -> None:
                self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"}, write)

            def _route(self, write: bool) -> None:
                auth = self.headers.get("Authorization")
                hub.authorizations.append(auth)
                if hub.token is not None and auth != f"Bearer {hub.token}":
                    self._send(401, b'{"error": "Repository Not Found"}',
                               {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository Not Found"}, write)
                    return
                commit = hub.commit
                path = self.path.split("?", 1)[0]
                if m := re.fullmatch(rf"/api/datasets/{REPO}/revision/([^/]+)", path):
                    if m.group(1) not in ("main", commit):
                        self._send(404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"}, write)
                        return
                    self._json({"id": REPO, "sha": commit, "private": hub.token is not None,
                                "siblings": [{"rfilename": n} for n in sorted(hub.files)]}, write)
                elif re.fullmatch(rf"/api/datasets/{REPO}/tree/{commit}", path):
                    self._json([{"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                                for n, b in sorted(hub.files.items())], write)
                elif (m := re.fullmatch(rf"/datasets/{REPO}/resolve/({commit}|main)/(.+)", path)) and \
                        m.group(2) in hub.files:
                    data = hub.files[m.group(2)]
                    if write:
                        hub.downloads[m.group(2)] += 1
                    self._send(200, data, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'},
                               write)
                else:
                    self._send(404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"}, write)

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                self._route(True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._route(False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def commit(self) -> str:
        return hashlib.sha1(json.dumps(sorted((n, hashlib.sha256(b).hexdigest()) for n, b in self.files.items()))
                            .encode()).hexdigest()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture
def hub() -> Iterator[Hub]:
    pytest.importorskip("huggingface_hub", reason="the hf data source's tests need `pip install 'ratiocinator[hf]'`")
    server = Hub()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
