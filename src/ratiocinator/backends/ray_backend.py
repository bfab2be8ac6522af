"""The Ray backend (``backend: ray``): each run is a Ray actor on an existing cluster.

* **Slots** are how many runs fit the cluster at once: per node, its CPUs over the
  per-run CPUs (and its GPUs over ``hardware.num_gpus``), summed over alive nodes.
  Ray itself decides where each run goes; a slot is a ticket, not a place.
* **Workspaces** are per node, keyed by node id (nodes of a local cluster share a
  filesystem, real ones do not): the commit travels once as a git bundle through the
  object store, and each node clones it and builds the venv once (``workspace.py``'s
  cache keys and locks), ahead of time on the nodes alive at ``prepare`` and on demand
  on a node that joins later.
* **Runs**: a run actor requests the spec's CPUs/GPUs (Ray sets ``CUDA_VISIBLE_DEVICES``),
  starts the runner in its own process group on its node, writing logs there; the
  handle polls ``read(offset)`` so output and metric points stream while the run lives.
  After exit the run's out dir comes back as bytes (links only if they stay inside).
* **A lost node or worker** ends the run with ``LaunchFailure(transient=True, "infra")``
  from ``wait()``: the executor records ``infra`` and retries, wherever Ray has room.

``import ray`` happens only here, lazily: nothing else in ratiocinator needs Ray.
Ray's worker processes must be able to import ``ratiocinator`` (install it on the nodes).
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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
from ratiocinator.backends.process import launch_failure, process_start_time
from ratiocinator.data.assemble import assemble
from ratiocinator.data.local_copy import prepared_copy
from ratiocinator.data.manifest import Manifest
from ratiocinator.errors import BackendError, WorkspaceError
from ratiocinator.execution import contract
from ratiocinator.execution.environment import probe_environment
from ratiocinator.extras import require
from ratiocinator.repo import workspace as ws
from ratiocinator.spec.models import LoadedSpec
from ratiocinator.store.paths import Paths

NAMESPACE = "ratiocinator"
CHUNK = 1 << 20
LFS_CHUNK = 64 << 20  # bytes per object-store object when shipping a Git LFS file to the nodes
RUN_RECORDS = "ray_runs"
# The orchestrator's own variables that describe its machine, not the node's.
MACHINE_LOCAL = frozenset({
    "HOME", "PATH", "USER", "LOGNAME", "SHELL", "PWD", "OLDPWD", "SHLVL", "_", "TERM", "TERMCAP", "COLORTERM",
    "DISPLAY", "WAYLAND_DISPLAY", "HOSTNAME", "MAIL", "TMPDIR", "TMP", "TEMP", "LD_LIBRARY_PATH", "LD_PRELOAD",
    "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CUDA_VISIBLE_DEVICES", "GIT_EXEC_PATH", "PS1", "MANPATH",
})
MACHINE_LOCAL_PREFIXES = ("SSH_", "XDG_", "DBUS_", "CONDA_", "GPG_", "TMUX", "KRB5", "WINDOWID", "VSCODE_", "RAY_")


def _ray() -> Any:
    return require("ray", extra="ray", purpose="backend: ray")


def _lost_errors() -> tuple[type[BaseException], ...]:
    """Ray's ways of saying the process or node that held a run is gone."""
    exc = _ray().exceptions
    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
             "OwnerDiedError", "ObjectLostError", "RaySystemError", "GetTimeoutError")
    return tuple(getattr(exc, n) for n in names if isinstance(getattr(exc, n, None), type))


def _kill_actor(actor: Any) -> None:
    """End a run actor (freeing its CPUs/GPUs); one that is already gone needs nothing."""
    try:
        _ray().kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001, S110 - a dead actor or a closed connection: nothing left to end
        pass


async def _get(ref: Any) -> Any:
    """Await an ObjectRef from any event loop (each ``asyncio.run`` has its own)."""
    return await asyncio.wrap_future(ref.future())


