"""The coordinator's HTTP API (docs/API.md) on FastAPI, assembled from routers by area.

``create_app`` builds the application around one ``Coordinator``: the routers of
``crowdtrain.server.routes`` (volunteers, dashboard, admin, blobs), the exception handlers that
turn every failure into ``{"error": code, "detail": ...}``, the body-bounding
(``server.limits``) and byte-counting middleware, the
dashboard's static files, and a lifespan task that ticks the coordinator so rounds close at
their deadlines. Handlers reach the coordinator through a dependency on ``app.state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import sqlite3
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from crowdtrain.server.coordinator import Coordinator, Problem
from crowdtrain.server.limits import BodyLimit, BodyTimeout
from crowdtrain.server.metrics import ByteCounter
from crowdtrain.server.openapi import truthful_openapi
from crowdtrain.server.routes import ROUTERS
from crowdtrain.server.routes.dashboard import STATIC

log = logging.getLogger(__name__)


#: What a write that found the state disk full answers (503 `disk_full`), and when to retry.
DISK_FULL = (
    "the coordinator's state disk is full, so nothing was stored; send it again later "
    "(the organizer has been told in the log)"
)
DISK_FULL_RETRY_S = 30


def disk_full(exc: BaseException) -> bool:
    """Whether EXC, or an exception it was raised from or during, is a write that found no
    space: an OSError ENOSPC or EDQUOT (a blob), or SQLite's SQLITE_FULL (the state database)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if getattr(current, "sqlite_errorname", None) == "SQLITE_FULL":
            return True
        current = current.__cause__ or current.__context__
    return False


def _problem(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


def _add_exception_handlers(app: FastAPI) -> None:
    """Every error leaves as `{"error": code, "detail": one sentence}` with its status."""

    @app.exception_handler(Problem)
    async def on_problem(request: Request, exc: Problem) -> JSONResponse:
        response = _problem(exc.status, exc.code, exc.detail)
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        return response

    @app.exception_handler(BodyTimeout)
    async def on_stall(request: Request, exc: BodyTimeout) -> JSONResponse:
        response = _problem(408, "body_timeout", str(exc))
        response.headers["Connection"] = "close"
        return response

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        detail = {404: "there is no such route", 405: "this route does not take this method"}
        response = _problem(
            exc.status_code,
            codes.get(exc.status_code, "http_error"),
            detail.get(exc.status_code, str(exc.detail)),
        )
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    def on_full(request: Request) -> JSONResponse:
        # Nothing was acknowledged: the last committed state stands, and the call may be sent
        # again once there is space (docs/API.md, 503 `disk_full`).
        log.error("%s %s: the state disk is full", request.method, request.url.path)
        response = _problem(503, "disk_full", DISK_FULL)
        response.headers["Retry-After"] = str(DISK_FULL_RETRY_S)
        return response

    # Handled here, inside the app, so that the connection stays usable; anything else goes on
    # to `on_error` (a 500).
    @app.exception_handler(OSError)
    @app.exception_handler(sqlite3.OperationalError)
    async def on_store_error(request: Request, exc: Exception) -> JSONResponse:
        if disk_full(exc):
            return on_full(request)
        raise exc

    @app.exception_handler(ClientDisconnect)
    async def on_disconnect(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # The volunteer (or its link) went away in the middle of a body: no one reads this
        # answer, and it is not the coordinator's failure (it was logged as a 500 with a
        # traceback until the chaos suite's dropped links showed it).
        log.info("%s %s: the client went away mid-body", request.method, request.url.path)
        return _problem(400, "disconnected", "the client went away before the body ended")

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        if disk_full(exc):  # raised as, or during, another error
            return on_full(request)
        # Logged with its traceback here; the volunteer gets one sentence only.
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _problem(500, "internal", "the coordinator failed to handle this request")

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
        return _problem(400, "bad_request", f"{where}: {str(err.get('msg', '')).lower()}")


def create_app(coordinator: Coordinator, *, tick_interval: float = 0.5) -> FastAPI:
    """The FastAPI application serving one coordinator."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def ticker() -> None:
            while True:
                await asyncio.sleep(tick_interval)
                try:
                    await run_in_threadpool(coordinator.tick)
                except Exception:  # keep ticking; the error is logged with its cause
                    log.exception("closing a round failed")

        task = asyncio.create_task(ticker())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(
        title="crowdtrain coordinator",
        version="1",
        openapi_url="/v1/openapi.json",
        lifespan=lifespan,
    )
    app.state.coordinator = coordinator
    app.add_middleware(BodyLimit)
    app.add_middleware(ByteCounter, metrics=coordinator.metrics)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_exception_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.openapi = lambda: truthful_openapi(app)  # type: ignore[method-assign]
    return app
