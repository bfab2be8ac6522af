"""The remote half of the SSH backend: a stdlib-only script uploaded once per host.

The orchestrator never builds a shell command from values it does not control: it
runs ``python3 <this file> SUBCOMMAND PATH...`` with paths it chose itself, and passes
anything else (the run's environment, install steps) in files or on stdin, so secrets
never appear on a command line (``/proc/*/cmdline`` is world-readable).

``start`` detaches a supervisor (its own session, no terminal, output to files), which
starts the runner in a fresh process group with ``stdout.log``/``stderr.log`` and writes
``pid`` and finally ``exit_status`` into the run directory. Nothing of it depends on the
SSH connection that started it, so a dropped connection does not touch the run.

Kept compatible with Python 3.6 and importable locally (for tests); it imports nothing
from ratiocinator.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

START_WAIT_S = 30.0


def _write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, path)


def start_ticks(pid: int) -> int | None:
    """Start time in clock ticks since boot: tells a reused PID apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
        return int(data[data.rfind(b")") + 2:].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, ticks: int | None) -> bool:
    now = start_ticks(pid)
    if now is None:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
        if data[data.rfind(b")") + 2:].split()[0] == b"Z":
            return False
    except OSError:
        return False
    return ticks is None or now == ticks


# -- runs ----------------------------------------------------------------------------


def _runner_env(rundir: str, spec: dict) -> dict:
    """This host's login environment, then what the orchestrator sent, then the venv."""
    env_path = os.path.join(rundir, "env.json")
    with open(env_path) as fh:
        sent = json.load(fh)
    os.unlink(env_path)  # the running process holds it; no copy stays on disk
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSH_")}
    env.update(sent)
    venv = spec.get("venv")
    if venv:
        env["VIRTUAL_ENV"] = venv
        env["PATH"] = os.path.join(venv, "bin") + os.pathsep + os.environ.get("PATH", os.defpath)
    return env


