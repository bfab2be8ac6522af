"""What ``validate`` and the backends learn about the data before anything is fetched or rented:
its size (file sizes on disk, or each URL's Content-Length from a HEAD request) and whether it
can be reached. Nothing is downloaded and nothing is hashed here."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ratiocinator.backends.base import HardwareFinding
from ratiocinator.data import hf, rsync
from ratiocinator.data.download import file_name, is_archive
from ratiocinator.data.local_copy import local_directory, url_cache_key
from ratiocinator.data.provenance import human_size
from ratiocinator.errors import DataError
from ratiocinator.spec.models import LoadedSpec
from ratiocinator.store.paths import Paths


@dataclass(frozen=True)
class DataProbe:
    size: int | None  # bytes the runs' directory will hold; None when a server does not say
    at_least: bool  # archives: their unpacked size is not known before unpacking, so ``size`` is a lower bound
    rows: tuple[tuple[str, str], ...]  # (source, what was found) for `validate`

    def shown(self) -> str:
        if self.size is None:
            return "size unknown (a server sent no Content-Length)"
        return ("at least " if self.at_least else "") + human_size(self.size)


def probe(loaded: LoadedSpec, home: Path, *, timeout_s: float = 15.0) -> DataProbe | None:
    """The data's size and reachability (None for ``source: none``); a `DataError` when it cannot be reached."""
    data = loaded.spec.data
    if data.source == "none":
        return None
    if data.source == "local":
        directory = local_directory(loaded)
        size = files = 0
        for dirpath, _, filenames in os.walk(directory):
            for name in filenames:
                path = Path(dirpath) / name
                if path.is_file():
                    size, files = size + path.stat().st_size, files + 1
        return DataProbe(size, False, ((str(directory), f"{files} files, {human_size(size)}"),))
    if data.source == "hf":
        commit, hub_size, files = hf.resolve(loaded, timeout_s=timeout_s)
        shown = human_size(hub_size) if hub_size is not None else "size not given"
        return DataProbe(hub_size, False, ((f"{data.repo_type} {data.repo}@{data.revision}",
                                        f"resolves to commit {commit}, {files} files, {shown}"),))
    if data.source == "rsync":
        files, size = rsync.listing(data.urls[0], timeout_s)
        return DataProbe(size, False, ((data.urls[0], f"reachable, {files} files, {human_size(size)}"),))
    cached = Paths(home).data / "url" / url_cache_key(data.urls, data.checksums) / "copy.json"
    if cached.exists():
        recorded = json.loads(cached.read_text())
        size = sum(int(s["size"]) for s in recorded["sources"])
        rows = tuple((s["location"], f"{human_size(int(s['size']))}, sha256 {s['sha256']} (fetched earlier, in the"
                                     " home's cache)") for s in recorded["sources"])
        tree = cached.parent / "tree"
        unpacked = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
        return DataProbe(unpacked, False, rows)
    total: int | None = 0
    at_least = False
    rows_: list[tuple[str, str]] = []
    import httpx  # only a spec with data.url reaches the network here (about 0.05 s of every command's start)

    with httpx.Client(timeout=timeout_s, follow_redirects=True) as client:
        for url, expected in zip(data.urls, data.checksums, strict=True):
            try:
                response = client.head(url)
            except httpx.HTTPError as exc:
                raise DataError(f"{loaded.where('data', 'url')}: data.url {url} cannot be reached:"
                                f" {type(exc).__name__}: {exc}", hint="check the URL and the network") from None
            if response.status_code >= 400:
                raise DataError(f"{loaded.where('data', 'url')}: data.url {url} answers HTTP {response.status_code}"
                                f" {response.reason_phrase}", hint="check the URL (`curl -I URL`); it must need no"
                                " login")
            length = response.headers.get("Content-Length")
            announced = int(length) if length is not None and length.isdigit() else None
            total = None if announced is None or total is None else total + announced
            at_least = at_least or is_archive(file_name(url))
            shown = human_size(announced) if announced is not None else "size not given"
            rows_.append((url, f"reachable (HTTP {response.status_code}), {shown}"
                               + (", an archive (unpacked on staging)" if is_archive(file_name(url)) else "")
                               + (f", sha256 to check {expected[:12]}…" if expected else ", no sha256 given")))
    return DataProbe(total, at_least, tuple(rows_))


def rental_findings(loaded: LoadedSpec, home: Path, disk_gb: float) -> list[HardwareFinding]:
    """Whether the data fits a rented instance: its disk (``disk_gb``, refused up front when the data is larger)
    and, at ``min_inet_down``, a transfer within ``download_timeout_s``. Checked before anything is rented."""
    spec = loaded.spec
    try:
        found = probe(loaded, home)
    except DataError as exc:
        return [HardwareFinding("data", "unmet", exc.message)]
    if found is None:
        return []
    if found.size is None:
        return [HardwareFinding("disk_gb", "unknown", f"the data's size is unknown ({found.shown()}); it must fit"
                                                      f" the instances' {disk_gb:g} GB disk")]
    out = []
    gb = found.size / 1e9
    fits = gb < disk_gb
    out.append(HardwareFinding(
        "disk_gb", "ok" if fits else "unmet",
        f"the data is {found.shown()} ({gb:.2f} GB) and instances get {disk_gb:g} GB of disk"
        + ("" if fits else "; it would not fit: raise hardware.disk_gb above the data's size plus the code and its"
                           " dependencies")))
    if spec.hardware.min_inet_down:
        seconds = found.size * 8 / (spec.hardware.min_inet_down * 1e6)
        quick = seconds <= spec.download_timeout_s
        out.append(HardwareFinding(
            "min_inet_down", "ok" if quick else "unmet",
            f"{found.shown()} at {spec.hardware.min_inet_down:g} Mbit/s takes about {seconds:,.0f}s"
            f" (download_timeout_s {spec.download_timeout_s:g})"
            + ("" if quick else "; raise hardware.min_inet_down or download_timeout_s")))
    return out


def summary(loaded: LoadedSpec, home: Path) -> str:
    """`validate`'s data line: each source, reachable or not, and the size; a `DataError` when it is missing."""
    found = probe(loaded, home)
    if found is None:
        return "none (the runs get no RATIOCINATOR_DATA_DIR)"
    sources = "; ".join(f"{where}: {what}" for where, what in found.rows)
    return f"{loaded.spec.data.source}, {found.shown()} — {sources}"
