"""The coordinator's happy path over HTTP: register, manifest, work, blobs, upload, rounds."""

from __future__ import annotations

import hashlib

from fastapi.testclient import TestClient
from server_helpers import (
    FakeClock,
    assert_error,
    delta_blob_id,
    make_payload,
    meta,
    register,
    sha256,
    upload,
    work,
)

from crowdtrain.client.identity import verify_manifest
from crowdtrain.config import RunConfig
from crowdtrain.server.coordinator import Coordinator


def test_register_work_download_and_upload(client: TestClient, config: RunConfig) -> None:
    peer = register(client, "alice")
    assert peer.peer_id and peer.token
    assert client.get("/v1/manifest").status_code == 200
    order = work(client, peer)
    assert order["kind"] == "work"
    assert (order["round"], order["base_version"]) == (0, 0)
    assert order["shard_ids"] and order["max_steps"] == 2
    assert 0 < order["deadline_in"] <= 30

    full = client.get(f"/v1/blobs/{order['weights']}")
    assert full.status_code == 200
    assert full.headers["accept-ranges"] == "bytes"
    assert int(full.headers["content-length"]) == len(full.content)
    assert sha256(full.content) == order["weights"]
    size = len(full.content)

    part = client.get(f"/v1/blobs/{order['weights']}", headers={"Range": "bytes=10-99"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 10-99/{size}"
    assert part.content == full.content[10:100]
    tail = client.get(f"/v1/blobs/{order['weights']}", headers={"Range": "bytes=100-"})
    assert tail.status_code == 206
    assert full.content[:100] + tail.content == full.content
    suffix = client.get(f"/v1/blobs/{order['weights']}", headers={"Range": "bytes=-7"})
    assert (suffix.status_code, suffix.content) == (206, full.content[-7:])

    beyond = client.get(f"/v1/blobs/{order['weights']}", headers={"Range": f"bytes={size}-"})
    assert_error(beyond, 416)
    assert beyond.headers["content-range"] == f"bytes */{size}"

    for bad in ["0" * 64, "ABC", "..%5Cetc", "a" * 65, "%2E%2E"]:
        assert_error(client.get(f"/v1/blobs/{bad}"), 404)
    # httpx normalises "../etc" away; whatever route it lands on, it is a JSON 404.
    assert_error(client.get("/v1/blobs/../etc"), 404)

    for shard in order["shard_ids"]:
        r = client.get(f"/v1/blobs/{shard}")
        assert r.status_code == 200 and sha256(r.content) == shard

    payload = make_payload(config, seed=1)
    first = upload(client, peer, 0, payload)
    assert first.status_code == 200, first.text
    receipt = first.json()
    assert set(receipt) == {"receipt", "weight"} and receipt["receipt"]
    assert receipt["weight"] > 0
    again = upload(client, peer, 0, payload)
    assert again.status_code == 200
    assert again.json() == receipt


def test_manifest_verifies_with_the_client(client: TestClient, coordinator: Coordinator) -> None:
    r = client.get("/v1/manifest")
    assert r.status_code == 200
    doc = r.json()
    verified = verify_manifest(doc, None)
    assert verified.hash == doc["hash"]
    assert verified.config == coordinator.config
    assert dict(verified.param_shapes) == dict(coordinator.shapes)
    blob = client.get(f"/v1/blobs/{verified.initial_weights}")
    assert blob.status_code == 200
    assert hashlib.sha256(blob.content).hexdigest() == doc["manifest"]["initial_weights"]
    # A second fetch is byte-identical (the client pins the hash).
    assert client.get("/v1/manifest").json() == doc


def test_rounds_close_and_the_run_finishes(
    client: TestClient, coordinator: Coordinator, config: RunConfig
) -> None:
    a, b = register(client, "a"), register(client, "b")
    status = client.get("/v1/status").json()
    assert (status["round"], status["version"], status["finished"]) == (0, 0, False)
    assert {p["name"] for p in status["peers"]} == {"a", "b"}
    seen_weights = set()
    for rnd in range(config.rounds.total):
        orders = [work(client, a), work(client, b)]
        for o in orders:
            assert (o["kind"], o["round"], o["base_version"]) == ("work", rnd, rnd)
        assert orders[0]["weights"] == orders[1]["weights"]
        assert orders[0]["weights"] not in seen_weights
        seen_weights.add(orders[0]["weights"])
        assert upload(client, a, rnd, make_payload(config, 10 * rnd), meta(rnd)).status_code == 200
        assert client.post("/v1/work", headers=a.auth).json()["kind"] == "wait"
        r = upload(client, b, rnd, make_payload(config, 10 * rnd + 1), meta(rnd))
        assert r.status_code == 200, r.text
        client.app.state.coordinator.settle()  # type: ignore[attr-defined]  # the evaluation
        status = client.get("/v1/status").json()
        assert status["version"] == rnd + 1
        assert len(status["rounds"]) == rnd + 1
        row = status["rounds"][-1]
        assert row["round"] == rnd and row["contributors"] == 2 and row["samples"] == 16
        assert row["bytes_up"] > 0 and row["train_loss"] == 5.0
        assert isinstance(row["eval_loss"], float) and row["eval_loss"] > 0
    assert status["finished"] is True
    done = work(client, a)
    assert done["kind"] == "finished"
    assert done["version"] == config.rounds.total
    assert done["weights"] not in seen_weights
    final = client.get(f"/v1/blobs/{done['weights']}")
    assert final.status_code == 200 and sha256(final.content) == done["weights"]
    beat = client.post("/v1/heartbeat", headers=b.auth)
    assert beat.status_code == 200 and beat.json()["version"] == config.rounds.total
    # The run is over: a new contribution is refused.
    assert_error(upload(client, a, config.rounds.total, make_payload(config)), 409)


def test_round_closes_at_the_deadline_with_quorum(
    client: TestClient, coordinator: Coordinator, config: RunConfig, clock: FakeClock
) -> None:
    a, b, c = register(client, "a"), register(client, "b"), register(client, "c")
    for p in (a, b, c):
        assert work(client, p)["kind"] == "work"
    assert upload(client, a, 0, make_payload(config, 1)).status_code == 200
    assert upload(client, b, 0, make_payload(config, 2)).status_code == 200
    coordinator.tick()
    assert coordinator.protocol.version == 0  # still waiting for c before the deadline
    clock.advance(config.rounds.deadline_s + 1)
    coordinator.tick()
    assert coordinator.protocol.version == 1
    assert client.get("/v1/status").json()["rounds"][0]["contributors"] == 2


def test_aggregation_reads_payload_blobs_without_decoded_copies(
    client: TestClient, coordinator: Coordinator, config: RunConfig
) -> None:
    a, b = register(client, "a"), register(client, "b")
    work(client, a), work(client, b)
    payloads = [make_payload(config, 1), make_payload(config, 2)]
    deltas = [delta_blob_id(config, p) for p in payloads]
    assert upload(client, a, 0, payloads[0]).status_code == 200
    assert upload(client, b, 0, payloads[1]).status_code == 200
    assert coordinator.protocol.version == 1
    for delta, payload in zip(deltas, payloads, strict=True):
        assert not coordinator.blobs.has(delta)  # no fp32 copy was ever written
        assert coordinator.blobs.has(sha256(payload))  # what the volunteer sent is kept
    rows = coordinator.store.contributions_for_round(0, status="accepted")
    assert {r.blob_sha for r in rows} == {sha256(p) for p in payloads}


def test_openapi_is_served(client: TestClient) -> None:
    r = client.get("/v1/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    for path in (
        "/v1/register",
        "/v1/manifest",
        "/v1/work",
        "/v1/heartbeat",
        "/v1/status",
        "/v1/blobs/{sha}",
        "/v1/contributions/{round_number}",
    ):
        assert path in paths
    assert client.get("/docs").status_code == 200
