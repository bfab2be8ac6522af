"""A directory on an rsync server (``source: rsync``, ``url: rsync://host[:port]/module[/path]``), mirrored
into the home's cache with the ``rsync`` program: the first start copies it, later starts send only
what changed (and the tree hash then tells a resumed experiment that its data changed)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

from ratiocinator.errors import DataError

IO_TIMEOUT_S = 60  # rsync gives up on a server that sends nothing for this long


def _rsync() -> str:
    found = shutil.which("rsync")
    if found is None:
        raise DataError("data.source 'rsync' needs the rsync program on this machine, and it is not installed",
                        hint="install it (`apt install rsync`, `brew install rsync`)")
    return found


def _source(url: str) -> str:
    return url.rstrip("/") + "/"  # the directory's content, not the directory inside it


def mirror(url: str, dest: Path, deadline: float) -> None:
    """Make ``dest`` an exact copy of the directory at ``url`` (files the server dropped are removed)."""
    dest.mkdir(parents=True, exist_ok=True)
    left = deadline - time.monotonic()
    argv = [_rsync(), "--recursive", "--links", "--times", "--partial", "--delete", "--safe-links",
            f"--timeout={IO_TIMEOUT_S}", "--", _source(url), str(dest) + "/"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=max(left, 1.0), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DataError(f"rsync from {url} did not finish within download_timeout_s; what arrived is kept and the"
                        " next start continues it", hint="raise download_timeout_s") from None
    if done.returncode != 0:
        raise DataError(f"rsync from {url} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}",
                        hint="check the server, the module and the path (`rsync rsync://host/` lists modules)")


def listing(url: str, timeout_s: float) -> tuple[int, int]:
    """(files, bytes) at ``url``, from the server's listing; nothing is copied."""
    argv = [_rsync(), "--list-only", "--recursive", "--no-human-readable", f"--timeout={int(timeout_s)}", "--",
            _source(url)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DataError(f"rsync server at {url} did not answer within {timeout_s:g}s",
                        hint="check the host and port") from None
    if done.returncode != 0:
        raise DataError(f"rsync server at {url} cannot be listed (exit {done.returncode}):"
                        f" {done.stderr.strip()[-300:]}", hint="check the server, the module and the path")
    files = size = 0
    for line in done.stdout.splitlines():
        match = re.match(r"-\S+\s+([\d,.]+)\s", line)  # regular files: "-rw-r--r--   1234 2026/01/01 ..."
        if match:
            files, size = files + 1, size + int(re.sub(r"[,.]", "", match.group(1)))
    return files, size