def _cause(exc: BaseException) -> BaseException:
    """The exception a remote function raised, unwrapped from Ray's RayTaskError."""
    return getattr(exc, "cause", None) or exc


# -- what runs on the nodes ---------------------------------------------------------------


def _node_dir(root: str) -> Path:
    node_id = _ray().get_runtime_context().get_node_id()
    return Path(root) / "nodes" / node_id[:16]


def _ensure_workspace(root: str, bundle: bytes, commit: str, deps: dict[str, Any], lfs: dict[str, Any],
                      verify: str | None = None) -> dict[str, Any]:
    """This node's checkout of ``commit`` and its venv, built once (locked, keyed like workspace.py).

    ``lfs`` maps the commit's Git LFS files to object refs of their content, in chunks: the bundle
    holds only pointers, and the node need not reach the LFS server (nor have git-lfs: smudging is off).
    """
    base = _node_dir(root)
    checkout = base / "checkouts" / commit
    checkout.parent.mkdir(parents=True, exist_ok=True)
    with ws._locked(ws._lock_path(checkout)):
        if not checkout.is_dir():
            with tempfile.TemporaryDirectory(dir=checkout.parent, prefix=f".{commit[:12]}-") as tmp:
                bundle_path = Path(tmp) / "commit.bundle"
                bundle_path.write_bytes(bundle)
                staged = Path(tmp) / "checkout"
                what = f"cloning commit {commit[:12]} from its bundle on node {base.name}"
                no_smudge = {"GIT_LFS_SKIP_SMUDGE": "1"}
                ws._git_ok(["clone", "--quiet", "--no-checkout", str(bundle_path), str(staged)], what=what,
                           extra_env=no_smudge)
                ws._git_ok(["checkout", "--quiet", "--detach", commit], cwd=staged, what=what, extra_env=no_smudge)
                ws._git_ok(["remote", "remove", "origin"], cwd=staged, what=what)
                for name, chunks in lfs.items():
                    with open(staged / name, "wb") as fh:
                        for ref in chunks:  # one chunk in memory at a time
                            fh.write(_ray().get(ref))
                os.rename(staged, checkout)
    lines: list[str] = []
    prepared = ws.prepare_env(checkout, ws.DepsConfig(**deps), base / "envs", on_output=lines.append)
    if verify:
        ws.run_verify(checkout, verify, {**os.environ, **prepared.env}, timeout_s=deps.get("download_timeout_s", 600))
    return {"checkout": str(checkout.resolve()), "env": prepared.env, "lines": lines[-200:],
            "node_id": _ray().get_runtime_context().get_node_id(), "hostname": socket.gethostname()}


def _ensure_data(root: str, data: dict[str, Any] | None) -> tuple[str | None, float]:
    """This node's copy of the spec's data (from the object store, once per node), and the seconds it took."""
    if data is None:
        return None, 0.0
    started = time.monotonic()
    path = assemble(_node_dir(root) / "data", Manifest.from_json(data["manifest"]), data["chunks"], _ray().get)
    return str(path), time.monotonic() - started


def _prepare_on_node(root: str, bundle: bytes, commit: str, deps: dict[str, Any], lfs: dict[str, Any],
                     verify: str | None, data: dict[str, Any] | None) -> dict[str, Any]:
    prepared = _ensure_workspace(root, bundle, commit, deps, lfs, verify)
    prepared["data_dir"], prepared["data_s"] = _ensure_data(root, data)
    # The node's environment, read as a run there sees it (see RunActor.start), for the paper.
    prepared["environment"] = probe_environment(Path(prepared["checkout"]), {**os.environ, **prepared["env"]},
                                                deps.get("requirements"))
    return prepared


