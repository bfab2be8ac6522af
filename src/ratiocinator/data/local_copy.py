"""The spec's data on this machine: a local directory used in place, or URLs fetched once into the home.

Everything a backend stages elsewhere starts from this copy and its manifest, so every host
receives the same bytes, checked against the same tree hash.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ratiocinator.data import hf, rsync
from ratiocinator.data.download import digest_text, fetch, file_name, is_archive, unpack
from ratiocinator.data.manifest import Manifest, make_read_only, scan
from ratiocinator.errors import DataError
from ratiocinator.spec.models import LoadedSpec
from ratiocinator.store.paths import Paths


@dataclass(frozen=True)
class SourceRecord:
    """Where one piece of the data came from, for the ledger and the paper."""

    kind: str  # "local" | "url"
    location: str  # the directory, or the URL as the spec gives it
    resolved: str  # the absolute directory, or the URL after redirects
    size: int
    sha256: str  # of the file; for a directory, its tree hash

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "location": self.location, "resolved": self.resolved, "size": self.size,
                "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> SourceRecord:
        return cls(str(data["kind"]), str(data["location"]), str(data["resolved"]), int(str(data["size"])),
                   str(data["sha256"]))


@dataclass(frozen=True)
class LocalCopy:
    """The data directory on this machine, what it holds, and where it came from."""

    directory: Path
    manifest: Manifest
    sources: tuple[SourceRecord, ...]

    @property
    def tree_hash(self) -> str:
        return self.manifest.tree_hash

    @property
    def size(self) -> int:
        return self.manifest.size


def local_directory(loaded: LoadedSpec) -> Path:
    """``data.path`` resolved against the spec's folder; a `DataError` naming it when it is no directory."""
    raw = loaded.spec.data.path or ""
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = loaded.path.parent / path
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        raise DataError(f"{loaded.where('data', 'path')}: data.path {path} {what}",
                        hint="point data.path at the dataset's directory (relative paths start at the spec's folder)")
    return path.resolve()


def local_copy(loaded: LoadedSpec, home: Path, *, deadline: float | None = None,
               refresh: bool = True) -> LocalCopy | None:
    """The data on this machine (None for ``source: none``), fetched and checked first if need be.

    ``deadline`` (time.monotonic) bounds the downloads; the default is ``download_timeout_s`` from now.
    Sources that can change under the same spec (an rsync directory, a Hub branch) are looked at
    again when ``refresh``; without it, the copy already here is used as it is (see `prepared_copy`).
    """
    data = loaded.spec.data
    root = Paths(home).data
    if data.source == "none":
        return None
    if data.source == "local":
        directory = local_directory(loaded)
        manifest = scan(directory, root / "hashes" / f"{digest_text(str(directory))[:32]}.json")
        if not manifest.files:
            raise DataError(f"{loaded.where('data', 'path')}: data.path {directory} holds no files",
                            hint="a run would read nothing: point it at the dataset, or set data.source: none")
        record = SourceRecord("local", data.path or "", str(directory), manifest.size, manifest.tree_hash)
        return LocalCopy(directory, manifest, (record,))
    if deadline is None:
        deadline = time.monotonic() + loaded.spec.download_timeout_s
    if data.source == "rsync":
        return _rsync_copy(loaded, root, deadline, refresh)
    if data.source == "hf":
        return _hf_copy(loaded, root, deadline, refresh)
    return _url_copy(loaded, root, deadline)


def prepared_copy(loaded: LoadedSpec, home: Path) -> LocalCopy | None:
    """What a backend stages on its hosts: the copy the experiment fetched before acquiring them (so the hosts
    receive exactly what the ledger records, even if an rsync directory or a Hub branch moved meanwhile);
    fetched now only where this machine has none (a backend used on its own)."""
    return local_copy(loaded, home, refresh=False)


def _hf_copy(loaded: LoadedSpec, root: Path, deadline: float, refresh: bool) -> LocalCopy:
    """The revision's files from the Hub (each fetched once into the home's Hub cache), then hashed."""
    data = loaded.spec.data
    with _locked(root / "hf.lock"):
        got = hf.snapshot(loaded, root / "hf", max(deadline - time.monotonic(), 1.0), refresh=refresh)
        manifest = scan(got.path, root / "hashes" / f"hf-{digest_text(str(got.path))[:32]}.json")
    if not manifest.files:
        raise DataError(f"{loaded.where('data', 'repo')}: {data.repo}@{data.revision} holds no files",
                        hint="check data.repo, data.repo_type and data.revision")
    return LocalCopy(got.path, manifest, (SourceRecord("hf", f"{data.repo_type} {data.repo}@{data.revision}",
                                                       got.resolved, manifest.size, manifest.tree_hash),))


