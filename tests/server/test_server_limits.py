"""Upload size bounds: 413 before reading, 411 without a length, and bodies that lie."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, MutableMapping
from typing import Any

from fastapi.testclient import TestClient
from server_helpers import (
    Peer,
    assert_error,
    make_payload,
    meta,
    register,
    sha256,
    upload,
    work,
)

from crowdtrain.config import RunConfig
from crowdtrain.server.app import create_app
from crowdtrain.server.coordinator import Coordinator


def raw_put(
    coordinator: Coordinator, peer: Peer, headers: dict[str, str], body: bytes
) -> tuple[int, dict[str, Any], int]:
    """Call the ASGI app directly; return (status, JSON body, how often it read the request)."""
    app = create_app(coordinator)
    reads = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    all_headers = {"host": "test", **peer.auth, "x-crowdtrain-meta": meta(), **headers}
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "PUT",
        "scheme": "http",
        "path": "/v1/contributions/0",
        "raw_path": b"/v1/contributions/0",
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in all_headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
        "state": {},
    }
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(data), reads


def test_declared_length_over_the_cap_is_refused_before_reading(
    client: TestClient, coordinator: Coordinator
) -> None:
    peer = register(client)
    work(client, peer)
    cap = coordinator.max_payload_bytes
    status, doc, reads = raw_put(coordinator, peer, {"content-length": str(cap + 1)}, b"x")
    assert status == 413 and doc["error"] == "too_large" and str(cap) in doc["detail"]
    assert reads == 0
    # Through the test client too, with a real body of the declared size.
    r = upload(client, peer, 0, b"\0" * (cap + 1))
    assert_error(r, 413)
    assert coordinator.protocol.submitted() == ()


def test_body_longer_than_its_declared_length_is_refused(
    client: TestClient, coordinator: Coordinator, config: RunConfig
) -> None:
    peer = register(client)
    work(client, peer)
    cap = coordinator.max_payload_bytes
    big = make_payload(config) + b"\0" * cap
    assert len(big) > cap
    status, doc, _ = raw_put(coordinator, peer, {"content-length": "1000"}, big)
    assert status in (400, 413) and set(doc) == {"error", "detail"}
    # A valid payload sent with a length smaller than itself is refused too.
    payload = make_payload(config)
    status, doc, _ = raw_put(coordinator, peer, {"content-length": str(len(payload) - 1)}, payload)
    assert status in (400, 413) and set(doc) == {"error", "detail"}
    assert coordinator.protocol.submitted() == ()
    assert coordinator.store.contributions_for_round(0, status="accepted") == []
    assert not coordinator.blobs.has(sha256(big))
    assert not coordinator.blobs.has(sha256(payload))
    # The peer can still send the honest upload afterwards.
    assert upload(client, peer, 0, payload).status_code == 200


def test_upload_without_a_length_is_refused(
    client: TestClient, coordinator: Coordinator, config: RunConfig
) -> None:
    peer = register(client)
    work(client, peer)
    payload = make_payload(config)

    def chunks() -> Iterator[bytes]:
        yield payload[:100]
        yield payload[100:]

    headers = {**peer.auth, "X-Crowdtrain-Meta": meta()}
    r = client.put("/v1/contributions/0", content=chunks(), headers=headers)
    assert "content-length" not in r.request.headers
    assert_error(r, 411)
    status, doc, reads = raw_put(coordinator, peer, {}, payload)
    assert (status, doc["error"], reads) == (411, "no_length", 0)
    for bad in ("-1", "abc", "1e3"):
        status, doc, reads = raw_put(coordinator, peer, {"content-length": bad}, payload)
        assert (status, reads) == (400, 0), doc
    assert coordinator.protocol.submitted() == ()
