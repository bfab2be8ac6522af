"""The runs' software environment, read with the interpreter the runs use, so a paper can say
what produced its numbers: Python version, every installed distribution (and a hash of that
set, so two studies can tell whether they ran the same packages), the versions of the
packages the requirements file lists, the GPU model, driver and CUDA version, and the host.

``PROBE`` is a standard-library script, so any backend can run it with the runs' interpreter
wherever the runs go (this machine, an SSH host, a Ray node) and read its last line with
`environment_from_output`. ``probe_environment`` runs it here; it never raises: a probe that
cannot run records nothing, and the paper says so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PROBE_TIMEOUT_S = 60.0

# Runs inside the runs' interpreter on the runs' host: standard library only (the GPU from nvidia-smi there).
# Each distribution's name and version come from its metadata's header lines: `Distribution.metadata` parses
# the whole file (long descriptions and all) as an email message, three times the CPU in a big environment.
PROBE = r"""# ratiocinator environment probe
import hashlib, importlib.metadata as md, json, platform, re, shutil, subprocess, sys
def name_version(dist):
    fields = {}
    for line in (dist.read_text("METADATA") or dist.read_text("PKG-INFO") or "").splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        if key in ("Name", "Version") and key not in fields:
            fields[key] = value.strip()
    return fields.get("Name"), fields.get("Version")
packages = sorted({f"{name.lower()}=={version}" for name, version in map(name_version, md.distributions()) if name})
found = {
    "python": platform.python_version(), "implementation": platform.python_implementation(),
    "platform": f"{platform.system()} {platform.release()} {platform.machine()}", "node": platform.node(),
    "packages": packages, "freeze_sha256": hashlib.sha256("\n".join(packages).encode()).hexdigest(),
}
smi = shutil.which("nvidia-smi")
if smi:
    try:
        query = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
        rows = [r.split(",") for r in query.stdout.strip().splitlines() if "," in r]
        if query.returncode == 0 and rows:
            found["gpu"] = "; ".join(sorted({r[0].strip() for r in rows}))
            found["driver"] = rows[0][1].strip()
        header = subprocess.run([smi], capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
        cuda = re.search(r"CUDA Version:\s*([0-9.]+)", header.stdout)
        if cuda:
            found["cuda"] = cuda.group(1)
    except (OSError, subprocess.TimeoutExpired):
        pass
print(json.dumps(found))
"""

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._\-]*)")


def requirement_names(path: Path) -> list[str]:
    """The distribution names a requirements file lists (options, includes and URLs skipped)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    names = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-") or "://" in line:
            continue
        match = _NAME.match(line)
        if match:
            names.append(match.group(1))
    return names


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def environment_from_output(stdout: str, requirements: list[str]) -> dict[str, Any] | None:
    """What `PROBE` printed (its last line), with the versions installed of the ``requirements`` names."""
    try:
        data = json.loads(stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return None
    if not isinstance(data, dict):
        return None
    installed = {_normal(p.split("==", 1)[0]): p.split("==", 1)[1] for p in data.get("packages", []) if "==" in p}
    if requirements:
        data["requirements"] = {name: installed.get(_normal(name)) for name in requirements}
    return data


def probe_environment(checkout: Path, env: Mapping[str, str], requirements: str | None) -> dict[str, Any] | None:
    """What the runs' ``python`` in ``checkout`` with ``env`` has installed, or None when it cannot be read."""
    python = shutil.which("python", path=env.get("PATH")) or shutil.which("python3", path=env.get("PATH"))
    if python is None:
        return None
    # It reads every installed package's metadata (~0.2 s of CPU in a big environment) while the first runs
    # start beside it: at the lowest priority it takes only CPU the runs leave idle.
    nice = shutil.which("nice")
    argv = [*([nice, "-n", "19"] if nice else []), python, "-c", PROBE]
    try:
        done = subprocess.run(argv, cwd=checkout, env=dict(env), capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    names = requirement_names(Path(checkout) / requirements) if requirements else []
    return environment_from_output(done.stdout, names)
