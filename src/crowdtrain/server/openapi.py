"""The OpenAPI document told true: every status each route can send, and no more.

FastAPI's generated schema lists 200 and 422 for every route. The coordinator never sends 422
(validation errors are 400, ``app._add_exception_handlers``), and it sends statuses FastAPI
cannot see (raised as ``Problem`` deep in the coordinator, or by the ``server.limits``
middleware). `ROUTE_ERRORS` lists them per route; `truthful_openapi` replaces 422 with those,
each with the error body `{"error": code, "detail": sentence}`, and drops `Content-Length`,
which FastAPI lists as an ordinary header parameter of the upload routes. A test keeps
`ROUTE_ERRORS` complete: a route missing from it fails the suite.

FastAPI cannot see the bytes a route reads or sends itself either: `ROUTE_BYTES` lists the
routes that answer raw bytes (with their success statuses: a blob answers a byte range 206),
and `UPLOAD_BODIES` the request body of the routes that stream it (`routes.uploads`).
`bench/fuzz_api.py` and tests/server/test_server_fuzz.py send generated requests to every route
and check each answer against this document.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from crowdtrain.server.routes.uploads import ScoreBody

#: What each status means, as docs/API.md says.
STATUS_TEXT = {
    200: "the whole blob",
    206: "the requested byte range (`Content-Range` says which)",
    400: "malformed request or payload; `detail` names the problem",
    401: "missing or wrong token, invite key, proof of work or identity token",
    403: "banned peer, a private blob, or no admin token configured",
    404: "unknown blob, peer or route",
    408: "the request body stopped arriving for 30 s",
    409: "a name taken, a round closed or not this peer's, or a check that is not (or no longer) "
    "this peer's",
    411: "an upload without Content-Length",
    413: "a body over the route's cap, refused before it is read",
    416: "a byte range outside the blob",
    429: "too many registrations or refused uploads; see Retry-After",
    500: "a bug (the server logs it)",
    503: "send it again (see Retry-After): the upload was lost, or the state disk is full "
    "(`disk_full`)",
}

_BODY = (400, 408, 413)  # every route with a body: malformed, stalled, too large
_PEER = (401, 403)  # bearer-token routes
_UPLOAD = (*_BODY, *_PEER, 409, 411, 429, 503)
_FULL = 503  # `disk_full`: a route that writes to the state found the disk full

#: (method, path) -> the statuses besides 200, 408, 413 and 500 that the route can send.
ROUTE_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("get", "/v1/register/challenge"): (404,),
    ("post", "/v1/register"): (*_BODY, 401, 403, 409, 429, _FULL),
    ("get", "/v1/manifest"): (),
    ("post", "/v1/work"): (*_BODY, *_PEER, _FULL),
    ("post", "/v1/heartbeat"): (*_BODY, *_PEER, _FULL),
    ("get", "/v1/status"): (),
    ("get", "/v1/dashboard"): (400,),
    ("get", "/v1/admin/check"): _PEER,
    ("post", "/v1/admin/pause"): (*_BODY, *_PEER, _FULL),
    ("post", "/v1/admin/resume"): (*_BODY, *_PEER, _FULL),
    ("post", "/v1/admin/peers/{peer_id}/ban"): (*_BODY, *_PEER, 404, _FULL),
    ("post", "/v1/admin/peers/{peer_id}/unban"): (*_BODY, *_PEER, 404, _FULL),
    ("post", "/v1/admin/deadline"): (*_BODY, *_PEER, _FULL),
    ("get", "/v1/blobs/{sha}"): (400, 403, 404, 416),
    ("put", "/v1/contributions/{round_number}"): _UPLOAD,
    ("put", "/v1/verifications/{check_id}"): _UPLOAD,
    ("put", "/v1/scores/{check_id}"): (*_UPLOAD,),
}

_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}

#: (method, path) -> the success statuses of a route that answers raw bytes, not JSON.
ROUTE_BYTES: dict[tuple[str, str], tuple[int, ...]] = {
    ("get", "/v1/blobs/{sha}"): (200, 206),
}

#: (method, path) -> the request body of a route whose handler streams it itself.
UPLOAD_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("put", "/v1/contributions/{round_number}"): {"required": True, "content": _BINARY},
    ("put", "/v1/verifications/{check_id}"): {"required": True, "content": _BINARY},
    ("put", "/v1/scores/{check_id}"): {
        "required": True,
        "content": {"application/json": {"schema": ScoreBody.model_json_schema()}},
    },
}

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {
        "error": {"type": "string", "description": "a machine-readable code"},
        "detail": {"type": "string", "description": "one sentence for a person"},
    },
    "additionalProperties": False,
}


def truthful_openapi(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document with each route's real error statuses (cached on the app)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    doc.setdefault("components", {}).setdefault("schemas", {})["Error"] = _ERROR_SCHEMA
    for schema in ("HTTPValidationError", "ValidationError"):
        doc["components"]["schemas"].pop(schema, None)
    ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            # any request may carry a body, which `server.limits` bounds in size and time
            statuses = sorted({*ROUTE_ERRORS.get((method, path), ()), 408, 413, 500})
            for status in statuses:
                responses[str(status)] = {"description": STATUS_TEXT[status], **ref}
            for status in ROUTE_BYTES.get((method, path), ()):
                responses[str(status)] = {"description": STATUS_TEXT[status], "content": _BINARY}
            if (method, path) in UPLOAD_BODIES:
                op["requestBody"] = UPLOAD_BODIES[(method, path)]
            params = [
                p for p in op.get("parameters", []) if p.get("name", "").lower() != "content-length"
            ]
            if params:
                op["parameters"] = params
            else:
                op.pop("parameters", None)
    app.openapi_schema = doc
    return doc
