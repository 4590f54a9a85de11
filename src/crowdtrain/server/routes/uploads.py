"""A volunteer's uploads: contributions (PUT /v1/contributions/{round}), spot-check replays
(PUT /v1/verifications/{check_id}) and usefulness scores (PUT /v1/scores/{check_id}), and the
steps they share.

Both go the same way: the Content-Length is checked against the cap (411/413) before a byte is
read, the ``X-Crowdtrain-Meta`` header is parsed into a pydantic model (400 ``bad_meta`` with
the first error), and the body is streamed into the blob store with the declared length
enforced again while reading, since a client can lie about its length (400 ``bad_length``).
Only then does the coordinator see the upload.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Header, Path, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from crowdtrain.faults import crash_point
from crowdtrain.robust.usefulness import Score
from crowdtrain.server.coordinator import MAX_META_BYTES, ContributionMeta, Coordinator, Problem
from crowdtrain.server.routes.deps import MAX_ROUND, CoordinatorDep, Peer
from crowdtrain.store import BlobTooLarge

M = TypeVar("M", bound=BaseModel)

router = APIRouter()


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


class ScoreBody(BaseModel):
    """The body of PUT /v1/scores/{check_id}: the four losses a score order asked for (mean
    next-token losses of θ and θ − Δ on the assigned and held-out batches) and the standard
    error of the assigned gain. Non-finite values are accepted here and judged a failure."""

    model_config = ConfigDict(extra="forbid")

    assigned_before: float
    assigned_after: float
    heldout_before: float
    heldout_after: float
    assigned_se: float = 0.0


#: The largest score body read (a few numbers): anything longer is refused unread.
MAX_SCORE_BYTES = 4096


async def small_json(request: Request, content_length: int | None, model: type[M]) -> M:
    """Parse a JSON body of at most MAX_SCORE_BYTES into MODEL, reading no more than that."""
    if content_length is None:
        raise Problem(411, "no_length", "this request needs a Content-Length header")
    if content_length > MAX_SCORE_BYTES:
        raise Problem(413, "too_large", f"the body is {content_length} bytes; the cap is 4096")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > content_length:
            raise Problem(400, "bad_length", "the body is longer than its Content-Length")
    try:
        return model.model_validate(json.loads(body))
    except (ValueError, ValidationError) as exc:
        first = first_error(exc) if isinstance(exc, ValidationError) else str(exc)
        raise Problem(400, "bad_body", f"the body is invalid: {first}") from None


def first_error(exc: ValidationError) -> str:
    """The first validation error as 'field: message' (or just the message at top level)."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).lower()
    return f"{where}: {msg}" if where else msg


def upload_headers(
    coordinator: Coordinator,
    meta_header: str | None,
    content_length: int | None,
    model: type[M],
) -> tuple[M, int]:
    """Check an upload's Content-Length against the cap and parse its meta header."""
    cap = coordinator.max_payload_bytes
    if content_length is None:
        raise Problem(411, "no_length", "an upload needs a Content-Length header")
    if content_length > cap:
        raise Problem(413, "too_large", f"the payload is {content_length} bytes; the cap is {cap}")
    if meta_header is None or len(meta_header) > MAX_META_BYTES:
        raise Problem(400, "bad_meta", "the X-Crowdtrain-Meta header is missing or too long")
    try:
        meta = model.model_validate(json.loads(meta_header))
    except (ValueError, ValidationError) as exc:
        first = first_error(exc) if isinstance(exc, ValidationError) else str(exc)
        raise Problem(
            400, "bad_meta", f"the X-Crowdtrain-Meta header is invalid: {first}"
        ) from None
    return meta, content_length


async def upload_body(
    coordinator: Coordinator, request: Request, content_length: int
) -> tuple[str, int]:
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


# Route functions carry no docstrings: FastAPI would publish them as OpenAPI descriptions.


@router.put("/v1/contributions/{round_number}")
async def contribute(
    round_number: Annotated[int, Path(ge=0, le=MAX_ROUND)],
    request: Request,
    peer_id: Peer,
    coordinator: CoordinatorDep,
    x_crowdtrain_meta: Annotated[str | None, Header()] = None,
    content_length: Annotated[int | None, Header(ge=0)] = None,
) -> dict[str, Any]:
    meta, length = upload_headers(coordinator, x_crowdtrain_meta, content_length, MetaHeader)
    done = coordinator.existing_receipt(peer_id, round_number)
    if done is not None:
        return done
    coordinator.expect_upload(peer_id)
    crash_point("upload.before_body")
    sha, size = await upload_body(coordinator, request, length)
    crash_point("upload.after_blob")
    return await run_in_threadpool(
        coordinator.submit,
        peer_id,
        round_number,
        ContributionMeta(**meta.model_dump()),
        sha,
        size,
    )


@router.put("/v1/verifications/{check_id}")
async def verification(
    check_id: Annotated[str, Path(pattern=r"^[0-9a-f]{1,64}$")],
    request: Request,
    peer_id: Peer,
    coordinator: CoordinatorDep,
    x_crowdtrain_meta: Annotated[str | None, Header()] = None,
    content_length: Annotated[int | None, Header(ge=0)] = None,
) -> dict[str, Any]:
    meta, length = upload_headers(coordinator, x_crowdtrain_meta, content_length, VerifyMetaHeader)
    coordinator.expect_upload(peer_id)
    coordinator.expect_verification(peer_id, check_id)
    sha, size = await upload_body(coordinator, request, length)
    crash_point("verification.after_blob")
    return await run_in_threadpool(
        coordinator.verification, peer_id, check_id, meta.steps, sha, size
    )


@router.put("/v1/scores/{check_id}")
async def score(
    check_id: Annotated[str, Path(pattern=r"^[0-9a-f]{1,64}$")],
    request: Request,
    peer_id: Peer,
    coordinator: CoordinatorDep,
    content_length: Annotated[int | None, Header(ge=0)] = None,
) -> dict[str, Any]:
    body = await small_json(request, content_length, ScoreBody)
    return await run_in_threadpool(coordinator.score, peer_id, check_id, Score(**body.model_dump()))
