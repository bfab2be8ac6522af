"""The SSH backend: runs arms on machines the user already has (``backend: ssh``, ``hosts:``).

Per host, the orchestrator keeps one SSH connection (asyncssh) and does everything
through it:

* **Host keys** are checked against ``known_hosts`` (the user's, or the one a host
  names) and the backend's own ``<home>/ssh_known_hosts``; with
  ``trust_on_first_use`` an unknown key is pinned there on the first connection. A key
  that differs from a recorded one is always refused, naming both fingerprints.
* **Workspace**: the recorded commit is checked out locally (the local backend's
  cache), sent as a ``git bundle`` over SFTP and cloned on the host, so the host needs
  no credentials; deps and ``deps.verify`` run there through `remote.py`, keyed like
  `workspace.prepare_env` (a ``.ready`` marker holding the key).
* **Runs** start detached (`remote.py start`: own session, output to files), so a
  dropped connection does not touch them. The run's environment travels as a 0600 file
  over SFTP, deleted once read; no secret is ever on a command line. Output is streamed
  by reading the remote log files from byte offsets; after a connection loss the
  backend reconnects with backoff and continues from the last offset. Past the
  reconnect budget the run ends as ``infra`` (transient): `HostLost`.
* **Artifacts**: the remote ``RATIOCINATOR_OUT_DIR`` is copied into the local out dir
  over SFTP without following symlinks; only links that stay inside (relative, no
  ``..``) are recreated, others are skipped and listed in ``artifacts_skipped.txt``.
* Nothing is ever uploaded from ``~/.ssh``: the only uploads are the launcher, the
  bundle, LFS files of the checkout, and per-run ``run.json``/``env.json``; agent
  forwarding is off.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import json
import os
import posixpath
import secrets
import shlex
import signal
import stat
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography.utils import CryptographyDeprecationWarning

with warnings.catch_warnings():  # asyncssh still names DSA and TripleDES: a warning per import, not ours to act on
    warnings.simplefilter("ignore", CryptographyDeprecationWarning)
    import asyncssh

from ratiocinator.backends import remote
from ratiocinator.backends.artifacts import safe_link, write_skipped
from ratiocinator.backends.base import (
    Backend,
    ExitInfo,
    FollowedRunHandle,
    HardwareFinding,
    Host,
    LaunchFailure,
    LaunchRequest,
    RunHandle,
    Slot,
    Stream,
    Workspace,
)
from ratiocinator.backends.process import launch_failure
from ratiocinator.backends.ssh_data import Upload, stage_over_sftp
from ratiocinator.data.local_copy import LocalCopy, prepared_copy
from ratiocinator.errors import BackendError, WorkspaceError
from ratiocinator.execution import contract
from ratiocinator.execution.environment import (
    PROBE,
    PROBE_TIMEOUT_S,
    environment_from_output,
    requirement_names,
)
from ratiocinator.execution.supervisor import SLACK_S as DEADLINE_SLACK_S
from ratiocinator.repo import workspace as ws
from ratiocinator.spec.models import LoadedSpec, SshHost
from ratiocinator.store.paths import Paths

T = TypeVar("T")

READ_MAX = 1 << 22  # bytes per log read; a full read is followed at once by the next
RUN_RECORDS = "ssh_runs"
# Variables that describe the orchestrator's machine, not the host: never forwarded when
# inherited from the orchestrator's environment (the host's own login values apply).
MACHINE_LOCAL = frozenset({
    "HOME", "PATH", "USER", "LOGNAME", "SHELL", "PWD", "OLDPWD", "SHLVL", "_", "TERM", "TERMCAP", "COLORTERM",
    "DISPLAY", "WAYLAND_DISPLAY", "HOSTNAME", "MAIL", "TMPDIR", "TMP", "TEMP", "LD_LIBRARY_PATH", "LD_PRELOAD",
    "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CUDA_VISIBLE_DEVICES", "GIT_EXEC_PATH", "PS1", "MANPATH",
})
MACHINE_LOCAL_PREFIXES = ("SSH_", "XDG_", "DBUS_", "CONDA_", "GPG_", "TMUX", "KRB5", "WINDOWID", "VSCODE_")


class HostLost(LaunchFailure):
    """The host stayed unreachable past the reconnect budget: the run ends as ``infra``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True, failure="infra")


@dataclass(frozen=True)
class SshSlot(Slot):
    """A slot on one of the hosts; the label names the host so the ledger says where a run ran."""

    machine: str = ""

    @property
    def label(self) -> str:
        return f"{self.machine}/{super().label}"


_LOST: tuple[type[BaseException], ...] = (
    asyncssh.DisconnectError, asyncssh.ChannelOpenError, asyncssh.sftp.SFTPConnectionLost,
    asyncssh.sftp.SFTPNoConnection,  # an SFTP call on a connection that has just dropped
    OSError, asyncio.TimeoutError, EOFError,
)


def fingerprint(key: asyncssh.SSHKey) -> str:
    return f"{key.get_algorithm()} {key.get_fingerprint('sha256')}"