def _child_setup() -> None:
    """In the runner, before exec: its own process group, killed if its Ray worker dies."""
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _killpg(pid: int, sig: int) -> bool:
    try:
        os.killpg(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _kill_orphan_on_node(pid: int, pid_start: int | None) -> bool:
    alive = process_start_time(pid)
    if alive is None or (pid_start is not None and alive != pid_start):
        return False
    return _killpg(pid, signal.SIGKILL)


class RunActor:
    """One run on whichever node Ray placed it: starts, reports, signals, and hands back its out dir."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.rundir: Path | None = None
        self.copy: tuple[Path, Path] | None = None  # (node checkout, the run's own copy), dropped once it succeeded

    def start(self, root: str, bundle: bytes, commit: str, deps: dict[str, Any], lfs: dict[str, Any],
              run: dict[str, Any]) -> dict[str, Any]:
        prepared = _ensure_workspace(root, bundle, commit, deps, lfs)
        data_dir, _ = _ensure_data(root, run.get("data"))
        checkout = prepared["checkout"]
        self.rundir = rundir = _node_dir(root) / "runs" / run["tag"]
        out = rundir / "out"
        out.mkdir(parents=True, exist_ok=True)
        try:  # the run works in its own copy of the node's checkout
            work = str(ws.working_copy(Path(checkout), rundir / "work", lfs=list(lfs)))
        except (WorkspaceError, OSError) as exc:
            return {"launch_error": {"errno": None, "strerror": f"could not make the run's working copy: {exc}"},
                    "argv": run["argv"]}
        self.copy = (Path(checkout), Path(work))
        pairs = [(run["local_checkout"], work), (run["local_out"], str(out))]
        if data_dir is not None:  # the node's copy of the data, never the orchestrator's path
            pairs.append((run["data"]["local_dir"], data_dir))

        def translate(value: str) -> str:
            for local, there in pairs:
                if value == local or value.startswith(local + "/"):
                    return there + value[len(local):]
            return value

        env = dict(os.environ)
        env.update(prepared["env"])
        env.update({k: translate(v) for k, v in run["env"].items()})
        env.update({contract.OUT_DIR: str(out), contract.WORKSPACE: work,
                    "RATIOCINATOR_RAY_NODE": prepared["node_id"]})
        argv = [translate(a) for a in run["argv"]]
        with open(rundir / "stdout.log", "wb") as so, open(rundir / "stderr.log", "wb") as se:
            try:
                self.proc = subprocess.Popen(argv, cwd=translate(run["cwd"]), env=env, stdin=subprocess.DEVNULL,
                                             stdout=so, stderr=se,
                                             preexec_fn=_child_setup)  # noqa: PLW1509 - PDEATHSIG needs it
            except OSError as exc:
                return {"launch_error": {"errno": exc.errno, "strerror": exc.strerror or str(exc)}, "argv": argv}
        return {"pid": self.proc.pid, "pid_start": process_start_time(self.proc.pid), "node_id": prepared["node_id"],
                "hostname": prepared["hostname"], "worker_pid": os.getpid(), "rundir": str(rundir)}

    def read(self, offsets: tuple[int, int], limit: int) -> tuple[bytes, bytes, int | None]:
        """New output from each stream since ``offsets``; the exit code once the runner has exited."""
        assert self.proc is not None and self.rundir is not None
        code = self.proc.poll()  # before reading, so nothing written before exit is missed
        if code == 0 and self.copy is not None:  # a failed run's copy stays, to look at
            ws.drop_working_copy(*self.copy)
            self.copy = None
        chunks = []
        for name, offset in zip(("stdout", "stderr"), offsets, strict=True):
            with open(self.rundir / f"{name}.log", "rb") as fh:
                fh.seek(offset)
                chunks.append(fh.read(limit))
        return chunks[0], chunks[1], code

    def signal(self, sig: int) -> bool:
        return self.proc is not None and _killpg(self.proc.pid, sig)

    def artifacts(self) -> tuple[list[tuple[str, str, bytes]], list[str]]:
        """The out dir as (path, kind, data) entries; links only when they stay inside, never followed."""
        assert self.rundir is not None
        out = self.rundir / "out"
        entries: list[tuple[str, str, bytes]] = []
        skipped: list[str] = []
        for dirpath, dirnames, filenames in os.walk(out, followlinks=False):
            for name in sorted(dirnames + filenames):
                path = Path(dirpath) / name
                rel = str(path.relative_to(out))
                mode = os.lstat(path).st_mode
                if stat.S_ISLNK(mode):
                    target = os.readlink(path)
                    if safe_link(target):
                        entries.append((rel, "link", target.encode()))
                    else:
                        skipped.append(f"{rel} -> {target}")
                elif stat.S_ISDIR(mode):
                    entries.append((rel, "dir", b""))
                elif stat.S_ISREG(mode):
                    entries.append((rel, "file", path.read_bytes()))
                else:
                    skipped.append(f"{rel} (not a regular file, directory or link)")
        return entries, skipped


def _write_artifacts(entries: list[tuple[str, str, bytes]], skipped: list[str], local_out: Path, log_dir: Path) -> None:
    local_out.mkdir(parents=True, exist_ok=True)
    root = local_out.resolve()
    for rel, kind, data in entries:
        dest = local_out / rel
        if ".." in Path(rel).parts or not dest.parent.resolve().is_relative_to(root):
            skipped.append(f"{rel} (outside the out dir)")
            continue
        if dest.is_symlink():
            dest.unlink()
        if kind == "dir":
            dest.mkdir(exist_ok=True)
        elif kind == "link":
            os.symlink(data.decode(), dest)
        else:
            dest.write_bytes(data)
    write_skipped(log_dir, "node", skipped)


# -- the orchestrator's side --------------------------------------------------------------


class RayRunHandle(FollowedRunHandle):
    """Polls the run actor for output and exit; a lost actor or node ends it as ``infra``."""

    def __init__(self, actor: Any, info: dict[str, Any], local_out: Path, log_dir: Path, *, poll_s: float) -> None:
        self.actor = actor
        self.info = info
        self.pid = int(info["pid"])
        self.pid_start = info.get("pid_start")
        self.node_id: str = info["node_id"]
        self.worker_pid: int = info["worker_pid"]
        self.local_out, self.log_dir, self.poll_s = local_out, log_dir, poll_s
        self._start_following()
        self._cancelling = False
        self._follower = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        offsets = [0, 0]
        try:
            while True:
                out, err, code = await _get(self.actor.read.remote(tuple(offsets), CHUNK))
                streams: tuple[tuple[Stream, bytes], ...] = (("stdout", out), ("stderr", err))
                for index, (name, data) in enumerate(streams):
                    if data:
                        offsets[index] += len(data)
                        await self._chunks.put((name, data))
                if code is not None and not out and not err:
                    break
                if not out and not err:
                    await asyncio.sleep(self.poll_s)
            entries, skipped = await _get(self.actor.artifacts.remote())
            await asyncio.to_thread(_write_artifacts, entries, skipped, self.local_out, self.log_dir)
            info = ExitInfo(exit_code=None, signal=-code) if code < 0 else ExitInfo(exit_code=code, signal=None)
            if not self._exited.done():
                self._exited.set_result(info)
        except _lost_errors() as exc:
            if not self._exited.done():
                if self._cancelling:
                    self._exited.set_result(ExitInfo(exit_code=None, signal=signal.SIGKILL))
                else:
                    self._exited.set_exception(LaunchFailure(
                        f"lost the Ray worker or node {self.node_id[:12]} running the run: {type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}", transient=True))
        except BaseException as exc:
            if not self._exited.done():
                self._exited.set_exception(LaunchFailure(f"following the run on Ray failed: {exc!r}", transient=True))
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._chunks.put_nowait(None)

    async def _signal(self, sig: int) -> None:
        try:
            await _get(self.actor.signal.remote(sig))
        except _lost_errors():
            pass

    async def cancel(self, grace_s: float = 5.0) -> None:
        self._cancelling = True
        await self._signal(signal.SIGTERM)
        for sig, patience in ((signal.SIGKILL, grace_s), (None, 5.0)):
            try:
                await asyncio.wait_for(asyncio.shield(self._exited), patience)
            except (TimeoutError, LaunchFailure):
                pass
            if self._exited.done():
                break
            if sig is not None:
                await self._signal(sig)
        await self._signal(signal.SIGKILL)  # whatever the runner left in its group
        _kill_actor(self.actor)
        if not self._exited.done():
            self._exited.set_result(ExitInfo(exit_code=None, signal=signal.SIGKILL))
        if not self._follower.done():
            self._follower.cancel()

    async def reap_strays(self) -> None:
        await self._signal(signal.SIGKILL)
        _kill_actor(self.actor)  # frees the run's CPUs/GPUs for the next run


class RayBackend(Backend):
    """Runs on an existing Ray cluster at ``address`` (``auto``: the one this machine belongs to)."""

    name = "ray"

    @classmethod
    def from_spec(cls, loaded: LoadedSpec, home: Path) -> RayBackend:
        ray = loaded.spec.ray
        return cls(loaded.spec.ray_address, home, num_cpus_per_run=ray.num_cpus_per_run, workdir=ray.workdir,
                   schedule_timeout_s=ray.schedule_timeout_s, env_forward=tuple(ray.env_forward))

    def describe(self, loaded: LoadedSpec, findings: list[HardwareFinding]) -> list[str]:
        return [self.cluster_summary(), *super().describe(loaded, findings)]

    def __init__(self, address: str | None, home: Path, *, num_cpus_per_run: float = 1.0,
                 workdir: str | None = None, schedule_timeout_s: float = 600.0, poll_s: float = 0.2,
                 env_forward: Sequence[str] = ()) -> None:
        self.address = address or "auto"
        self.home = home
        self.num_cpus_per_run = num_cpus_per_run
        self.workdir = workdir or str(Path(tempfile.gettempdir()) / "ratiocinator-ray")
        self.schedule_timeout_s = schedule_timeout_s
        self.poll_s = poll_s
        self.env_forward = tuple(env_forward)
        self._bundle: Any = None  # ObjectRef of the commit's git bundle
        self._lfs: dict[str, list[Any]] = {}  # the commit's Git LFS files -> ObjectRefs of their content's chunks
        self._job: dict[str, Any] | None = None
        self._data: dict[str, Any] | None = None  # the spec's data: its manifest and its files' chunks in the store
        self._local_checkout: Path | None = None
        self._environments: list[dict[str, Any]] = []  # each prepared node's, as `prepare` read it there
        self._tag = secrets.token_hex(4)

    # -- the cluster --------------------------------------------------------------------

    def connect(self) -> Any:
        ray = _ray()
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, namespace=NAMESPACE, log_to_driver=False,
                         logging_level="WARNING", configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise BackendError(f"cannot connect to the Ray cluster at {self.address}: {exc}",
                                   hint="start one with `ray start --head` or set ray_address: to its GCS address"
                                        " (host:port)") from None
        return ray

    def _nodes(self) -> list[dict[str, Any]]:
        return [n for n in self.connect().nodes() if n.get("Alive")]

    def _fits(self, resources: dict[str, float], num_gpus: int) -> int:
        fit = int(resources.get("CPU", 0) // self.num_cpus_per_run) if self.num_cpus_per_run else 1 << 30
        if num_gpus:
            fit = min(fit, int(resources.get("GPU", 0) // num_gpus))
        return fit

    def cluster_summary(self) -> str:
        """One line for ``plan``/``status``: what the cluster offers."""
        res = self.connect().cluster_resources()
        nodes = self._nodes()
        parts = [f"{len(nodes)} node(s)", f"{res.get('CPU', 0):g} CPU", f"{res.get('GPU', 0):g} GPU"]
        if "memory" in res:
            parts.append(f"{res['memory'] / 2**30:.1f} GiB memory")
        return f"Ray cluster {self.address}: " + ", ".join(parts)

    def check_hardware(self, loaded: LoadedSpec) -> list[HardwareFinding]:
        hw = loaded.spec.hardware
        out: list[HardwareFinding] = []
        try:
            nodes = self._nodes()
        except BackendError as exc:
            nodes = None
            reason = str(exc)
        if hw.num_gpus:
            if nodes is None:
                out.append(HardwareFinding("num_gpus", "unknown", reason))
            else:
                best = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
                out.append(HardwareFinding("num_gpus", "ok" if best >= hw.num_gpus else "unmet",
                                           f"needs {hw.num_gpus} per run, the largest node has {best:g}"))
        if hw.min_cpu_ram_gb is not None:
            if nodes is None:
                out.append(HardwareFinding("min_cpu_ram_gb", "unknown", reason))
            else:
                best = max((n["Resources"].get("memory", 0) / 1e9 for n in nodes), default=0)
                out.append(HardwareFinding("min_cpu_ram_gb", "ok" if best >= hw.min_cpu_ram_gb else "unmet",
                                           f"needs {hw.min_cpu_ram_gb:g} GB,"
                                           f" the largest node offers Ray {best:.1f} GB"))
        for name in ("gpu", "min_cuda_version", "disk_gb"):
            if getattr(hw, name) is not None:
                out.append(HardwareFinding(name, "unknown",
                                           "not checked on Ray nodes; Ray schedules by resource counts"))
        for name in ("min_inet_down", "max_dph", "image"):
            if getattr(hw, name) is not None:
                out.append(HardwareFinding(name, "not_applicable",
                                           "an existing Ray cluster is neither rented nor imaged"))
        return out

    async def acquire(self, loaded: LoadedSpec) -> Host:
        spec = loaded.spec
        nodes = await asyncio.to_thread(self._nodes)
        capacity = sum(self._fits(n["Resources"], spec.hardware.num_gpus) for n in nodes)
        if capacity == 0:
            raise BackendError(
                f"no node of the Ray cluster at {self.address} fits one run "
                f"({self.num_cpus_per_run:g} CPU, {spec.hardware.num_gpus} GPU per run)",
                hint="add nodes, or lower ray.num_cpus_per_run / hardware.num_gpus")
        count = min(spec.concurrency or capacity, capacity)
        resources = self.connect().cluster_resources()
        shared = {k: v for k, v in sorted(resources.items()) if not k.startswith("node:")}
        info = {"address": self.address, "nodes": str(len(nodes)), "cpus": f"{resources.get('CPU', 0):g}",
                "gpus": f"{resources.get('GPU', 0):g}", "cpus_per_run": f"{self.num_cpus_per_run:g}",
                "gpus_per_run": str(spec.hardware.num_gpus), "cluster_resources": json.dumps(shared)}
        return Host(name=f"ray:{self.address}", slots=tuple(Slot(i) for i in range(count)),
                    price_per_hour=spec.hardware.price_per_hour, info=info)

    # -- workspaces -----------------------------------------------------------------------

    async def prepare(
        self, host: Host, loaded: LoadedSpec, commit: str, *, on_output: Callable[[str], None] | None = None
    ) -> Workspace:
        ray = self.connect()
        spec = loaded.spec
        repo = ws.resolve_repo_url(spec.repo_url, loaded.path.parent)
        checkout = await asyncio.to_thread(ws.checkout, repo, commit, Paths(self.home).repos,
                                           lfs_timeout_s=spec.download_timeout_s)
        bundle = await asyncio.to_thread(self._make_bundle, checkout, commit)
        self._bundle = ray.put(bundle)
        lfs_names = await asyncio.to_thread(ws.lfs_files, checkout)
        self._lfs = {name: await self._put_chunks(checkout / name) for name in lfs_names}
        copy = await asyncio.to_thread(prepared_copy, loaded, self.home)
        if copy is not None:  # through the object store in chunks, as LFS files travel
            self._data = {"manifest": copy.manifest.to_json(), "local_dir": str(copy.directory),
                          "chunks": {f.path: await self._put_chunks(copy.directory / f.path)
                                     for f in copy.manifest.files}}
        self._job = {"commit": commit, "deps": {
            "pre_install": tuple(spec.deps.pre_install), "requirements": spec.deps.requirements,
            "exclude_from_requirements": tuple(spec.deps.exclude_from_requirements),
            "download_timeout_s": spec.download_timeout_s}}
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(num_cpus=0, max_retries=0)(_prepare_on_node)
        nodes = [n for n in await asyncio.to_thread(self._nodes) if self._fits(n["Resources"], spec.hardware.num_gpus)]
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            self.workdir, self._bundle, commit, self._job["deps"], self._lfs, spec.deps.verify, self._data)
            for n in nodes]
        prepared = 0
        staging_s: dict[str, float] = {}
        self._environments = []
        for node, ref in zip(nodes, refs, strict=True):
            try:
                result = await _get(ref)
            except Exception as exc:  # noqa: BLE001 - Ray wraps whatever the node raised
                cause = _cause(exc)
                if isinstance(cause, WorkspaceError):
                    raise WorkspaceError(f"on Ray node {node['NodeID'][:12]}: {cause}", hint=cause.hint) from None
                alive = {n["NodeID"] for n in await asyncio.to_thread(self._nodes)}
                if node["NodeID"] not in alive:  # it left the cluster meanwhile: runs go to the others
                    if on_output is not None:
                        on_output(f"[{node['NodeID'][:12]}] left the cluster while being prepared; skipped")
                    continue
                message = f"preparing the workspace on Ray node {node['NodeID'][:12]} failed: {cause}"
                raise WorkspaceError(message) from None
            prepared += 1
            if result["environment"] is not None:
                self._environments.append({**result["environment"], "host": f"ray node {node['NodeID'][:12]}"})
            if result["data_dir"] is not None:
                staging_s[f"ray node {node['NodeID'][:12]}"] = result["data_s"]
            if on_output is not None:
                for line in result["lines"]:
                    on_output(f"[{node['NodeID'][:12]}] {line}")
        if nodes and not prepared:
            raise WorkspaceError("every Ray node that could take runs left the cluster while being prepared",
                                 hint="check the cluster (`ray status`) and run the same command again")
        self._local_checkout = checkout
        env = {contract.WORKSPACE: str(checkout)}
        if copy is not None:  # each run gets its node's copy (`RunActor.start` translates the path)
            env[contract.DATA_DIR] = str(copy.directory)
        return Workspace(checkout=checkout, env=env, staging_s=staging_s)

    async def environments(self, host: Host, workspace: Workspace, loaded: LoadedSpec) -> list[dict[str, Any]]:
        return list(self._environments)

    async def _put_chunks(self, path: Path) -> list[Any]:
        """``path``'s content in the object store, LFS_CHUNK bytes per object, so no file is ever whole in memory."""
        ray = self.connect()
        refs = []
        with open(path, "rb") as fh:
            while chunk := await asyncio.to_thread(fh.read, LFS_CHUNK):
                refs.append(ray.put(chunk))
        return refs

    def _make_bundle(self, checkout: Path, commit: str) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{commit}.bundle"
            ws._git_ok(["bundle", "create", str(path), "HEAD"], cwd=checkout,
                       what=f"bundling commit {commit[:12]} of {checkout} for the Ray nodes")
            return path.read_bytes()

    # -- runs -------------------------------------------------------------------------------

    def _forwarded_env(self, env: dict[str, str]) -> dict[str, str]:
        """The run's own variables (knobs, seed, identity) plus inherited ones ``env_forward`` names;
        the rest of this machine's environment (PATH, HOME, ...) describes this machine, not the node."""
        out: dict[str, str] = {}
        for key, value in env.items():
            if key in MACHINE_LOCAL or key.startswith(MACHINE_LOCAL_PREFIXES):
                continue
            inherited = not contract.is_contract_variable(key) and os.environ.get(key) == value
            if inherited and not any(fnmatch.fnmatchcase(key, p) for p in self.env_forward):
                continue
            out[key] = value
        return out

    async def launch(self, host: Host, request: LaunchRequest) -> RunHandle:
        if self._job is None or self._local_checkout is None:
            raise LaunchFailure("the Ray backend has no prepared workspace (prepare() did not run)", transient=False)
        ray = self.connect()
        actor_class = ray.remote(RunActor)
        actor = actor_class.options(num_cpus=self.num_cpus_per_run, num_gpus=self._gpus(host), max_restarts=0,
                                    max_task_retries=0).remote()
        run = {"tag": f"{self._tag}-{request.run_id}-{secrets.token_hex(4)}", "argv": list(request.argv),
               "cwd": str(request.cwd), "env": self._forwarded_env(request.env),
               "local_checkout": str(self._local_checkout), "local_out": str(request.out_dir), "data": self._data}
        try:
            info = await asyncio.wait_for(
                _get(actor.start.remote(self.workdir, self._bundle, self._job["commit"], self._job["deps"], self._lfs,
                                        run)),
                self.schedule_timeout_s)
        except TimeoutError:
            _kill_actor(actor)
            raise LaunchFailure(f"no Ray node took the run within {self.schedule_timeout_s:g}s",
                                transient=True) from None
        except _lost_errors() as exc:
            raise LaunchFailure(f"the Ray worker starting the run was lost: {type(exc).__name__}",
                                transient=True) from None
        except Exception as exc:  # noqa: BLE001 - Ray wraps whatever the node raised
            _kill_actor(actor)
            cause = _cause(exc)
            failure = "missing_dependency" if isinstance(cause, WorkspaceError) else "infra"
            raise LaunchFailure(f"preparing the run on a Ray node failed: {cause}", transient=failure == "infra",
                                failure=failure) from None
        if "launch_error" in info:
            _kill_actor(actor)
            error = info["launch_error"]
            raise launch_failure(tuple(info["argv"]), OSError(error["errno"], error["strerror"]))
        self._record(info)
        return RayRunHandle(actor, info, request.out_dir, request.log_dir, poll_s=self.poll_s)

    def _gpus(self, host: Host) -> float:
        return float(host.info.get("gpus_per_run", "0"))

    def _record(self, info: dict[str, Any]) -> None:
        """Which node a (pid, pid_start) of the ledger lives on, for `kill_orphan` after a crash."""
        folder = self.home / RUN_RECORDS
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{info['pid']}-{info.get('pid_start')}.json").write_text(json.dumps(
            {"address": self.address, "node_id": info["node_id"], "pid": info["pid"],
             "pid_start": info.get("pid_start"), "recorded_at": time.time()}))

    async def release(self, host: Host) -> None:
        """Nothing is rented; run actors die with their runs (or with this driver)."""

    def kill_orphan(self, pid: int, pid_start: int | None) -> bool:
        path = self.home / RUN_RECORDS / f"{pid}-{pid_start}.json"
        if not path.exists():
            return False
        record = json.loads(path.read_text())
        ray = self.connect()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(num_cpus=0, max_retries=0)(_kill_orphan_on_node).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(record["node_id"], soft=False))
        try:
            return bool(ray.get(task.remote(pid, pid_start), timeout=60))
        except Exception:  # noqa: BLE001 - the node is gone, and the run with it
            return False
