"""Backends by the name a spec gives them (``backend: ssh``), each imported only when a spec asks
for it: asyncssh, httpx and Ray load only for the studies that use them, and come with the extra
named here (a missing one is a `MissingExtra` naming it, before anything is imported).

Adding a backend: implement `~ratiocinator.backends.base.Backend` (with ``from_spec``), add its
``backend:`` name to the spec's literal, and one line here.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from ratiocinator.backends.base import Backend
from ratiocinator.errors import UsageError
from ratiocinator.extras import require_all
from ratiocinator.spec.models import LoadedSpec

BACKENDS: dict[str, str] = {  # name -> "module:class"
    "local": "ratiocinator.backends.local:LocalBackend",
    "ssh": "ratiocinator.backends.ssh:SshBackend",
    "vast": "ratiocinator.backends.vast.backend:VastBackend",
    "ray": "ratiocinator.backends.ray_backend:RayBackend",
}
# name -> the extra (pyproject.toml) whose packages the backend imports
BACKEND_EXTRAS: dict[str, str] = {"ssh": "ssh", "vast": "vast", "ray": "ray"}


def backend_class(loaded: LoadedSpec) -> type[Backend]:
    name = loaded.spec.backend
    if name not in BACKENDS:
        raise UsageError(f"{loaded.where('backend')}: backend '{name}' is not available",
                         hint=f"one of: {', '.join(BACKENDS)}")
    if name in BACKEND_EXTRAS:
        require_all(BACKEND_EXTRAS[name], purpose=f"{loaded.where('backend')}: backend '{name}'")
    module, _, cls = BACKENDS[name].partition(":")
    found = getattr(importlib.import_module(module), cls)
    assert isinstance(found, type) and issubclass(found, Backend)
    return found


# The module that reaps and reconciles rented instances for ``ratiocinator instances``: its
# ``api_from_env()``, ``reap``, ``reconcile_billing`` and ``BillingUnavailable``.
INSTANCE_PROVIDER = "ratiocinator.backends.vast.reaper"


def instance_provider() -> ModuleType:
    require_all("vast", purpose="managing rented instances (Vast.ai)")
    return importlib.import_module(INSTANCE_PROVIDER)


def make_backend(loaded: LoadedSpec, home: Path) -> Backend:
    """The spec's backend, built from the spec's settings."""
    return backend_class(loaded).from_spec(loaded, home)


def backend_price(loaded: LoadedSpec) -> float:
    """The price a run of this spec is charged at, as its backend prices it."""
    return backend_class(loaded).price_per_hour(loaded)


__all__ = ["BACKENDS", "BACKEND_EXTRAS", "INSTANCE_PROVIDER", "backend_class", "backend_price", "instance_provider",
           "make_backend"]