class _Client(asyncssh.SSHClient):
    """Checks the host key itself, so a refusal can say which key was expected."""

    def __init__(self, machine: _Machine) -> None:
        self.machine = machine
        self.lost = False
        self.offered: asyncssh.SSHKey | None = None
        self.expected: list[asyncssh.SSHKey] = []
        self.pin = False

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        self.offered = key
        self.expected = self.machine.known_keys(addr)
        if self.expected:
            return key in self.expected
        self.pin = self.machine.config.trust_on_first_use
        return self.pin

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class _Machine:
    """One host: its connection (reopened after a loss), launcher, checkout and venv."""

    def __init__(self, config: SshHost, home: Path, *, reconnect_budget_s: float, connect_timeout_s: float,
                 keepalive_s: float) -> None:
        self.config = config
        self.home = home
        self.reconnect_budget_s = reconnect_budget_s
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.lock = asyncio.Lock()
        self.conn: asyncssh.SSHClientConnection | None = None
        self.sftp: asyncssh.SFTPClient | None = None
        self.client: _Client | None = None
        self.outage_since: float | None = None
        self.workdir = ""
        self.launcher = ""
        self.host_key = ""
        self.pinned_now = False
        self.reconnects = 0
        self.checkout: str | None = None
        self.venv: str | None = None
        self.data_dir: str | None = None  # the host's copy of the spec's data
        self.uploads: list[Upload] = []  # what each staging of the data sent

    # -- host keys ------------------------------------------------------------------

    @property
    def pin_file(self) -> Path:
        return Paths(self.home).ssh_known_hosts

    def known_hosts_files(self) -> list[Path]:
        user = Path(self.config.known_hosts or "~/.ssh/known_hosts").expanduser()
        return [user, self.pin_file]

    def known_keys(self, addr: str) -> list[asyncssh.SSHKey]:
        keys: list[asyncssh.SSHKey] = []
        for path in self.known_hosts_files():
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise BackendError(f"cannot read the known_hosts file {path}: {exc.strerror or exc}",
                                   hint="fix its permissions, or point hosts[].known_hosts at a readable file") from exc
            try:
                for key in asyncssh.import_known_hosts(text).match(self.config.host, addr, self.config.port)[0]:
                    if key not in keys:  # a line may match both by name and by address
                        keys.append(key)
            except (ValueError, asyncssh.KeyImportError) as exc:
                hint = "fix or remove the bad line (`ssh-keygen -l -f FILE` lists what it can read)"
                raise BackendError(f"the known_hosts file {path} is malformed: {exc}", hint=hint) from exc
        return keys

    def _pin(self, key: asyncssh.SSHKey) -> None:
        """Record a key trusted on first use, with when, so later connections must match it."""
        self.pin_file.parent.mkdir(parents=True, exist_ok=True)
        line = f"{self.config.known_hosts_name} {key.export_public_key('openssh').decode().strip()}\n"
        note = f"# pinned on first use {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: {self.config.label} {fingerprint(key)}\n"
        with open(self.pin_file, "a") as fh:
            fh.write(note + line)

    # -- the connection -----------------------------------------------------------------

    async def _open(self) -> None:
        cfg = self.config
        client = _Client(self)
        options: dict[str, Any] = {}
        if cfg.identity_file:
            options["client_keys"] = [str(Path(cfg.identity_file).expanduser())]
        if cfg.user:
            options["username"] = cfg.user
        try:
            conn = await asyncio.wait_for(asyncssh.connect(
                cfg.host, cfg.port, client_factory=lambda: client, known_hosts=([], [], []),
                agent_forwarding=False, keepalive_interval=self.keepalive_s, keepalive_count_max=3,
                login_timeout=self.connect_timeout_s, **options,
            ), self.connect_timeout_s)
        except asyncssh.HostKeyNotVerifiable:
            raise self._key_error(client) from None
        except asyncssh.PermissionDenied as exc:
            raise BackendError(
                f"SSH login to {cfg.label} was refused: {exc.reason}",
                hint="check hosts[].user and hosts[].identity_file (or your ssh-agent), and that the public key is in"
                " the host's ~/.ssh/authorized_keys",
            ) from None
        if client.pin and client.offered is not None:
            self._pin(client.offered)
            self.pinned_now = True
        self.host_key = fingerprint(client.offered) if client.offered is not None else "unknown"
        try:
            sftp = await conn.start_sftp_client()
            if not self.workdir:
                self.workdir = await self._resolve_workdir(sftp)
            self.launcher = await self._upload_launcher(sftp)
        except BaseException:
            conn.close()
            raise
        self.conn, self.sftp, self.client = conn, sftp, client

    def _key_error(self, client: _Client) -> BackendError:
        cfg = self.config
        offered = fingerprint(client.offered) if client.offered is not None else "an unreadable key"
        files = " and ".join(str(p) for p in self.known_hosts_files())
        if client.expected:
            expected = ", ".join(fingerprint(k) for k in client.expected)
            return BackendError(
                f"the host key of {cfg.label} has CHANGED: it offered {offered}, but {files} record(s) {expected};"
                " refusing to connect (someone may be intercepting the connection, or the host was reinstalled)",
                hint=f"if the change is expected, remove the old key (`ssh-keygen -R '{cfg.known_hosts_name}' -f FILE`"
                " for each file above) and connect again",
            )
        return BackendError(
            f"the host key of {cfg.label} ({offered}) is not in {files}; refusing to connect to an unverified host",
            hint=f"connect once with `ssh -p {cfg.port} {cfg.label.rsplit(':', 1)[0]}` and check the fingerprint,"
            " or set trust_on_first_use: true on this host to pin its key on the first connection",
        )

    async def _resolve_workdir(self, sftp: asyncssh.SFTPClient) -> str:
        workdir = self.config.workdir
        if workdir == "~" or workdir.startswith("~/"):
            home = await sftp.realpath(".")
            workdir = posixpath.join(home, workdir[2:]) if workdir != "~" else home
        elif not workdir.startswith("/"):
            workdir = posixpath.join(await sftp.realpath("."), workdir)
        await sftp.makedirs(posixpath.join(workdir, "bin"), exist_ok=True)
        return posixpath.normpath(workdir)

    async def _upload_launcher(self, sftp: asyncssh.SFTPClient) -> str:
        """`remote.py`, once per host and version (its hash is in its name)."""
        source = Path(remote.__file__).read_bytes()
        path = posixpath.join(self.workdir, "bin", f"remote-{hashlib.sha256(source).hexdigest()[:12]}.py")
        if not await sftp.exists(path):
            tmp = f"{path}.tmp-{secrets.token_hex(4)}"
            async with sftp.open(tmp, "wb") as fh:
                await fh.write(source)
            await sftp.posix_rename(tmp, path)
        return path

    async def session(self) -> tuple[asyncssh.SSHClientConnection, asyncssh.SFTPClient]:
        """The live connection, reconnecting with backoff; `HostLost` past the budget."""
        async with self.lock:
            if self.conn is not None and self.client is not None and not self.client.lost:
                assert self.sftp is not None
                return self.conn, self.sftp
            reconnect = self.conn is not None or self.outage_since is not None
            self._forget()
            if self.outage_since is None:
                self.outage_since = time.monotonic()
            delay = 0.25
            while True:
                try:
                    await self._open()
                    if reconnect:
                        self.reconnects += 1
                    assert self.conn is not None and self.sftp is not None
                    return self.conn, self.sftp
                except BackendError:
                    raise
                except _LOST as exc:
                    waited = time.monotonic() - self.outage_since
                    if waited + delay > self.reconnect_budget_s:
                        raise HostLost(
                            f"lost the SSH connection to {self.config.label} and could not reconnect within"
                            f" {self.reconnect_budget_s:g}s: {type(exc).__name__}: {exc}"
                        ) from None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

    def _forget(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = self.sftp = self.client = None

    async def call(self, op: Callable[[asyncssh.SSHClientConnection, asyncssh.SFTPClient], Awaitable[T]]) -> T:
        """Run ``op`` on the live connection; after a connection loss, reconnect and run it again.

        Every ``op`` is idempotent (reads from offsets, ``start`` guarded by a marker).
        """
        while True:
            conn, sftp = await self.session()
            try:
                result = await op(conn, sftp)
            except _LOST:
                async with self.lock:
                    if self.conn is conn:
                        self._forget()
                        if self.outage_since is None:
                            self.outage_since = time.monotonic()
                continue
            self.outage_since = None
            return result

    async def launcher_run(self, *args: str, input: str | None = None) -> asyncssh.SSHCompletedProcess:
        """``python3 remote.py ARGS`` on the host; arguments are paths and numbers, never secrets."""
        # Built per attempt: the launcher's path is known once a connection is open.
        return await self.call(lambda conn, _: conn.run(shlex.join([self.config.python, self.launcher, *args]),
                                                        input=input, check=False))

    async def close(self) -> None:
        async with self.lock:
            conn = self.conn
            self._forget()
        if conn is not None:
            await conn.wait_closed()


# -- runs ----------------------------------------------------------------------------------


async def _read_from(sftp: asyncssh.SFTPClient, path: str, offset: int) -> bytes:
    try:
        async with sftp.open(path, "rb") as fh:
            return await fh.read(READ_MAX, offset)
    except asyncssh.SFTPNoSuchFile:
        return b""


async def _read_json(sftp: asyncssh.SFTPClient, path: str) -> Any:
    try:
        async with sftp.open(path, "rb") as fh:
            return json.loads(await fh.read())
    except asyncssh.SFTPNoSuchFile:
        return None
    except ValueError:
        return None  # mid-write; written atomically, so the next poll sees it whole


class SshRunHandle(FollowedRunHandle):
    """A run on a host, followed by polling its files over the host's connection."""

    def __init__(self, machine: _Machine, rundir: str, local_out: Path, log_dir: Path, pid: int, pid_start: int | None,
                 record: Path, *, poll_s: float, alive_check_s: float) -> None:
        self.machine = machine
        self.rundir = rundir
        self.local_out = local_out
        self.log_dir = log_dir
        self.pid = pid
        self.pid_start = pid_start
        self.record = record
        self.poll_s = poll_s
        self.alive_check_s = alive_check_s
        self._start_following()
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        offsets: dict[Stream, int] = {"stdout": 0, "stderr": 0}
        rundir = self.rundir

        async def tick(_: Any, sftp: asyncssh.SFTPClient) -> tuple[Any, list[tuple[Stream, bytes]]]:
            status = await _read_json(sftp, f"{rundir}/exit_status")
            chunks: list[tuple[Stream, bytes]] = []
            for name in ("stdout", "stderr"):
                offset = offsets[name]
                while True:  # after the exit, read to the end; before it, what is there now
                    data = await _read_from(sftp, f"{rundir}/{name}.log", offset)
                    if data:
                        chunks.append((name, data))
                        offset += len(data)
                    if len(data) < READ_MAX:
                        break
            return status, chunks

        try:
            last_alive = time.monotonic()
            while True:
                status, chunks = await self.machine.call(tick)
                for name, data in chunks:
                    offsets[name] += len(data)
                    self._chunks.put_nowait((name, data))
                if status is not None:
                    break
                if time.monotonic() - last_alive > self.alive_check_s:
                    last_alive = time.monotonic()
                    alive = await self.machine.launcher_run("alive", rundir)
                    if str(alive.stdout).strip() == "0" and await self.machine.call(
                            lambda _, sftp: _read_json(sftp, f"{rundir}/exit_status")) is None:
                        raise LaunchFailure(
                            f"the run's supervisor on {self.machine.config.label} is gone without recording an exit"
                            f" status (was the host rebooted, or its processes killed?); run dir {rundir}",
                            transient=True,
                        )
                    continue
                await asyncio.sleep(self.poll_s)
            await collect_artifacts(self.machine, f"{rundir}/out", self.local_out, self.log_dir)
            self.record.unlink(missing_ok=True)  # ended: nothing left for kill_orphan
            self._exited.set_result(ExitInfo(exit_code=status.get("exit_code"), signal=status.get("signal")))
        except LaunchFailure as exc:
            self._exited.set_exception(exc)
        except Exception as exc:  # noqa: BLE001 - anything unexpected still ends the run, as infra
            self._exited.set_exception(LaunchFailure(
                f"following the run on {self.machine.config.label} failed: {exc!r}", transient=True))
        finally:  # on a lost host the record stays: the run may live on, for reconcile to kill
            self._chunks.put_nowait(None)

    async def _signal(self, sig: int) -> None:
        try:
            await self.machine.launcher_run("signal", self.rundir, str(int(sig)))
        except LaunchFailure:
            pass  # the host is gone; its run ends as infra through wait()

    async def cancel(self, grace_s: float = 5.0) -> None:
        await self._signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), grace_s)
        except (TimeoutError, LaunchFailure):
            pass
        await self._signal(signal.SIGKILL)

    async def reap_strays(self) -> None:
        await self._signal(signal.SIGKILL)


