"""Starting the dashboard: check its optional dependencies, then serve the app with uvicorn on loopback."""

from __future__ import annotations

import importlib
import socket
from collections.abc import Callable
from pathlib import Path

from ratiocinator.errors import UsageError
from ratiocinator.store.paths import Paths, no_ledger

HOST = "127.0.0.1"  # the ledger holds prompts, diffs and paths: never served beyond this machine
EXTRA_MODULES = ("uvicorn", "starlette", "plotly")


def require_extra() -> None:
    """The dashboard's packages are an optional extra; say which one to install when they are missing."""
    missing = []
    for module in EXTRA_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UsageError(f"the dashboard needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'}"
                         " not installed", hint="pip install 'ratiocinator[dashboard]'")


def serve(home: Path, port: int, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve the dashboard for ``home`` until interrupted; ``on_ready`` gets the URL once the port is bound
    (``port`` 0 takes a free one)."""
    require_extra()
    ledger = Paths(home).ledger
    if not ledger.is_file():
        raise no_ledger(ledger)
    import uvicorn

    from ratiocinator.dashboard.app import create_app

    app = create_app(home)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((HOST, port))
    except OSError as exc:
        listener.close()
        raise UsageError(f"the dashboard cannot listen on {HOST}:{port}: {exc.strerror}",
                         hint="pass another --port (0 takes a free one)") from None
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    if on_ready is not None:
        on_ready(f"http://{HOST}:{listener.getsockname()[1]}/")
    with listener:
        server.run(sockets=[listener])
