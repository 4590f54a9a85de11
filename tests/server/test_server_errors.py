"""Every error is JSON {"error", "detail"} with one sentence; no response leaks a traceback."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from server_helpers import assert_error, make_payload, register, upload, work

from crowdtrain.config import RunConfig
from crowdtrain.server.coordinator import Coordinator


def test_framework_errors_are_json(client: TestClient) -> None:
    assert assert_error(client.get("/v1/nope"), 404)["error"] == "not_found"
    assert assert_error(client.get("/nothing-here"), 404)["error"] == "not_found"
    assert assert_error(client.delete("/v1/status"), 405)["error"] == "method_not_allowed"
    assert assert_error(client.get("/v1/work"), 405)["error"] == "method_not_allowed"


@pytest.mark.parametrize(
    "body",
    [
        b"{{",
        b"[]",
        b'{"name": ""}',
        b'{"name": "' + b"x" * 65 + b'"}',
        b'{"name": "x", "surprise": 1}',
        b'{"name": "x", "device": {"threads": 0}}',
        b'{"name": "x", "invite": 5}',
    ],
)
def test_bad_register_bodies_are_400(client: TestClient, body: bytes) -> None:
    r = client.post("/v1/register", content=body, headers={"Content-Type": "application/json"})
    assert_error(r, 400)


def test_bad_ranges(client: TestClient, coordinator: Coordinator) -> None:
    peer = register(client)
    sha = work(client, peer)["weights"]
    size = coordinator.blobs.size(sha)
    for header in ("bytes=abc-", "items=0-1", "bytes=0-1,3-4", "bytes=x"):
        assert assert_error(client.get(f"/v1/blobs/{sha}", headers={"Range": header}), 400)
    for header in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0"):
        r = client.get(f"/v1/blobs/{sha}", headers={"Range": header})
        assert_error(r, 416)
        assert r.headers["content-range"] == f"bytes */{size}"


def test_an_unexpected_failure_is_a_json_500(
    client: TestClient, coordinator: Coordinator, config: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = register(client)
    work(client, peer)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internal state /etc/passwd")

    monkeypatch.setattr(coordinator, "status", broken)
    monkeypatch.setattr(coordinator, "submit", broken)
    for r in (client.get("/v1/status"), upload(client, peer, 0, make_payload(config))):
        doc = assert_error(r, 500)
        assert "secret" not in r.text and "RuntimeError" not in r.text
        assert doc["error"] == "internal"
