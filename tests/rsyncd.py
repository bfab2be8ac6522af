"""An rsync daemon on 127.0.0.1 serving one module, ``data``, from a temp directory (the ``rsyncd`` fixture).

Skips when the rsync program is missing, unless ``RATIOCINATOR_REQUIRE_RSYNC=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sshd import free_port


@dataclass
class Rsyncd:
    root: Path  # the module's directory
    port: int

    def url(self, path: str = "") -> str:
        return f"rsync://127.0.0.1:{self.port}/data" + (f"/{path}" if path else "")


@pytest.fixture
def rsyncd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rsyncd]:
    binary = shutil.which("rsync")
    if binary is None:
        if os.environ.get("RATIOCINATOR_REQUIRE_RSYNC") == "1":
            pytest.fail("rsync not found, and RATIOCINATOR_REQUIRE_RSYNC=1: install rsync")
        pytest.skip("rsync not found: install it to run the rsync data source's tests")
    base = tmp_path_factory.mktemp("rsyncd")
    module = base / "module"
    module.mkdir()
    port = free_port()
    user = getpass.getuser()
    conf = base / "rsyncd.conf"
    conf.write_text(f"use chroot = no\nuid = {user}\ngid = {os.getgid()}\npid file = {base / 'rsyncd.pid'}\n"
                    f"log file = {base / 'rsyncd.log'}\n[data]\n    path = {module}\n    read only = yes\n")
    proc = subprocess.Popen([binary, "--daemon", "--no-detach", f"--config={conf}", f"--port={port}",
                             "--address=127.0.0.1"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log = (base / "rsyncd.log").read_text() if (base / "rsyncd.log").exists() else ""
                    pytest.fail(f"the rsync daemon did not start: {log[-500:]}")
                time.sleep(0.05)
        yield Rsyncd(module, port)
    finally:
        proc.terminate()
        proc.wait(10)
