"""The coordinator's HTTP API (docs/API.md) on FastAPI: thin handlers over `Coordinator`.

Handlers parse and bound what arrives, then call the coordinator, which hands every round
decision to the sans-IO protocol core. Upload bodies are refused with 413 from their
Content-Length before a byte is read, and streamed to the blob store with the cap enforced
again while reading (a client can lie about its length).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path as FilePath
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from crowdtrain.protocol import (
    DeadlineChanged,
    PeerBanned,
    PeerUnbanned,
    RunPaused,
    RunResumed,
)
from crowdtrain.server.coordinator import ContributionMeta, Coordinator, Problem
from crowdtrain.server.metrics import ByteCounter
from crowdtrain.store import BlobNotFound, BlobTooLarge

log = logging.getLogger(__name__)

# Round numbers are stored as SQLite INTEGERs (64-bit signed); larger ones are malformed.
MAX_ROUND = 2**63 - 1
M = TypeVar("M", bound=BaseModel)
STATIC = FilePath(__file__).parent / "static"


class DeviceInfo(BaseModel):
    """What a volunteer says about its machine (informational)."""

    model_config = ConfigDict(extra="ignore")

    kind: str = Field("cpu", max_length=16)
    threads: int = Field(1, ge=1, le=4096)
    name: str = Field("", max_length=200)


class RegisterBody(BaseModel):
    """Body of POST /v1/register."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    invite: str | None = Field(None, max_length=256)
    device: DeviceInfo = DeviceInfo()


class MetaHeader(BaseModel):
    """The X-Crowdtrain-Meta header of a contribution upload."""

    model_config = ConfigDict(extra="forbid")

    base_version: int = Field(ge=0)
    samples: int = Field(ge=0, le=10**12)
    tokens: int = Field(ge=0, le=10**15)
    steps: int = Field(ge=0, le=10**9)
    train_loss: float = Field(allow_inf_nan=False)
    overlap_steps: int = Field(0, ge=0, le=10**9)
    overlap_round: int = Field(-1, ge=-1, le=10**9)
    overlap_first_batch: int = Field(0, ge=0, le=10**9)
    compute_s: float = Field(0.0, ge=0, le=1e7, allow_inf_nan=False)
    wall_s: float = Field(0.0, ge=0, le=1e7, allow_inf_nan=False)


class VerifyMetaHeader(BaseModel):
    """The X-Crowdtrain-Meta header of a spot-check replay upload."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(ge=0, le=10**9)


class BanBody(BaseModel):
    """Body of POST /v1/admin/peers/{peer_id}/ban."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field("banned by the organizer", min_length=1, max_length=500)


class DeadlineBody(BaseModel):
    """Body of POST /v1/admin/deadline."""

    model_config = ConfigDict(extra="forbid")

    deadline_in: float = Field(gt=0, le=7 * 86400, allow_inf_nan=False)
    round_seconds: float | None = Field(None, gt=0, le=7 * 86400, allow_inf_nan=False)


