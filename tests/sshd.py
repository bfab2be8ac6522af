"""A real OpenSSH server on 127.0.0.1 for the SSH backend's tests.

Temp host key, temp client key, its own authorized_keys and sshd_config, a free port;
``/usr/sbin/sshd -D -e`` runs as a child of the test and is stopped after it. When sshd
is not installed the tests skip with the reason, unless ``RATIOCINATOR_REQUIRE_SSHD=1``
(CI) makes that a failure.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SSHD = os.environ.get("RATIOCINATOR_SSHD", "/usr/sbin/sshd")


def require_sshd() -> str:
    """The sshd binary, or a skip (a failure when CI requires it)."""
    found = SSHD if os.access(SSHD, os.X_OK) else shutil.which("sshd")
    missing = [name for name in ("ssh-keygen",) if shutil.which(name) is None]
    if found and not missing:
        return found
    why = (f"OpenSSH server not found ({SSHD}, or sshd on PATH)" if not found else f"{', '.join(missing)} not found")
    if os.environ.get("RATIOCINATOR_REQUIRE_SSHD") == "1":
        pytest.fail(f"{why}, and RATIOCINATOR_REQUIRE_SSHD=1: install openssh-server and openssh-client")
    pytest.skip(f"{why}: install openssh-server to run the SSH backend tests")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keygen(path: Path, comment: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True)


@dataclass
class Sshd:
    """A running sshd and what a client needs to log in to it."""

    binary: str
    root: Path
    port: int
    user: str
    client_key: Path
    host_key: Path
    proc: subprocess.Popen[bytes] | None = None
    # Several loopback addresses, so one sshd can stand for several machines (each its own endpoint).
    addresses: tuple[str, ...] = ("127.0.0.1", "127.0.0.2", "127.0.0.3")

    @property
    def config(self) -> Path:
        return self.root / "sshd_config"

    def write_config(self) -> None:
        lines = [
            *(f"ListenAddress {address}" for address in self.addresses),
            f"Port {self.port}",
            f"HostKey {self.host_key}",
            f"PidFile {self.root / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
            "UsePAM no",
            "StrictModes no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin yes",
            "AllowAgentForwarding no",
            "Subsystem sftp internal-sftp",
            "LogLevel INFO",
        ]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
        log = open(self.root / "sshd.log", "ab")
        self.proc = subprocess.Popen([self.binary, "-D", "-e", "-f", str(self.config)], stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited {self.proc.returncode}:\n{(self.root / 'sshd.log').read_text()}")
            try:
                with socket.create_connection((self.addresses[0], self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd did not listen on port {self.port}:\n{(self.root / 'sshd.log').read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def session_pids(self) -> list[int]:
        """The per-connection sshd processes (children of the listener)."""
        assert self.proc is not None
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def drop_connections(self) -> int:
        """Kill every live SSH connection from the server side; the listener stays up."""
        pids = self.session_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def listen_only(self, *addresses: str) -> None:
        """Restart listening on ``addresses`` only: the machines behind the others are gone."""
        self.stop()
        self.addresses = addresses
        self.write_config()
        self.start()

    def new_host_key(self) -> None:
        """Restart with a different host key: what a MITM (or a reinstall) looks like."""
        self.stop()
        self.host_key.unlink()
        self.host_key.with_suffix(".pub").unlink()
        keygen(self.host_key, "test host key (new)")
        self.start()

    def known_hosts_line(self) -> str:
        key = self.host_key.with_suffix(".pub").read_text().split()
        return f"[127.0.0.1]:{self.port} {key[0]} {key[1]}\n"


@contextlib.contextmanager
def running_sshd(binary: str, root: Path, who: str, **fields: Any) -> Iterator[Sshd]:
    """An sshd in ``root`` (an existing folder) with fresh host and client keys named for ``who``, stopped at the
    end; ``fields``: further Sshd settings (``addresses``)."""
    root.chmod(0o755)
    host_key, client_key = root / "host_ed25519", root / "client_ed25519"
    keygen(host_key, f"{who} host key")
    keygen(client_key, f"{who} client key")
    (root / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
    server = Sshd(binary=binary, root=root, port=free_port(), user=getpass.getuser(), client_key=client_key,
                  host_key=host_key, **fields)
    server.write_config()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with running_sshd(require_sshd(), tmp_path_factory.mktemp("sshd"), "test") as server:
        yield server
