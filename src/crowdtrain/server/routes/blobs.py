"""GET /v1/blobs/{sha}: weights, shards and payloads by content hash, with single byte ranges.

Volunteers resume interrupted downloads with ``Range: bytes=a-b`` (RFC 9110 §14): a
satisfiable range answers 206 with ``Content-Range``, a range outside the blob answers 416
with ``Content-Range: bytes */size``, and a blob this coordinator does not hold answers 404.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse, Response, StreamingResponse

from crowdtrain.server.coordinator import Problem
from crowdtrain.server.routes.deps import CoordinatorDep, bearer
from crowdtrain.store import BlobNotFound

router = APIRouter()

#: The form of Range header served, as the OpenAPI document gives it (`parse_range` answers
#: 400 to one it cannot parse).
RANGE_PATTERN = r"^bytes=([0-9]+-[0-9]*|-[0-9]+)$"


def parse_range(header: str, size: int) -> tuple[int, int] | None:
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


# No docstring: FastAPI would publish it as the route's OpenAPI description.
@router.get("/v1/blobs/{sha}", response_model=None)
def blob(
    sha: str,
    coordinator: CoordinatorDep,
    range: Annotated[str | None, Header(json_schema_extra={"pattern": RANGE_PATTERN})] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> Response:
    try:
        size = coordinator.blobs.size(sha)
    except (BlobNotFound, ValueError):
        raise Problem(404, "no_blob", f"no blob {sha[:64]!r} on this coordinator") from None
    coordinator.check_blob_access(sha, bearer(authorization))
    headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
    if range is None:
        headers["Content-Length"] = str(size)
        return StreamingResponse(coordinator.blobs.iter_range(sha), headers=headers)
    span = parse_range(range, size)
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