def _working_copy(copy: dict) -> None:
    """The run's own copy of the host's checkout: a git worktree (git's objects shared), the content of the
    files under Git LFS copied in, and the untracked top-level entries (data the deps steps made) linked."""
    checkout, dest = copy["from"], copy["to"]
    env = dict(os.environ, GIT_LFS_SKIP_SMUDGE="1", GIT_TERMINAL_PROMPT="0")
    with _worktrees_locked(checkout):
        done = subprocess.run(["git", "-c", "core.hooksPath=/dev/null", "worktree", "add", "--detach", "--quiet",
                               "--force", "--", dest, "HEAD"], cwd=checkout, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True)
    if done.returncode != 0:
        raise OSError(errno.EIO, "making the run's working copy failed: "
                                 + done.stderr.decode("utf-8", "replace").strip()[-300:])
    for name in copy.get("lfs") or []:
        shutil.copyfile(os.path.join(checkout, name), os.path.join(dest, name))
    listed = subprocess.run(["git", "ls-files", "--others", "--directory", "--no-empty-directory", "-z"],
                            cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
    for entry in {p.split("/", 1)[0] for p in listed.decode("utf-8", "surrogateescape").split("\0") if p}:
        if not os.path.lexists(os.path.join(dest, entry)):
            os.symlink(os.path.join(checkout, entry), os.path.join(dest, entry))


def _drop_working_copy(copy: dict) -> None:
    with _worktrees_locked(copy["from"]):
        subprocess.run(["git", "worktree", "remove", "--force", "--force", copy["to"]], cwd=copy["from"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def _worktrees_locked(checkout: str) -> Iterator[None]:
    """Git changes a repository's worktree records one at a time (two runs: one starting as another ends)."""
    with open(os.path.join(checkout, ".git", "ratiocinator-worktrees.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _supervise(rundir: str) -> None:
    """In the detached session: make the run's working copy, start the runner, record its pid, wait
    (stopping it at its deadline), record its exit; a succeeded run's copy is removed."""
    with open(os.path.join(rundir, "run.json")) as fh:
        spec = json.load(fh)
    copy = spec.get("copy")
    try:
        if copy:
            _working_copy(copy)
        env = _runner_env(rundir, spec)
        out = open(os.path.join(rundir, "stdout.log"), "wb")
        err = open(os.path.join(rundir, "stderr.log"), "wb")
        proc = subprocess.Popen(spec["argv"], cwd=spec["cwd"], env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, start_new_session=True)
    except OSError as exc:
        _write_atomic(os.path.join(rundir, "launch_error"),
                      json.dumps({"errno": exc.errno, "strerror": exc.strerror or str(exc)}))
        return
    out.close()
    err.close()
    _write_atomic(os.path.join(rundir, "pid"), json.dumps({"pid": proc.pid, "pid_start": start_ticks(proc.pid)}))
    code = _wait(proc, spec.get("deadline_s"))
    if copy and code == 0:  # a failed run's copy stays, to look at
        _drop_working_copy(copy)
    status: dict[str, float | None] = (
        {"exit_code": None, "signal": -code} if code < 0 else {"exit_code": code, "signal": None})
    status["ended_at"] = time.time()
    _write_atomic(os.path.join(rundir, "exit_status"), json.dumps(status))


def _wait(proc: subprocess.Popen[bytes], deadline_s: float | None) -> int:
    """The runner's exit; past ``deadline_s`` its whole group is stopped (SIGTERM, SIGKILL 5 s later), so
    the hard timeout holds even when no orchestrator is left to enforce it."""
    try:
        return proc.wait(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        pass
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def cmd_start(rundir: str) -> int:
    """Fork a detached supervisor and report the runner's pid (or why it could not start).

    Idempotent: a retry after a dropped connection waits for the first start's supervisor
    instead of starting the run twice.
    """
    try:
        os.close(os.open(os.path.join(rundir, "started"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        first = True
    except FileExistsError:
        first = False
    pid = os.fork() if first else -1
    if pid == 0:  # the supervisor: a new session, no terminal, no tie to the SSH channel
        try:
            os.setsid()
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            log = os.open(os.path.join(rundir, "supervisor.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.close(null)
            os.close(log)
            if os.fork() != 0:  # the grandchild is re-parented to init and never gets a terminal
                os._exit(0)
            _write_atomic(os.path.join(rundir, "supervisor"),
                          json.dumps({"pid": os.getpid(), "pid_start": start_ticks(os.getpid())}))
            _supervise(rundir)
        except BaseException as exc:  # noqa: BLE001 - the supervisor must always leave a trace
            try:
                _write_atomic(os.path.join(rundir, "launch_error"), json.dumps({"errno": None, "strerror": repr(exc)}))
            finally:
                os._exit(1)
        os._exit(0)
    if pid > 0:
        os.waitpid(pid, 0)
    deadline = time.time() + START_WAIT_S
    while time.time() < deadline:
        for name in ("pid", "launch_error"):
            path = os.path.join(rundir, name)
            if os.path.exists(path):
                with open(path) as fh:
                    sys.stdout.write(json.dumps({name: json.load(fh)}) + "\n")
                return 0
        time.sleep(0.02)
    sys.stdout.write(json.dumps({"launch_error": {"errno": None, "strerror": "the supervisor did not start"}}) + "\n")
    return 0


def _python_version() -> str:
    return ".".join(str(part) for part in sys.version_info[:3])


def _read_json(path: str) -> Any:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def cmd_alive(rundir: str) -> int:
    """Whether the run's supervisor still lives (no exit_status yet and it is gone: lost)."""
    sup = _read_json(os.path.join(rundir, "supervisor"))
    sys.stdout.write("1\n" if sup and _alive(sup["pid"], sup.get("pid_start")) else "0\n")
    return 0


def _killpg(pid: int, sig: int) -> bool:
    try:
        os.killpg(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def cmd_signal(rundir: str, sig: str) -> int:
    """Signal the runner's process group (cancel, timeout, strays)."""
    info = _read_json(os.path.join(rundir, "pid"))
    ok = bool(info) and _killpg(int(info["pid"]), int(sig))
    sys.stdout.write("1\n" if ok else "0\n")
    return 0


def cmd_killpid(pid: str, ticks: str) -> int:
    """Kill an orphaned run's group, unless the PID now belongs to some other process."""
    number = int(pid)
    now = start_ticks(number)
    if now is not None and ticks != "-" and now != int(ticks):
        sys.stdout.write("0\n")
        return 0
    sys.stdout.write("1\n" if _killpg(number, signal.SIGKILL) else "0\n")
    return 0


# -- workspace -----------------------------------------------------------------------


class _Lock:
    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.fh = open(path, "a")

    def __enter__(self) -> _Lock:
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _step(title: str, argv: list[str], cwd: str, env: dict[str, str], timeout: float | None, hint: str) -> None:
    """One install step, its output streamed; a failure ends `prepare` with a clear line."""
    _say("==> " + title)
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    tail: list[str] = []
    expired: list[bool] = []

    def expire() -> None:
        expired.append(True)
        _killpg(proc.pid, signal.SIGKILL)

    timer = None
    if timeout is not None:
        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
    assert proc.stdout is not None  # stdout=PIPE
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        tail = (tail + [line])[-30:]
        _say(line)
    code: int | None = proc.wait()
    if timer is not None:
        timer.cancel()
    if expired:
        code = None
    if code == 0:
        return
    outcome = f"timed out after {timeout:g}s" if code is None else (
        f"was killed by signal {-code}" if code < 0 else f"failed with exit code {code}")
    _say("RATIOCINATOR_FAILED " + json.dumps({"title": title, "outcome": outcome, "tail": tail, "hint": hint}))
    sys.exit(3)


def cmd_clone(bundle: str, dest: str, commit: str) -> int:
    """The checkout at ``commit`` from an uploaded git bundle, built aside and renamed in."""
    with _Lock(dest + ".lock"):
        if not os.path.isdir(dest):
            tmp = dest + f".tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_LFS_SKIP_SMUDGE="1")
            for argv in (["git", "clone", "--quiet", "--no-checkout", bundle, tmp],
                         ["git", "-C", tmp, "checkout", "--quiet", "--detach", commit],
                         ["git", "-C", tmp, "remote", "remove", "origin"]):
                _step("git " + argv[1 if argv[1] != "-C" else 3], argv, os.path.dirname(dest), env, None,
                      "is git installed on this host and the bundle complete?")
            os.rename(tmp, dest)
    try:
        os.unlink(bundle)
    except OSError:
        pass
    return 0


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cmd_seal_data(partial: str, final: str) -> int:
    """Check an uploaded data directory against its manifest (stdin) and move it into the host's cache.

    Files that do not match are removed, so the next upload sends them again; a sealed copy is
    read-only, renamed into place whole, and never written again.
    """
    manifest = json.loads(sys.stdin.read())
    bad = []
    for rel, size, sha256 in manifest["files"]:
        path = os.path.join(partial, rel)
        try:
            actual_size = os.stat(path).st_size
        except OSError:
            bad.append({"path": rel, "problem": "missing"})
            continue
        actual = _file_sha256(path) if actual_size == size else None
        if actual != sha256:
            problem = (f"{actual_size} bytes, expected {size}" if actual is None
                       else f"sha256 {actual}, expected {sha256}")
            bad.append({"path": rel, "problem": problem})
            os.unlink(path)
    if bad:
        _say("RATIOCINATOR_DATA " + json.dumps({"bad": bad}))
        return 1
    with _Lock(final + ".lock"):
        if os.path.isdir(final):  # sealed meanwhile by another orchestrator: the same bytes
            shutil.rmtree(partial, ignore_errors=True)
        else:
            for dirpath, dirnames, filenames in os.walk(partial, topdown=False):
                for name in filenames + dirnames:
                    path = os.path.join(dirpath, name)
                    if not os.path.islink(path):
                        os.chmod(path, os.stat(path).st_mode & ~0o222)
            os.chmod(partial, os.stat(partial).st_mode & ~0o222)
            os.rename(partial, final)
    _say("RATIOCINATOR_DATA " + json.dumps({"ok": True}))
    return 0


def cmd_prepare() -> int:
    """deps on this host, as workspace.prepare_env does locally: a keyed venv marked by .ready."""
    job = json.load(sys.stdin)
    checkout = job["checkout"]
    overrides = {"RATIOCINATOR_WORKSPACE": checkout}
    venv = None
    if job["pre_install"] or job["requirements"] is not None:
        material = dict(job["material"], python=[sys.executable, _python_version()])
        key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
        venv = os.path.join(job["envs_dir"], key[:16])
        overrides.update(VIRTUAL_ENV=venv,
                         PATH=os.path.join(venv, "bin") + os.pathsep + os.environ.get("PATH", os.defpath))
        env = dict(os.environ, **overrides)
        with _Lock(venv + ".lock"):
            ready = _read_json(os.path.join(venv, ".ready"))
            if not (isinstance(ready, dict) and ready.get("key") == key):
                shutil.rmtree(venv, ignore_errors=True)
                os.makedirs(venv)
                _step(f"creating the venv {venv} with {sys.executable}",
                      [sys.executable, "-m", "venv", "--system-site-packages", venv], checkout, env, None,
                      "make sure this host's Python can create venvs (Debian/Ubuntu: install python3-venv)")
                for index, command in enumerate(job["pre_install"]):
                    _step(f"deps.pre_install[{index}] `{command}`", ["bash", "-c", command], checkout, env,
                          job["timeout_s"], "fix or remove this command in the spec's deps.pre_install")
                if job["requirements"] is not None:
                    path = os.path.join(venv, "requirements.filtered.txt")
                    with open(path, "w") as fh:
                        fh.write(job["requirements_text"])
                    _step(f"pip install -r {job['requirements']} (filtered copy: {path})",
                          [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "--disable-pip-version-check",
                           "--no-input", "-r", path], checkout, env, job["timeout_s"],
                          "fix the requirements file, or list packages the host already provides under"
                          " deps.exclude_from_requirements")
                _write_atomic(os.path.join(venv, ".ready"), json.dumps(dict(material, key=key), indent=2) + "\n")
    if job.get("verify"):
        _step(f"deps.verify `{job['verify']}`", ["bash", "-c", job["verify"]], checkout,
              dict(os.environ, **overrides), job["timeout_s"],
              "the prepared environment lacks something the runner needs: fix deps.pre_install or"
              " deps.requirements (or the verify command)")
    _say("RATIOCINATOR_PREPARED " + json.dumps({"venv": venv}))
    return 0


def cmd_facts() -> int:
    """What `acquire` reports about the host."""
    facts = {"hostname": os.uname().nodename, "cpus": os.cpu_count() or 0,
             "python": _python_version()}
    try:
        with open("/proc/meminfo") as fh:
            facts["ram_gb"] = round(int(fh.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, IndexError, ValueError):
        pass
    _say(json.dumps(facts))
    return 0


def main(argv: list[str]) -> int:
    commands: dict[str, tuple[Callable[..., int], int]] = {
        "start": (cmd_start, 1), "alive": (cmd_alive, 1), "signal": (cmd_signal, 2), "killpid": (cmd_killpid, 2),
        "clone": (cmd_clone, 3), "prepare": (cmd_prepare, 0), "facts": (cmd_facts, 0),
        "seal-data": (cmd_seal_data, 2)}
    if not argv or argv[0] not in commands or len(argv) - 1 != commands[argv[0]][1]:
        names = ",".join(sorted(commands))
        sys.stderr.write(f"usage: remote.py {{{names}}} ARGS...\n")
        return 2
    func, _ = commands[argv[0]]
    return func(*argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
