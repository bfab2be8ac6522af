"""What a data directory holds, file by file, and the one hash that names it.

A directory's *tree hash* is the SHA-256 of its sorted ``path size sha256`` lines: two
directories with the same tree hash hold the same bytes under the same names, so it is the
key of every host's cache and the checksum the ledger records. Hashing a large local
dataset on every start would be slow, so each file's digest is remembered beside its
size, mtime and inode (`scan`'s ``memo``) and recomputed only when one of them changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ratiocinator.errors import DataError

BLOCK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, "/"-separated
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    files: tuple[FileEntry, ...]

    @property
    def tree_hash(self) -> str:
        lines = "".join(f"{f.path}\0{f.size}\0{f.sha256}\n" for f in self.files)
        return hashlib.sha256(lines.encode()).hexdigest()

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, object]:
        return {"tree_hash": self.tree_hash, "files": [[f.path, f.size, f.sha256] for f in self.files]}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Manifest:
        files = data.get("files")
        assert isinstance(files, list)
        return cls(tuple(FileEntry(str(p), int(s), str(h)) for p, s, h in files))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _files(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Regular files under ``root`` (links to files read as their content; linked directories not entered)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            try:
                info = path.stat()
            except FileNotFoundError:
                raise DataError(f"data file {path} is a broken link",
                                hint="remove it or point it at a file that exists") from None
            if stat.S_ISREG(info.st_mode):
                yield path.relative_to(root).as_posix(), info


def scan(root: Path, memo: Path | None = None) -> Manifest:
    """The manifest of ``root``; ``memo`` (a JSON file) keeps digests of unchanged files between calls."""
    remembered: dict[str, list[int | str]] = {}
    if memo is not None:
        try:
            remembered = json.loads(memo.read_text())
        except (OSError, ValueError):
            remembered = {}
    entries: list[FileEntry] = []
    seen: dict[str, list[int | str]] = {}
    try:
        for rel, info in _files(root):
            signature: list[int | str] = [info.st_size, info.st_mtime_ns, info.st_ino]
            known = remembered.get(rel)
            digest = str(known[3]) if known is not None and known[:3] == signature else file_sha256(root / rel)
            seen[rel] = [*signature, digest]
            entries.append(FileEntry(rel, info.st_size, digest))
    except PermissionError as exc:
        raise DataError(f"cannot read the data file {exc.filename}: permission denied",
                        hint="make it readable by this user") from None
    if memo is not None and seen != remembered:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(json.dumps(seen))
        os.replace(tmp, memo)
    return Manifest(tuple(entries))


def mismatches(root: Path, manifest: Manifest) -> list[str]:
    """How ``root`` differs from ``manifest`` (missing, resized or altered files), hashing every file."""
    problems = []
    for entry in manifest.files:
        path = root / entry.path
        if not path.is_file():
            problems.append(f"{entry.path}: missing")
        elif path.stat().st_size != entry.size:
            problems.append(f"{entry.path}: {path.stat().st_size} bytes, expected {entry.size}")
        elif (actual := file_sha256(path)) != entry.sha256:
            problems.append(f"{entry.path}: sha256 {actual}, expected {entry.sha256}")
    return problems


def make_read_only(root: Path) -> None:
    """Files and directories of a staged copy lose their write bits: runs cannot alter what others read."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                path.chmod(path.stat().st_mode & ~0o222)
        for name in dirnames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                path.chmod(path.stat().st_mode & ~0o222)
    root.chmod(root.stat().st_mode & ~0o222)
