"""The dashboard's web application: pages, JSON, and server-sent events over a read-only ledger.

Each page opens one event stream; the server re-reads the ledger every ``POLL_S`` and sends a
document only when it changed, and curve points only when new ones arrived, so a page follows a
running experiment without reloads and an idle page costs next to nothing. The ledger is opened
with SQLite's read-only mode: the dashboard cannot write, and WAL lets it read while
experiments write.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ratiocinator.dashboard.documents import CurveCursor, experiment_document, experiments_document, session_document
from ratiocinator.errors import UsageError
from ratiocinator.store.ledger import Ledger
from ratiocinator.store.paths import Paths

POLL_S = 0.5
KEEPALIVE_S = 15.0  # a comment line now and then, so proxies and browsers keep an idle stream open
STATIC = Path(str(resources.files("ratiocinator.dashboard") / "static"))


def plotly_js() -> Path:
    """plotly.js as the ``plotly`` Python package ships it: the dashboard works offline, with no CDN."""
    spec = importlib.util.find_spec("plotly")
    path = Path(spec.origin).parent / "package_data" / "plotly.min.js" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise UsageError(f"the plotly package has no bundled plotly.min.js at {path}",
                         hint="pip install --force-reinstall 'ratiocinator[dashboard]'")
    return path


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'), allow_nan=False)}\n\n".encode()


def create_app(home: Path) -> Starlette:
    """The ASGI app for the home at ``home`` (its ledger must exist)."""
    home = Path(home).resolve()
    ledger = Ledger(Paths(home).ledger, read_only=True)
    plotly_path = plotly_js()

    async def read(fn: Callable[..., Any], *args: Any) -> Any:
        return await run_in_threadpool(fn, *args)

    def page(name: str) -> Callable[[Request], Any]:
        async def handler(request: Request) -> Response:
            return FileResponse(STATIC / name, media_type="text/html")
        return handler

    async def experiments_json(request: Request) -> JSONResponse:
        return JSONResponse(await read(experiments_document, ledger))

    async def experiment_json(request: Request) -> JSONResponse:
        exp_id = await _experiment_id(request)
        return JSONResponse(await read(experiment_document, ledger, exp_id, home))

    async def _experiment_id(request: Request) -> str:
        ref = request.path_params["experiment"]
        if not await read(ledger.has_experiment, ref):
            raise HTTPException(404, f"no experiment {ref}")
        return str(ref)

    async def stream(request: Request, produce: Callable[[], list[tuple[str, Any]]]) -> StreamingResponse:
        """Events from ``produce`` (called every POLL_S); a document is sent again only when it changed."""
        async def events() -> AsyncIterator[bytes]:
            last: dict[str, str] = {}
            quiet = 0.0
            while not await request.is_disconnected():
                sent = False
                for event, data in await read(produce):
                    text = json.dumps(data, sort_keys=True, allow_nan=False)
                    if event != "points" and last.get(event) == text:
                        continue
                    last[event] = text
                    sent = True
                    yield _sse(event, data)
                quiet = 0.0 if sent else quiet + POLL_S
                if quiet >= KEEPALIVE_S:
                    quiet = 0.0
                    yield b": keepalive\n\n"
                await asyncio.sleep(POLL_S)
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def experiments_stream(request: Request) -> StreamingResponse:
        return await stream(request, lambda: [("experiments", experiments_document(ledger))])

    async def experiment_stream(request: Request) -> StreamingResponse:
        exp_id = await _experiment_id(request)
        cursor = CurveCursor(request.query_params.get("metric", ""))

        def produce() -> list[tuple[str, Any]]:
            doc = experiment_document(ledger, exp_id, home)
            if not cursor.metric and doc["curve_metric"]:
                cursor.metric = doc["curve_metric"]
            out: list[tuple[str, Any]] = [("experiment", doc)]
            if cursor.metric:
                points = cursor.new_points(ledger, exp_id)
                if points:
                    out.append(("points", {"metric": cursor.metric, "runs": points}))
            return out
        return await stream(request, produce)

    async def session_json(request: Request) -> JSONResponse:
        return JSONResponse(await read(_session, request.path_params["tag"]))

    def _session(tag: str) -> dict[str, Any]:
        try:
            return session_document(ledger, tag)
        except KeyError:
            raise HTTPException(404, f"no autoresearch session {tag}") from None

    async def session_stream(request: Request) -> StreamingResponse:
        tag = request.path_params["tag"]
        await read(_session, tag)
        return await stream(request, lambda: [("session", session_document(ledger, tag))])

    async def report_file(request: Request) -> FileResponse:
        """The paper and its figures, once `research` or `report` wrote them."""
        exp_id = await _experiment_id(request)
        root = Paths(home).report(exp_id).resolve()
        target = (root / request.path_params["path"]).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            raise HTTPException(404, "no such report file")
        return FileResponse(target)

    async def plotly(request: Request) -> FileResponse:
        return FileResponse(plotly_path, media_type="text/javascript")

    routes = [
        Route("/", page("index.html")),
        Route("/experiments/{experiment}", page("experiment.html")),
        Route("/autoresearch/{tag}", page("session.html")),
        Route("/api/experiments", experiments_json),
        Route("/api/experiments/stream", experiments_stream),
        Route("/api/experiments/{experiment}", experiment_json),
        Route("/api/experiments/{experiment}/stream", experiment_stream),
        Route("/api/autoresearch/{tag}", session_json),
        Route("/api/autoresearch/{tag}/stream", session_stream),
        Route("/reports/{experiment}/{path:path}", report_file),
        Route("/vendor/plotly.min.js", plotly),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        ledger.close()

    return Starlette(routes=routes, lifespan=lifespan)
