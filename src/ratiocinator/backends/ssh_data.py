"""The spec's data on an SSH host (and so on a rented Vast.ai instance): uploaded over the host's SFTP
connection into its content-addressed cache, ``<workdir>/data/<tree hash>``.

Files go to ``<workdir>/data/.partial-<tree hash>`` first. After a dropped connection the
upload reconnects (the machine's ``call``) and looks again at what arrived: a file already
whole is not sent again, a file cut short is continued from its last byte. The host then
checks every file's SHA-256 against the manifest (`remote.py seal-data`), removes what does
not match (sent once more), and renames the directory into place read-only. A host whose
cache already holds the tree hash receives nothing, whichever experiment or arm asks.
"""

from __future__ import annotations

import asyncio
import json
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncssh

from ratiocinator.data.local_copy import LocalCopy
from ratiocinator.errors import WorkspaceError

if TYPE_CHECKING:
    from ratiocinator.backends.ssh import _Machine

CHUNK = 256 << 10  # bytes per SFTP write request
WINDOW = 16  # write requests in flight at once: a few MiB per round trip, whatever the link's latency


@dataclass
class Upload:
    """What one staging sent, for the ledger's staging time and for tests of resumption."""

    sent_bytes: int = 0
    skipped_files: int = 0  # already whole on the host (an earlier, interrupted upload)
    resumed_files: int = 0  # continued from where a dropped connection left them
    already_cached: bool = False


def data_root(workdir: str) -> str:
    return posixpath.join(workdir, "data")


async def stage_over_sftp(machine: _Machine, copy: LocalCopy) -> tuple[str, Upload]:
    """The host's copy of ``copy`` (uploaded and sealed unless its cache has it), and what was sent."""
    await machine.session()  # resolves the host's workdir
    root = data_root(machine.workdir)
    final = posixpath.join(root, copy.tree_hash)
    partial = posixpath.join(root, f".partial-{copy.tree_hash}")
    upload = Upload()

    async def cached(_: Any, sftp: asyncssh.SFTPClient) -> bool:
        return await sftp.isdir(final)

    if await machine.call(cached):
        upload.already_cached = True
        return final, upload
    manifest = json.dumps(copy.manifest.to_json())
    for attempt in (1, 2):
        await machine.call(lambda _, sftp: _send(sftp, copy, partial, upload))
        done = await machine.launcher_run("seal-data", partial, final, input=manifest)
        reply = next((json.loads(line.split(" ", 1)[1]) for line in str(done.stdout).splitlines()
                      if line.startswith("RATIOCINATOR_DATA ")), None)
        if reply is not None and reply.get("ok"):
            return final, upload
        if reply is None:
            raise WorkspaceError(f"checking the uploaded data on {machine.config.label} failed (exit"
                                 f" {done.exit_status}): {str(done.stderr).strip()[-500:]}",
                                 hint="check the host's disk space and that hosts[].python runs")
        if attempt == 2:
            shown = "; ".join(f"{b['path']}: {b['problem']}" for b in reply["bad"][:10])
            raise WorkspaceError(f"the data uploaded to {machine.config.label} does not match its checksums twice"
                                 f" over: {shown}", hint="check the host's disk (full, or failing) and run again")
    raise AssertionError("unreachable")


async def _present(sftp: asyncssh.SFTPClient, partial: str, copy: LocalCopy) -> dict[str, int]:
    """Sizes of the files already in ``partial``: one directory listing per folder, not one call per file."""
    sizes: dict[str, int] = {}
    for folder in sorted({posixpath.dirname(f.path) for f in copy.manifest.files}):
        try:
            entries = await sftp.readdir(posixpath.join(partial, folder) if folder else partial)
        except asyncssh.SFTPNoSuchFile:
            continue
        for entry in entries:
            name = entry.filename if isinstance(entry.filename, str) else entry.filename.decode()
            if entry.attrs.size is not None:
                sizes[posixpath.join(folder, name) if folder else name] = entry.attrs.size
    return sizes


async def _send(sftp: asyncssh.SFTPClient, copy: LocalCopy, partial: str, upload: Upload) -> None:
    """Every file of the manifest into ``partial``, continuing files a dropped connection cut short.

    Writes go out WINDOW chunks at a time (one round trip per window, not per chunk); windows
    complete in order, so after a drop only the last window can have holes, and a file is
    continued from one window before its end: those bytes are the same and are written again.
    """
    present = await _present(sftp, partial, copy)
    made: set[str] = set()  # folders created (or found) on the host
    for entry in copy.manifest.files:
        remote = posixpath.join(partial, entry.path)
        folder = posixpath.dirname(remote)
        if folder not in made:
            await sftp.makedirs(folder, exist_ok=True)
            made.add(folder)
        there = present.get(entry.path, 0)
        if there == entry.size:
            upload.skipped_files += 1
            continue  # whole already; its checksum is checked when sealing
        offset = max(0, min(there, entry.size) - WINDOW * CHUNK) // CHUNK * CHUNK
        if offset:
            upload.resumed_files += 1
        async with sftp.open(remote, "r+b" if there else "wb") as fh:
            if there > entry.size:
                await fh.truncate(entry.size)
            with open(copy.directory / entry.path, "rb") as local:
                local.seek(offset)
                while True:
                    blocks = [block for block in (local.read(CHUNK) for _ in range(WINDOW)) if block]
                    if not blocks:
                        break
                    starts = [offset + i * CHUNK for i in range(len(blocks))]
                    await asyncio.gather(*(fh.write(block, at) for block, at in zip(blocks, starts, strict=True)))
                    offset += sum(len(b) for b in blocks)
                    upload.sent_bytes += sum(len(b) for b in blocks)
