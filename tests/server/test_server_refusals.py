"""Refused uploads keep no bytes and cannot be repeated without limit (the hardening issue)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from server_helpers import FakeClock, assert_error, make_payload, register, upload, work

from crowdtrain.config import RunConfig
from crowdtrain.server.coordinator import REFUSAL_EVERY_S, REFUSALS_BURST, Coordinator


def blob_files(coordinator: Coordinator) -> set[str]:
    return {p.name for p in coordinator.blobs.root.rglob("*") if p.is_file()}


def test_refused_uploads_keep_their_hash_and_reason_but_not_their_bytes(
    client: TestClient, coordinator: Coordinator, config: RunConfig, clock: FakeClock
) -> None:
    peer = register(client, "flood")
    before = blob_files(coordinator)
    for n in range(REFUSALS_BURST):  # no work order for round 5: each is refused (409)
        r = upload(client, peer, 5, make_payload(config, seed=100 + n))
        assert assert_error(r, 409)["error"] in {"closed", "no_order"}
    assert blob_files(coordinator) == before
    rows = coordinator.store.contributions_for_round(5, status="rejected")
    assert len(rows) == REFUSALS_BURST and all(r.blob_sha and r.reason for r in rows)
    # the next is slowed before its body is read
    r = upload(client, peer, 5, make_payload(config, seed=999))
    assert assert_error(r, 429)["error"] == "too_many_refusals"
    assert int(r.headers["retry-after"]) == int(REFUSAL_EVERY_S)
    assert len(coordinator.store.contributions_for_round(5, status="rejected")) == REFUSALS_BURST
    # other peers are not slowed, and the peer may try again later
    other = register(client, "other")
    assert work(client, other)["kind"] == "work"
    assert upload(client, other, 0, make_payload(config, seed=1)).status_code == 200
    clock.advance(REFUSAL_EVERY_S)
    assert upload(client, peer, 5, make_payload(config, seed=998)).status_code == 409


def test_a_refused_copy_of_an_accepted_payload_keeps_the_shared_blob(
    client: TestClient, coordinator: Coordinator, config: RunConfig
) -> None:
    honest, copier = register(client, "honest"), register(client, "copier")
    work(client, honest)
    payload = make_payload(config, seed=3)
    assert upload(client, honest, 0, payload).status_code == 200
    kept = blob_files(coordinator)
    assert_error(upload(client, copier, 0, payload), 409)  # no order for the copier
    assert blob_files(coordinator) == kept  # the honest peer's payload is still there
