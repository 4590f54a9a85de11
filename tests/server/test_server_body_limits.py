"""Every request body is bounded before it is read, and must keep arriving (`server.limits`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from fastapi.testclient import TestClient
from server_helpers import assert_error, register

from crowdtrain.server.coordinator import Coordinator
from crowdtrain.server.limits import MAX_JSON_BODY_BYTES, BodyLimit


def test_a_register_body_over_the_cap_is_refused_unread(
    client: TestClient, coordinator: Coordinator
) -> None:
    big = b'{"name": "x", "pad": "' + b"a" * (2 * MAX_JSON_BODY_BYTES) + b'"}'
    r = client.post("/v1/register", content=big, headers={"content-type": "application/json"})
    assert assert_error(r, 413)["error"] == "too_large"
    assert r.headers["connection"] == "close"
    assert coordinator.store.list_peers() == []
    register(client, "after")  # the coordinator is fine


def test_a_chunked_body_is_cut_off_at_the_cap(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"name": "x", "pad": "'
        for _ in range(200):
            yield b"a" * 1024

    r = client.post("/v1/register", content=chunks(), headers={"content-type": "application/json"})
    assert assert_error(r, 413)["error"] == "too_large"


def _run(middleware: BodyLimit, messages: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600)  # the client stalls
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "path": path, "method": "POST", "headers": []}
    asyncio.run(middleware(scope, receive, send))  # type: ignore[arg-type]
    return sent


def test_a_stalled_body_gets_408_and_the_app_never_runs() -> None:
    called = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        called.append(scope)

    limit = BodyLimit(app, idle_s=0.05)
    sent = _run(limit, [{"type": "http.request", "body": b"{", "more_body": True}], "/v1/register")
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert called == []


def test_a_whole_body_reaches_the_app_once() -> None:
    got: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        got.append(message["body"])
        assert not message["more_body"]

    limit = BodyLimit(app, idle_s=1.0)
    parts = [
        {"type": "http.request", "body": b'{"a":', "more_body": True},
        {"type": "http.request", "body": b" 1}", "more_body": False},
    ]
    _run(limit, parts, "/v1/register")
    assert got == [b'{"a": 1}']
