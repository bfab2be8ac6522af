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

import json
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncssh

from ratiocinator.data.local_copy import LocalCopy
from ratiocinator.errors import WorkspaceError

if TYPE_CHECKING:
    from ratiocinator.backends.ssh import _Machine

CHUNK = 1 << 20  # bytes per SFTP write; what arrived before a drop is kept to this grain


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


async def _send(sftp: asyncssh.SFTPClient, copy: LocalCopy, partial: str, upload: Upload) -> None:
    """Every file of the manifest into ``partial``, continuing files a dropped connection cut short."""
    for entry in copy.manifest.files:
        remote = posixpath.join(partial, entry.path)
        await sftp.makedirs(posixpath.dirname(remote), exist_ok=True)
        try:
            offset = (await sftp.stat(remote)).size or 0
        except asyncssh.SFTPNoSuchFile:
            offset = 0
        if offset == entry.size:
            upload.skipped_files += 1
            continue  # whole already; its checksum is checked when sealing
        if offset > entry.size:
            offset = 0
        if offset:
            upload.resumed_files += 1
        async with sftp.open(remote, "r+b" if offset else "wb") as fh:
            with open(copy.directory / entry.path, "rb") as local:
                local.seek(offset)
                while block := local.read(CHUNK):
                    await fh.write(block, offset)
                    offset += len(block)
                    upload.sent_bytes += len(block)