def _rsync_copy(loaded: LoadedSpec, root: Path, deadline: float, refresh: bool) -> LocalCopy:
    """The server's directory, mirrored again on every start (only changes travel), then hashed."""
    url = loaded.spec.data.urls[0]
    folder = root / "rsync" / digest_text(url)[:32]
    with _locked(folder.with_suffix(".lock")):
        mirrored = folder / "mirrored"  # a whole mirror is here (a cut-off one is continued, not used)
        if refresh or not mirrored.exists():
            mirrored.unlink(missing_ok=True)
            rsync.mirror(url, folder / "tree", deadline)
            mirrored.write_text(url)
        manifest = scan(folder / "tree", folder / "hashes.json")
    if not manifest.files:
        raise DataError(f"{loaded.where('data', 'url')}: {url} holds no files",
                        hint="check the module and path (`rsync --list-only URL/` shows what the server has)")
    return LocalCopy(folder / "tree", manifest, (SourceRecord("rsync", url, url, manifest.size, manifest.tree_hash),))


def url_cache_key(urls: list[str], checksums: list[str | None]) -> str:
    """A URL source's folder in a cache: named by its digests where the spec gives them, else by its URLs."""
    return digest_text(*(f"{u} {s or ''}" for u, s in zip(urls, checksums, strict=True)))[:32]


def _url_copy(loaded: LoadedSpec, root: Path, deadline: float) -> LocalCopy:
    data = loaded.spec.data
    urls, checksums = data.urls, data.checksums
    names = [file_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise DataError(f"{loaded.where('data', 'url')}: two URLs end in the same file name"
                        f" ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); they would overwrite"
                        " each other in the data directory", hint="serve them under different names")
    folder = root / "url" / url_cache_key(urls, checksums)
    with _locked(folder.with_suffix(".lock")):
        done = folder / "copy.json"
        if done.exists():
            recorded = json.loads(done.read_text())
            manifest = scan(folder / "tree", folder / "hashes.json")
            if manifest.tree_hash == recorded["tree_hash"]:
                return LocalCopy(folder / "tree", manifest,
                                 tuple(SourceRecord.from_json(s) for s in recorded["sources"]))
            _remove(folder)  # altered since it was made: make it again
        records: list[SourceRecord] = []
        staging = folder / "tree.partial"
        _remove(staging)
        staging.mkdir(parents=True)
        import httpx  # only when something is fetched: not on every command's start-up

        with httpx.Client() as client:
            for url, expected, name in zip(urls, checksums, names, strict=True):
                try:
                    got = fetch(url, root / "downloads" / digest_text(url)[:32] / name, expected=expected,
                                deadline=deadline, client=client)
                except DataError as exc:  # said with the spec's line that names the URL
                    raise DataError(f"{loaded.where('data', 'url')}: {exc.message}", hint=exc.hint) from None
                records.append(SourceRecord("url", url, got.final_url, got.size, got.sha256))
                if is_archive(name):
                    unpack(got.path, name, staging)
                elif (staging / name).exists():
                    raise DataError(f"{url}: the file name {name} is also a path inside an archive of data.url",
                                    hint="rename one of them at its source")
                else:
                    os.replace(got.path, staging / name)
        for url in urls:  # the tree holds it all now; a partial download stays only while unfinished
            shutil.rmtree(root / "downloads" / digest_text(url)[:32], ignore_errors=True)
        manifest = scan(staging)
        make_read_only(staging)
        os.replace(staging, folder / "tree")
        scan(folder / "tree", folder / "hashes.json")  # remember the digests under the final paths
        done.write_text(json.dumps({"tree_hash": manifest.tree_hash, "sources": [r.to_json() for r in records]}))
        return LocalCopy(folder / "tree", manifest, tuple(records))


def _remove(path: Path) -> None:
    """Remove a (read-only) cached folder."""
    if not path.exists():
        return
    for dirpath, _, _ in os.walk(path):
        os.chmod(dirpath, 0o755)
    shutil.rmtree(path)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process fills a cache folder at a time; the others wait and then find it filled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
