"""Where the code came from, in a form a reader elsewhere can use: the repository's remote URL.

A study of a local checkout records the checkout's ``origin`` remote, so the paper can say what
to clone instead of a path on the machine that ran it. Credentials embedded in a URL
(``https://user:token@host/...``) are dropped before anything is recorded.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/@]*@")


def public_url(url: str) -> str:
    """The URL without a user name or token."""
    return _USERINFO.sub(r"\1", url.strip())


def remote_url(repo: str, *, timeout_s: float = 10.0) -> str | None:
    """The ``origin`` remote of a local repository, or None (a URL already, no remote, no git)."""
    path = Path(repo)
    if not path.is_dir():
        return None
    try:
        done = subprocess.run(["git", "-C", str(path), "remote", "get-url", "origin"], capture_output=True, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    url = done.stdout.strip()
    if done.returncode != 0 or not url or Path(url).is_absolute() or url.startswith(("file:", ".")):
        return None  # a remote that is itself a local path says no more than the spec's own path
    return public_url(url)