async def collect_artifacts(machine: _Machine, remote_out: str, local_out: Path, log_dir: Path) -> None:
    """Copy the remote out dir into ``local_out`` over SFTP, never following a symlink."""
    skipped: list[str] = []

    async def copy(_: Any, sftp: asyncssh.SFTPClient) -> None:
        skipped.clear()

        async def walk(rel: str) -> None:
            try:
                entries = await sftp.readdir(posixpath.join(remote_out, rel) if rel else remote_out)
            except asyncssh.SFTPNoSuchFile:
                return
            for entry in entries:
                name = entry.filename if isinstance(entry.filename, str) else entry.filename.decode()
                if name in (".", "..") or "/" in name:
                    continue
                child = posixpath.join(rel, name) if rel else name
                source = posixpath.join(remote_out, child)
                dest = local_out / child
                attrs = await sftp.lstat(source)  # readdir's attrs may come from stat on some servers
                mode = attrs.permissions or 0
                if stat.S_ISLNK(mode):
                    target = await sftp.readlink(source)
                    if safe_link(target):
                        dest.unlink(missing_ok=True)
                        os.symlink(target, dest)
                    else:
                        skipped.append(f"{child} -> {target}")
                elif stat.S_ISDIR(mode):
                    dest.mkdir(exist_ok=True)
                    await walk(child)
                elif stat.S_ISREG(mode):
                    if dest.is_symlink():
                        dest.unlink()
                    await sftp.get(source, str(dest), preserve=False, follow_symlinks=False)
                else:
                    skipped.append(f"{child} (not a regular file, directory or link)")

        local_out.mkdir(parents=True, exist_ok=True)
        await walk("")

    await machine.call(copy)
    write_skipped(log_dir, "host", skipped)