def _problem(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


def _first_error(exc: ValidationError) -> str:
    """The first validation error as 'field: message' (or just the message at top level)."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).lower()
    return f"{where}: {msg}" if where else msg


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """`bytes=a-b` / `bytes=a-` / `bytes=-n` → (start, stop) half-open, or None if unsatisfiable."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        raise Problem(400, "bad_range", "only a single 'bytes=' range is supported")
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            n = int(last)
            start, stop = max(0, size - n), size
        else:
            start = int(first)
            stop = size if last == "" else min(size, int(last) + 1)
    except ValueError:
        raise Problem(400, "bad_range", f"cannot parse the Range header {header!r}") from None
    if start >= size or start >= stop:
        return None
    return start, stop


def _peer(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """FastAPI dependency: the peer id behind the request's bearer token (else 401)."""
    token = None
    if authorization and authorization.lower().startswith("bearer "):
        token = authorization[7:].strip()
    coordinator: Coordinator = request.app.state.coordinator
    return coordinator.authenticate(token)


Peer = Annotated[str, Depends(_peer)]


def _admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """FastAPI dependency: the request carries the coordinator's admin token (else 401/403)."""
    coordinator: Coordinator = request.app.state.coordinator
    if coordinator.admin_token is None:
        raise Problem(403, "no_admin", "this coordinator was started without an admin token")
    token = ""
    if authorization and authorization.lower().startswith("bearer "):
        token = authorization[7:].strip()
    if not secrets.compare_digest(token.encode(), coordinator.admin_token.encode()):
        raise Problem(401, "bad_admin_token", "this call needs the run's admin token")


Admin = Depends(_admin)


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
    app.add_middleware(ByteCounter, metrics=coordinator.metrics)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(Problem)
    async def on_problem(request: Request, exc: Problem) -> JSONResponse:
        return _problem(exc.status, exc.code, exc.detail)

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

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        # Logged with its traceback here; the volunteer gets one sentence only.
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _problem(500, "internal", "the coordinator failed to handle this request")

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
        return _problem(400, "bad_request", f"{where}: {str(err.get('msg', '')).lower()}")

    @app.post("/v1/register")
    def register(body: RegisterBody) -> dict[str, str]:
        return coordinator.register(body.name, body.invite, body.device.model_dump())

    @app.get("/v1/manifest")
    def manifest() -> dict[str, Any]:
        return coordinator.manifest

    @app.post("/v1/work")
    def work(peer_id: Peer) -> dict[str, Any]:
        return coordinator.work(peer_id)

    @app.post("/v1/heartbeat")
    def heartbeat(peer_id: Peer) -> dict[str, Any]:
        return coordinator.heartbeat(peer_id)

    @app.get("/v1/status")
    def status() -> dict[str, Any]:
        return coordinator.status()

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/dashboard")
    def dashboard(since: Annotated[int | None, Query(ge=0, le=MAX_ROUND)] = None) -> dict[str, Any]:
        return coordinator.dashboard(since)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        body, content_type = coordinator.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/admin/check", dependencies=[Admin])
    def admin_check() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/v1/admin/pause", dependencies=[Admin])
    def admin_pause() -> dict[str, bool]:
        coordinator.admin(RunPaused())
        return {"paused": True}

    @app.post("/v1/admin/resume", dependencies=[Admin])
    def admin_resume() -> dict[str, bool]:
        coordinator.admin(RunResumed())
        return {"paused": False}

    @app.post("/v1/admin/peers/{peer_id}/ban", dependencies=[Admin])
    def admin_ban(
        peer_id: Annotated[str, Path(max_length=64)], body: BanBody | None = None
    ) -> dict[str, Any]:
        coordinator.admin(PeerBanned(peer_id, (body or BanBody()).reason))
        return {"peer_id": peer_id, "banned": True}

    @app.post("/v1/admin/peers/{peer_id}/unban", dependencies=[Admin])
    def admin_unban(peer_id: Annotated[str, Path(max_length=64)]) -> dict[str, Any]:
        coordinator.admin(PeerUnbanned(peer_id))
        return {"peer_id": peer_id, "banned": False}

    @app.post("/v1/admin/deadline", dependencies=[Admin])
    def admin_deadline(body: DeadlineBody) -> dict[str, float]:
        coordinator.admin(DeadlineChanged(body.deadline_in, body.round_seconds))
        return {"deadline": coordinator.protocol.deadline}

    @app.get("/v1/blobs/{sha}", response_model=None)
    def blob(sha: str, range: Annotated[str | None, Header()] = None) -> Response:
        try:
            size = coordinator.blobs.size(sha)
        except (BlobNotFound, ValueError):
            raise Problem(404, "no_blob", f"no blob {sha[:64]!r} on this coordinator") from None
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if range is None:
            headers["Content-Length"] = str(size)
            return StreamingResponse(coordinator.blobs.iter_range(sha), headers=headers)
        span = _parse_range(range, size)
        if span is None:
            return JSONResponse(
                {"error": "bad_range", "detail": f"the range {range[:64]!r} is outside the blob"},
                status_code=416,
                headers={"Accept-Ranges": "bytes", "Content-Range": f"bytes */{size}"},
            )
        start, stop = span
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        headers["Content-Length"] = str(stop - start)
        return StreamingResponse(
            coordinator.blobs.iter_range(sha, start, stop), status_code=206, headers=headers
        )

    def upload_headers(
        meta_header: str | None, content_length: int | None, model: type[M]
    ) -> tuple[M, int]:
        """Check an upload's Content-Length against the cap and parse its meta header."""
        cap = coordinator.max_payload_bytes
        if content_length is None:
            raise Problem(411, "no_length", "an upload needs a Content-Length header")
        if content_length > cap:
            raise Problem(
                413, "too_large", f"the payload is {content_length} bytes; the cap is {cap}"
            )
        if meta_header is None or len(meta_header) > 4096:
            raise Problem(400, "bad_meta", "the X-Crowdtrain-Meta header is missing or too long")
        try:
            meta = model.model_validate(json.loads(meta_header))
        except (ValueError, ValidationError) as exc:
            first = _first_error(exc) if isinstance(exc, ValidationError) else str(exc)
            raise Problem(
                400, "bad_meta", f"the X-Crowdtrain-Meta header is invalid: {first}"
            ) from None
        return meta, content_length

    async def upload_body(request: Request, content_length: int) -> tuple[str, int]:
        """Store an upload's body as a blob, reading no more than its Content-Length."""
        try:
            # The Content-Length (at most the cap) bounds the read: a body that lies about its
            # length is refused as soon as it passes the length it declared.
            sha, size = await coordinator.blobs.put_async_stream(
                request.stream(), max_bytes=content_length
            )
        except BlobTooLarge:
            raise Problem(
                400, "bad_length", f"the body is longer than its Content-Length of {content_length}"
            ) from None
        if size != content_length:
            raise Problem(
                400,
                "bad_length",
                f"the body has {size} bytes, not its Content-Length of {content_length}",
            )
        return sha, size

    @app.put("/v1/contributions/{round_number}")
    async def contribute(
        round_number: Annotated[int, Path(ge=0, le=MAX_ROUND)],
        request: Request,
        peer_id: Peer,
        x_crowdtrain_meta: Annotated[str | None, Header()] = None,
        content_length: Annotated[int | None, Header(ge=0)] = None,
    ) -> dict[str, Any]:
        meta, length = upload_headers(x_crowdtrain_meta, content_length, MetaHeader)
        done = coordinator.existing_receipt(peer_id, round_number)
        if done is not None:
            return done
        sha, size = await upload_body(request, length)
        return await run_in_threadpool(
            coordinator.submit,
            peer_id,
            round_number,
            ContributionMeta(**meta.model_dump()),
            sha,
            size,
        )

    @app.put("/v1/verifications/{check_id}")
    async def verification(
        check_id: Annotated[str, Path(pattern=r"^[0-9a-f]{1,64}$")],
        request: Request,
        peer_id: Peer,
        x_crowdtrain_meta: Annotated[str | None, Header()] = None,
        content_length: Annotated[int | None, Header(ge=0)] = None,
    ) -> dict[str, Any]:
        meta, length = upload_headers(x_crowdtrain_meta, content_length, VerifyMetaHeader)
        sha, size = await upload_body(request, length)
        return await run_in_threadpool(
            coordinator.verification, peer_id, check_id, meta.steps, sha, size
        )

    return app
