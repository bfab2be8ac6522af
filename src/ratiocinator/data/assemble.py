"""A data directory assembled on a node from chunks of its files (how Ray nodes receive the data).

The chunks come from wherever the caller's ``get`` reads them (Ray's object store); each
file's SHA-256 is computed as it is written and checked against the manifest before the
directory is renamed into the node's cache, read-only. A node whose cache already holds
the tree hash fetches nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ratiocinator.data.manifest import Manifest, make_read_only
from ratiocinator.errors import WorkspaceError


def assemble(cache: Path, manifest: Manifest, chunks: dict[str, Sequence[Any]], get: Callable[[Any], bytes]) -> Path:
    """``cache/<tree hash>``, built from ``chunks`` (file path -> chunk handles) unless already there."""
    final = cache / manifest.tree_hash
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{manifest.tree_hash}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return final
        partial = cache / f".partial-{manifest.tree_hash}-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            for entry in manifest.files:
                path = partial / entry.path
                path.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                with open(path, "wb") as fh:
                    for handle in chunks[entry.path]:  # one chunk in memory at a time
                        block = get(handle)
                        digest.update(block)
                        fh.write(block)
                if digest.hexdigest() != entry.sha256:
                    raise WorkspaceError(f"the data file {entry.path} arrived with sha256 {digest.hexdigest()},"
                                         f" expected {entry.sha256}", hint="run again; if it repeats, check the"
                                         " node's disk")
            make_read_only(partial)
            os.rename(partial, final)
        except BaseException:
            for dirpath, _, _ in os.walk(partial):
                os.chmod(dirpath, 0o755)
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return final
