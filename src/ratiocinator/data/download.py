"""Fetching a URL once: resumed after a dropped connection, checked against its SHA-256, archives unpacked.

A download goes to ``NAME.part`` and is renamed only once complete and verified, so a
crash or a timeout leaves either nothing or a prefix that the next attempt continues with
an HTTP ``Range`` request (a server that ignores it sends the whole file again).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from ratiocinator.data.manifest import file_sha256
from ratiocinator.errors import DataError

if TYPE_CHECKING:
    import httpx

ARCHIVES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar", ".zip")


@dataclass(frozen=True)
class Fetched:
    url: str
    final_url: str  # after redirects: what was actually read
    path: Path
    size: int
    sha256: str


def file_name(url: str) -> str:
    """The name a URL's file gets in the data directory (its path's last part)."""
    name = unquote(PurePosixPath(urlsplit(url).path).name)
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise DataError(f"data.url {url} names no file (its path ends in '/')",
                        hint="give the URL of the file itself")
    return name


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVES)


def fetch(url: str, dest: Path, *, expected: str | None, deadline: float, client: httpx.Client) -> Fetched:
    """``url``'s content at ``dest`` (kept from an earlier call when complete), verified against ``expected``."""
    part = dest.with_name(dest.name + ".part")
    final_url = url
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        final_url = _download(url, part, deadline, client)
        os.replace(part, dest)
        (dest.with_name(dest.name + ".url")).write_text(final_url)
    else:
        source = dest.with_name(dest.name + ".url")
        final_url = source.read_text() if source.exists() else url
    digest = file_sha256(dest)
    if expected is not None and digest != expected:
        dest.unlink()
        raise DataError(
            f"the file at {url} does not match data.sha256: expected {expected}, got {digest};"
            " nothing was run", hint="if the file changed on purpose, put the new digest in data.sha256 (`sha256sum"
            " FILE`); otherwise the server sent something else (a login page, a new version)")
    return Fetched(url, final_url, dest, dest.stat().st_size, digest)


def _download(url: str, part: Path, deadline: float, client: httpx.Client) -> str:
    import httpx  # imported when a download happens: most commands never fetch (about 0.1 s at start-up)

    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        with client.stream("GET", url, headers=headers, follow_redirects=True,
                           timeout=httpx.Timeout(max(1.0, min(60.0, deadline - time.monotonic())))) as response:
            if response.status_code == 416 and offset:  # the prefix is bad or the file shrank: start over
                part.unlink()
                return _download(url, part, deadline, client)
            if response.status_code >= 400:
                raise DataError(f"downloading {url} failed: HTTP {response.status_code} {response.reason_phrase}",
                                hint="check the URL (`curl -I URL`) and that it needs no login")
            mode = "ab" if response.status_code == 206 and offset else "wb"
            with open(part, mode) as fh:
                for block in response.iter_bytes():  # as it arrives: a drop keeps all that came
                    fh.write(block)
                    if time.monotonic() > deadline:
                        raise DataError(f"downloading {url} did not finish within download_timeout_s"
                                        f" ({part.stat().st_size:,} bytes so far, kept to resume)",
                                        hint="raise download_timeout_s, or run again to continue where it stopped")
            return str(response.url)
    except httpx.HTTPError as exc:
        raise DataError(f"downloading {url} failed: {type(exc).__name__}: {exc}",
                        hint="check the URL and the network; run again to continue a partial download") from None


def unpack(archive: Path, name: str, into: Path) -> None:
    """Extract ``archive`` (its type from ``name``) into ``into``; members may not leave it or be links out."""
    into.mkdir(parents=True, exist_ok=True)
    try:
        if name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for member in zf.namelist():
                    parts = PurePosixPath(member).parts
                    if member.startswith("/") or ".." in parts:
                        raise DataError(f"the archive {name} holds a path outside its folder: {member}",
                                        hint="the archive is unsafe to unpack; fix it at its source")
                zf.extractall(into)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(into, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise DataError(f"cannot unpack the archive {name}: {exc}",
                        hint="check that the URL serves the archive itself (its sha256 catches a wrong file)") from None


def digest_text(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()