# -- the backend ---------------------------------------------------------------------------


class SshBackend(Backend):
    """Runs on the spec's ``hosts``; one `Host` whose slots span all of them."""

    name = "ssh"

    @classmethod
    def from_spec(cls, loaded: LoadedSpec, home: Path) -> SshBackend:
        return cls(loaded.spec.hosts, home)

    @classmethod
    def price_per_hour(cls, loaded: LoadedSpec) -> float:
        """The dearest host's price: any run may land on it."""
        spec = loaded.spec
        return max(h.price_per_hour if h.price_per_hour is not None else spec.hardware.price_per_hour
                   for h in spec.hosts)

    def __init__(self, hosts: Sequence[SshHost], home: Path, *, reconnect_budget_s: float = 120.0,
                 connect_timeout_s: float = 20.0, keepalive_s: float = 5.0, poll_s: float = 0.25,
                 alive_check_s: float = 10.0, default_price_per_hour: float | None = None,
                 allow_empty: bool = False) -> None:
        if not hosts and not allow_empty:  # a backend that adds hosts as it rents them may start with none
            raise BackendError("backend: ssh needs at least one entry under hosts:",
                               hint="add hosts: [{host: gpu-box.example.org, user: me}] to the spec")
        self.home = Path(home).expanduser().resolve()
        self.hosts = list(hosts)
        self.poll_s = poll_s
        self.alive_check_s = alive_check_s
        self.default_price = default_price_per_hour
        self._connect_timeout_s, self._keepalive_s = connect_timeout_s, keepalive_s
        self._reconnect_budget_s = reconnect_budget_s
        self.machines = [_Machine(h, self.home, reconnect_budget_s=reconnect_budget_s,
                                  connect_timeout_s=connect_timeout_s, keepalive_s=keepalive_s) for h in self.hosts]
        self._by_slot: dict[int, _Machine] = {}
        self.orphan_errors: list[str] = []  # why kill_orphan could not reach a host
        self._local_checkout: Path | None = None
        self._lfs_names: list[str] = []  # the commit's files under Git LFS: each run's copy gets their content
        self._data: LocalCopy | None = None  # the spec's data on this machine: each host receives a copy
        self.staging_s: dict[str, float] = {}  # host label -> seconds its data took to arrive
        # Run directories on a host are named so that two orchestrators (two --home) never collide.
        self._tag = hashlib.sha256(str(self.home).encode()).hexdigest()[:8]

    @property
    def reconnects(self) -> int:
        return sum(m.reconnects for m in self.machines)

    # -- hardware and hosts ------------------------------------------------------------

    def check_hardware(self, loaded: LoadedSpec) -> list[HardwareFinding]:
        hw = loaded.spec.hardware
        out: list[HardwareFinding] = []
        if hw.num_gpus:
            short = [f"{h.label} lists {len(h.gpus or [])}" for h in self.hosts if len(h.gpus or []) < hw.num_gpus]
            if short:
                listed = "; ".join(short) + " GPU index(es) in hosts[].gpus"
            else:
                listed = "every host lists enough in hosts[].gpus"
            out.append(HardwareFinding("num_gpus", "unmet" if short else "ok",
                                       f"needs {hw.num_gpus} per run; {listed}"))
        for name in ("gpu", "min_cuda_version", "min_cpu_ram_gb", "disk_gb"):
            if getattr(hw, name) is not None:
                out.append(HardwareFinding(name, "unknown", "not probed on SSH hosts; the hosts are used as they are"))
        for name in ("min_inet_down", "image"):
            if getattr(hw, name) is not None:
                out.append(HardwareFinding(name, "not_applicable",
                                           "SSH hosts are the user's own machines, not rentals"))
        if hw.max_dph is not None:
            price = self._price(loaded)
            out.append(HardwareFinding("max_dph", "ok" if price <= hw.max_dph else "unmet",
                                       f"highest host price ${price:g}/h vs max_dph ${hw.max_dph:g}"))
        return out

    def _price(self, loaded: LoadedSpec) -> float:
        default = self.default_price if self.default_price is not None else loaded.spec.hardware.price_per_hour
        return max(h.price_per_hour if h.price_per_hour is not None else default for h in self.hosts)

    def _slots(self, loaded: LoadedSpec) -> tuple[SshSlot, ...]:
        slots = []
        self._by_slot = {}
        for index, (machine, gpus) in enumerate(self._host_slots(self.machines, loaded)):
            slots.append(SshSlot(index, gpus, machine.config.label))
            self._by_slot[index] = machine
        return tuple(slots)

    def _host_slots(self, machines: Sequence[_Machine], loaded: LoadedSpec) -> list[tuple[_Machine, tuple[int, ...]]]:
        """(machine, GPU indices) per slot, interleaved across machines, capped at the spec's concurrency."""
        per_run = loaded.spec.hardware.num_gpus
        per_host: list[list[tuple[_Machine, tuple[int, ...]]]] = []
        for i, machine in enumerate(machines):
            cfg = machine.config
            if per_run:
                gpus = cfg.gpus or []
                capacity = len(gpus) // per_run
                if capacity == 0:
                    raise BackendError(
                        f"hosts[{i}] ({cfg.label}): the spec needs {per_run} GPU(s) per run"
                        f" and the host lists {len(gpus)}",
                        hint=f"list the host's GPU indices, e.g. gpus: {list(range(per_run))},"
                        " or set hardware.num_gpus: 0",
                    )
                chunks = [tuple(gpus[k * per_run:(k + 1) * per_run]) for k in range(min(cfg.slots, capacity))]
            else:
                chunks = [()] * cfg.slots
            per_host.append([(machine, c) for c in chunks])
        interleaved = [entry for group in _zip_longest(per_host) for entry in group]
        if loaded.spec.concurrency:
            interleaved = interleaved[: loaded.spec.concurrency]
        return interleaved

    async def acquire(self, loaded: LoadedSpec) -> Host:
        """Connect to every host (verifying its key) and size the slots."""
        slots = self._slots(loaded)
        info = await self._probe(self.machines)
        name = "ssh:" + ",".join(m.config.label for m in self.machines)
        return Host(name=name, slots=slots, price_per_hour=self._price(loaded), info=info)

    async def add_hosts(self, hosts: Sequence[SshHost], loaded: LoadedSpec, *, probe_budget_s: float | None = None
                        ) -> tuple[tuple[SshSlot, ...], dict[str, str]]:
        """Join more hosts after `acquire` (rented replacements): probe them, and give their slots fresh indices.

        ``probe_budget_s`` bounds the first connection (a booting host: the caller retries).
        """
        machines = [_Machine(h, self.home, reconnect_budget_s=probe_budget_s or self._reconnect_budget_s,
                             connect_timeout_s=self._connect_timeout_s, keepalive_s=self._keepalive_s) for h in hosts]
        try:
            info = await self._probe(machines)
        except BaseException:
            await asyncio.gather(*(m.close() for m in machines), return_exceptions=True)
            raise
        for machine in machines:
            machine.reconnect_budget_s = self._reconnect_budget_s
        start = max(self._by_slot, default=-1) + 1
        slots: list[SshSlot] = []
        for machine, gpus in self._host_slots(machines, loaded):
            slots.append(SshSlot(start + len(slots), gpus, machine.config.label))
            self._by_slot[slots[-1].index] = machine
        self.machines.extend(machines)
        self.hosts.extend(hosts)
        return tuple(slots), info

    async def drop_host(self, label: str) -> None:
        """Forget a host (a destroyed instance): close its connection; its slots stop resolving."""
        gone = [m for m in self.machines if m.config.label == label]
        self.machines = [m for m in self.machines if m.config.label != label]
        self.hosts = [h for h in self.hosts if h.label != label]
        self._by_slot = {i: m for i, m in self._by_slot.items() if m.config.label != label}
        await asyncio.gather(*(m.close() for m in gone), return_exceptions=True)

    async def _probe(self, machines: Sequence[_Machine]) -> dict[str, str]:
        info: dict[str, str] = {}

        async def probe(machine: _Machine) -> None:
            try:
                done = await machine.launcher_run("facts")
            except HostLost as exc:
                raise BackendError(f"cannot reach {machine.config.label}: {exc}",
                                   hint="check the address, port and that sshd runs there"
                                        " (`ssh -p PORT user@host true`)") from None
            if done.exit_status != 0:
                raise BackendError(
                    f"{machine.config.python} on {machine.config.label} cannot run the launcher"
                    f" (exit {done.exit_status}): {str(done.stderr).strip()[-300:]}",
                    hint="install Python 3 on the host, or set hosts[].python to its interpreter",
                )
            facts = json.loads(str(done.stdout).strip().splitlines()[-1])
            key = machine.host_key + (" (pinned now: trust_on_first_use)" if machine.pinned_now else "")
            info[f"ssh {machine.config.label}"] = (
                f"{facts.get('hostname')}, {facts.get('cpus')} cpus, {facts.get('ram_gb', '?')} GB RAM,"
                f" python {facts.get('python')}, host key {key}")

        await asyncio.gather(*(probe(m) for m in machines))
        return info

    # -- the workspace -------------------------------------------------------------------

    async def prepare(
        self, host: Host, loaded: LoadedSpec, commit: str, *, on_output: Callable[[str], None] | None = None
    ) -> Workspace:
        return await self.prepare_hosts([m.config.label for m in self.machines], loaded, commit, on_output=on_output)

    async def prepare_hosts(self, labels: Sequence[str], loaded: LoadedSpec, commit: str, *,
                            on_output: Callable[[str], None] | None = None) -> Workspace:
        """Prepare the workspace on the named hosts only (hosts that joined after `prepare`)."""
        spec = loaded.spec
        repo = ws.resolve_repo_url(spec.repo_url, loaded.path.parent)
        checkout = await asyncio.to_thread(ws.checkout, repo, commit, Paths(self.home).repos,
                                           lfs_timeout_s=spec.download_timeout_s)
        bundle = await asyncio.to_thread(self._bundle, checkout, commit)
        lfs = await asyncio.to_thread(ws.lfs_files, checkout)
        filtered = None
        if spec.deps.requirements is not None:
            filtered = ws.filter_requirements(checkout / spec.deps.requirements,
                                              tuple(spec.deps.exclude_from_requirements), root=checkout)
        job = {
            "pre_install": list(spec.deps.pre_install), "requirements": spec.deps.requirements,
            "verify": spec.deps.verify, "timeout_s": spec.download_timeout_s,
            "material": {
                "commit": commit, "pre_install": list(spec.deps.pre_install), "requirements": spec.deps.requirements,
                "requirements_sha256": hashlib.sha256(filtered.encode()).hexdigest() if filtered is not None else None,
            },
        }
        self._data = await asyncio.to_thread(prepared_copy, loaded, self.home)
        await asyncio.gather(*(self._prepare_machine(m, checkout, commit, bundle, lfs, filtered, job, on_output,
                                                     spec.download_timeout_s)
                               for m in self.machines if m.config.label in labels))
        self._local_checkout = checkout
        self._lfs_names = list(lfs)
        env = {contract.WORKSPACE: str(checkout)}
        if self._data is not None:  # each run gets its own host's copy (`launch` translates the path)
            env[contract.DATA_DIR] = str(self._data.directory)
        return Workspace(checkout=checkout, env=env, staging_s={label: self.staging_s[label] for label in labels
                                                                if label in self.staging_s})

    def _bundle(self, checkout: Path, commit: str) -> Path:
        """A git bundle of the commit (cached): the host clones it without any credentials."""
        path = Paths(self.home).ssh_bundles / f"{commit}.bundle"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            ws._git_ok(["bundle", "create", str(tmp), "HEAD"], cwd=checkout,
                       what=f"bundling commit {commit[:12]} of {checkout} for the SSH hosts")
            os.replace(tmp, path)
        return path

    async def _prepare_machine(self, machine: _Machine, checkout: Path, commit: str, bundle: Path, lfs: list[str],
                               filtered: str | None, job: dict[str, Any],
                               on_output: Callable[[str], None] | None, staging_timeout_s: float) -> None:
        label = machine.config.label
        try:
            await machine.session()
        except HostLost as exc:
            raise BackendError(f"cannot reach {label}: {exc}", hint="check that the host is up and sshd runs") from None
        remote_checkout = posixpath.join(machine.workdir, "checkouts", commit)

        async def present(_: Any, sftp: asyncssh.SFTPClient) -> bool:
            return await sftp.isdir(remote_checkout)

        if not await machine.call(present):
            remote_bundle = posixpath.join(machine.workdir, "bundles", f"{commit}-{secrets.token_hex(4)}.bundle")

            async def upload(_: Any, sftp: asyncssh.SFTPClient) -> None:
                await sftp.makedirs(posixpath.dirname(remote_bundle), exist_ok=True)
                await sftp.makedirs(posixpath.dirname(remote_checkout), exist_ok=True)
                await sftp.put(str(bundle), remote_bundle)

            await machine.call(upload)
            done = await machine.launcher_run("clone", remote_bundle, remote_checkout, commit)
            _raise_step_failure(done, label, remote_checkout, "cloning the commit from its bundle")
            if lfs:
                async def push_lfs(_: Any, sftp: asyncssh.SFTPClient) -> None:
                    for name in lfs:
                        await sftp.put(str(checkout / name), posixpath.join(remote_checkout, name))

                await machine.call(push_lfs)
        text = filtered.replace(str(checkout), remote_checkout) if filtered is not None else None
        payload = json.dumps({**job, "checkout": remote_checkout, "envs_dir": posixpath.join(machine.workdir, "envs"),
                              "requirements_text": text})
        async def run_prepare(conn: asyncssh.SSHClientConnection, _: Any) -> tuple[int | None, list[str], str]:
            command = shlex.join([machine.config.python, machine.launcher, "prepare"])
            lines: list[str] = []
            async with conn.create_process(command) as proc:
                proc.stdin.write(payload)
                proc.stdin.write_eof()
                async for line in proc.stdout:
                    line = line.rstrip("\n")
                    lines.append(line)
                    if on_output is not None and not line.startswith("RATIOCINATOR_"):
                        on_output(f"[{label}] {line}")
                stderr = await proc.stderr.read()
                await proc.wait()
            return proc.exit_status, lines, stderr

        code, lines, stderr = await machine.call(run_prepare)
        result = _marked(lines, "RATIOCINATOR_PREPARED")
        failed = _marked(lines, "RATIOCINATOR_FAILED")
        if failed is not None:
            raise WorkspaceError(
                f"{failed['title']} {failed['outcome']} on {label} in {remote_checkout}; last lines of its output:\n"
                + "\n".join(failed["tail"][-30:]), hint=failed["hint"])
        if code != 0 or result is None:
            raise WorkspaceError(f"preparing the workspace on {label} failed (exit {code}): {stderr.strip()[-500:]}",
                                 hint="check that the host has Python 3 with venv and git (hosts[].python names it)")
        machine.checkout, machine.venv = remote_checkout, result["venv"]
        if self._data is not None:
            await self._stage_data(machine, self._data, staging_timeout_s, on_output)

    async def environments(self, host: Host, workspace: Workspace, loaded: LoadedSpec) -> list[dict[str, Any]]:
        """Each prepared host's environment, read by the runs' interpreter there (its venv's, else hosts[].python)
        in its checkout, over the host's connection; a host whose probe fails records nothing."""
        requirements = loaded.spec.deps.requirements
        names = requirement_names(Path(workspace.checkout) / requirements) if requirements else []
        prepared = [m for m in self.machines if m.checkout is not None]

        async def probe(machine: _Machine) -> dict[str, Any] | None:
            assert machine.checkout is not None
            python = posixpath.join(machine.venv, "bin", "python") if machine.venv else machine.config.python
            command = f"cd {shlex.quote(machine.checkout)} && {shlex.quote(python)} -"  # the probe comes on stdin
            try:
                done = await asyncio.wait_for(
                    machine.call(lambda conn, _: conn.run(command, input=PROBE, check=False)), PROBE_TIMEOUT_S)
            except (HostLost, TimeoutError):
                return None
            if done.exit_status != 0:
                return None
            found = environment_from_output(str(done.stdout), names)
            if found is None:
                return None
            slots = [s.label for s in host.slots if self._by_slot.get(s.index) is machine]
            return {**found, "host": machine.config.label, "slots": slots}

        return [found for found in await asyncio.gather(*(probe(m) for m in prepared)) if found is not None]

    async def _stage_data(self, machine: _Machine, copy: LocalCopy, timeout_s: float,
                          on_output: Callable[[str], None] | None) -> None:
        """The data into the host's cache (see `ssh_data`), within download_timeout_s."""
        label = machine.config.label
        started = time.monotonic()
        try:
            machine.data_dir, upload = await asyncio.wait_for(stage_over_sftp(machine, copy), timeout_s)
        except TimeoutError:
            raise WorkspaceError(f"staging the data ({copy.size:,} bytes) on {label} did not finish within"
                                 f" download_timeout_s ({timeout_s:g}s); what arrived is kept and the next start"
                                 " continues it", hint="raise download_timeout_s, or use a faster link") from None
        except HostLost as exc:
            raise WorkspaceError(f"staging the data on {label} failed: {exc}; what arrived is kept",
                                 hint="check that the host is up, and run the same command again") from None
        self.staging_s[label] = time.monotonic() - started
        machine.uploads.append(upload)
        if on_output is not None:
            said = ("already in its cache" if upload.already_cached else
                    f"{upload.sent_bytes:,} bytes sent in {self.staging_s[label]:.1f}s")
            on_output(f"[{label}] data {copy.tree_hash[:12]}: {said}")

    # -- runs ------------------------------------------------------------------------------

    def _machine(self, slot: Slot) -> _Machine:
        machine = self._by_slot.get(slot.index)
        if machine is None:
            raise LaunchFailure(f"slot {slot.label} is not one of this backend's slots (acquire() made none such)",
                                transient=False)
        return machine

    def remote_env(self, request: LaunchRequest, machine: _Machine, translate: Callable[[str], str],
                   remote_out: str) -> dict[str, str]:
        """What the runner sees on the host: the run's own variables, the forwarded ones, the host's paths.

        Variables inherited unchanged from the orchestrator's environment are forwarded
        when ``env_forward`` allows and they do not describe this machine (PATH, HOME, ...).
        """
        env: dict[str, str] = {}
        for key, value in request.env.items():
            if not contract.is_contract_variable(key) and os.environ.get(key) == value:
                if key in MACHINE_LOCAL or key.startswith(MACHINE_LOCAL_PREFIXES):
                    continue
                if not any(fnmatch.fnmatchcase(key, p) for p in machine.config.env_forward):
                    continue
            env[key] = translate(value)
        for key in ("PATH", "VIRTUAL_ENV", "CUDA_VISIBLE_DEVICES"):
            env.pop(key, None)  # the launcher sets PATH and VIRTUAL_ENV from the host's venv
        env[contract.OUT_DIR] = remote_out
        if machine.checkout and self._local_checkout is not None:
            env[contract.WORKSPACE] = translate(str(self._local_checkout))  # the run's own copy
        if request.slot.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, request.slot.gpus))
        return env

    async def launch(self, host: Host, request: LaunchRequest) -> RunHandle:
        machine = self._machine(request.slot)
        if machine.checkout is None or self._local_checkout is None:
            raise LaunchFailure(f"{machine.config.label} has no prepared workspace (prepare() did not run)",
                                transient=False)
        if self._data is not None and machine.data_dir is None:
            raise LaunchFailure(f"{machine.config.label} has no copy of the spec's data (prepare() did not stage it)",
                                transient=False)
        rundir = posixpath.join(machine.workdir, "runs", f"{self._tag}-{request.run_id}-{secrets.token_hex(4)}")
        remote_out = f"{rundir}/out"
        local_checkout, local_out = str(self._local_checkout), str(request.out_dir)
        # The run works in its own copy of the host's checkout, which the launcher makes (see remote.py).
        remote_checkout = f"{rundir}/work"

        pairs = [(local_checkout, remote_checkout), (local_out, remote_out)]
        if self._data is not None and machine.data_dir is not None:
            pairs.append((str(self._data.directory), machine.data_dir))

        def translate(value: str) -> str:
            for local, there in pairs:
                if value == local or value.startswith(local + "/"):
                    return there + value[len(local):]
            return value

        env = self.remote_env(request, machine, translate, remote_out)
        cwd = translate(str(request.cwd))
        argv = [translate(a) for a in request.argv]
        run = {"argv": argv, "cwd": cwd, "venv": machine.venv,
               "copy": {"from": machine.checkout, "to": remote_checkout, "lfs": self._lfs_names},
               # the host's supervisor enforces the hard timeout even when this orchestrator is gone
               "deadline_s": None if request.timeout_s is None else request.timeout_s + DEADLINE_SLACK_S}

        async def upload(_: Any, sftp: asyncssh.SFTPClient) -> None:
            await sftp.makedirs(posixpath.dirname(rundir), exist_ok=True)
            if not await sftp.exists(rundir):
                await sftp.mkdir(rundir, asyncssh.SFTPAttrs(permissions=0o700))
            await sftp.makedirs(remote_out, exist_ok=True)
            async with sftp.open(f"{rundir}/run.json", "w", asyncssh.SFTPAttrs(permissions=0o600)) as fh:
                await fh.write(json.dumps(run))
            tmp = f"{rundir}/env.json.tmp"
            async with sftp.open(tmp, "w", asyncssh.SFTPAttrs(permissions=0o600)) as fh:
                await fh.write(json.dumps(env))
            await sftp.posix_rename(tmp, f"{rundir}/env.json")

        try:
            await machine.call(upload)
            done = await machine.launcher_run("start", rundir)
        except HostLost as exc:
            raise LaunchFailure(str(exc), transient=True) from None
        except BackendError as exc:  # a changed host key mid-experiment: not something a retry fixes
            raise LaunchFailure(str(exc), transient=False) from None
        try:
            reply = json.loads(str(done.stdout).strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise LaunchFailure(
                f"the launcher on {machine.config.label} failed (exit {done.exit_status}):"
                f" {str(done.stderr).strip()[-300:]}",
                transient=True) from None
        if "launch_error" in reply:
            error = reply["launch_error"]
            if error.get("errno") is None:
                raise LaunchFailure(f"cannot start the runner on {machine.config.label}: {error.get('strerror')}",
                                    transient=True)
            raise launch_failure(tuple(argv), OSError(error["errno"], error["strerror"]))
        pid, pid_start = int(reply["pid"]["pid"]), reply["pid"].get("pid_start")
        record = self._record(machine, rundir, pid, pid_start)
        return SshRunHandle(machine, rundir, request.out_dir, request.log_dir, pid, pid_start, record,
                            poll_s=self.poll_s, alive_check_s=self.alive_check_s)

    def _record(self, machine: _Machine, rundir: str, pid: int, pid_start: int | None) -> Path:
        """Which host a (pid, pid_start) of the ledger lives on, for `kill_orphan` after a crash."""
        folder = self.home / RUN_RECORDS
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{pid}-{pid_start}-{secrets.token_hex(4)}.json"
        path.write_text(json.dumps({"host": machine.config.model_dump(), "workdir": machine.workdir,
                                    "rundir": rundir, "pid": pid, "pid_start": pid_start}))
        return path

    async def release(self, host: Host) -> None:
        """Close the connections; runs never outlive a healthy orchestrator, hosts are not rented."""
        await asyncio.gather(*(m.close() for m in self.machines), return_exceptions=True)

    def kill_orphan(self, pid: int, pid_start: int | None) -> bool:
        """Kill a run a dead orchestrator left on a host, found through the record `launch` wrote.

        The ledger keeps only (pid, pid_start); ``<home>/ssh_runs`` maps them to the host and
        run dir. The host checks the start time before killing, so a reused PID is safe.
        Without a record, or when the host is unreachable, nothing is killed (False).
        """
        records = sorted((self.home / RUN_RECORDS).glob(f"{pid}-{pid_start}-*.json"))
        killed = False
        for path in records:
            try:
                data = json.loads(path.read_text())
                config = SshHost.model_validate(data["host"])
            except (OSError, ValueError, KeyError):
                continue
            killed = _run_sync(self._kill_remote(config, data, pid, pid_start)) or killed
            path.unlink(missing_ok=True)
        return killed

    async def _kill_remote(self, config: SshHost, data: dict[str, Any], pid: int, pid_start: int | None) -> bool:
        machine = _Machine(config, self.home, reconnect_budget_s=10.0, connect_timeout_s=10.0, keepalive_s=5.0)
        machine.workdir = data.get("workdir", "")
        try:
            done = await machine.launcher_run("killpid", str(pid), "-" if pid_start is None else str(pid_start))
            return str(done.stdout).strip() == "1"
        except (LaunchFailure, BackendError) as exc:
            self.orphan_errors.append(f"{config.label}: {exc}")
            return False
        finally:
            await machine.close()


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, even when called inside a running loop (own thread)."""
    result: list[Any] = []

    def target() -> None:
        result.append(asyncio.run(coro))

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if not result:
        raise BackendError("killing an orphaned SSH run failed unexpectedly")
    return result[0]


def _zip_longest(groups: list[list[T]]) -> list[list[T]]:
    """Round-robin over hosts, so a concurrency cap spreads runs across machines."""
    rounds: list[list[T]] = []
    for depth in range(max((len(g) for g in groups), default=0)):
        rounds.append([g[depth] for g in groups if depth < len(g)])
    return rounds


def _marked(lines: list[str], marker: str) -> Any:
    """The JSON after the first line that starts with ``marker`` and a space (what remote.py reports), or None."""
    return next((json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith(marker + " ")), None)


def _raise_step_failure(done: asyncssh.SSHCompletedProcess, label: str, where: str, what: str) -> None:
    if done.exit_status == 0:
        return
    lines = str(done.stdout).splitlines()
    failed = _marked(lines, "RATIOCINATOR_FAILED")
    if failed is not None:
        raise WorkspaceError(f"{what} on {label} ({where}): {failed['title']} {failed['outcome']}:\n"
                             + "\n".join(failed["tail"][-20:]), hint=failed["hint"])
    raise WorkspaceError(f"{what} on {label} ({where}) failed (exit {done.exit_status}):"
                         f" {str(done.stderr).strip()[-500:]}",
                         hint="check that git and Python 3 are installed on the host")


__all__ = ["HostLost", "SshBackend", "SshHost", "SshRunHandle", "SshSlot", "collect_artifacts", "fingerprint"]
