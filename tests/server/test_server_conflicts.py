"""409 for contributions to a round that is closed, not open yet, or not the peer's."""

from __future__ import annotations

from fastapi.testclient import TestClient
from server_helpers import FakeClock, assert_error, make_payload, meta, register, upload, work

from crowdtrain.config import RunConfig
from crowdtrain.server.coordinator import Coordinator


def test_contribution_for_a_closed_round(
    client: TestClient, coordinator: Coordinator, config: RunConfig, clock: FakeClock
) -> None:
    a, b, late = register(client, "a"), register(client, "b"), register(client, "late")
    for p in (a, b, late):
        assert work(client, p)["round"] == 0
    receipts = [upload(client, p, 0, make_payload(config, i)).json() for i, p in enumerate((a, b))]
    clock.advance(config.rounds.deadline_s + 1)
    coordinator.tick()
    assert coordinator.protocol.round == 1
    doc = assert_error(upload(client, late, 0, make_payload(config, 9)), 409)
    assert doc["error"] == "closed" and "closed" in doc["detail"]
    # A peer that did contribute gets its receipt again (a retry after a lost reply).
    assert upload(client, a, 0, make_payload(config, 0)).json() == receipts[0]
    # A contribution for round 1 that claims base version 0 is stale.
    assert work(client, late)["round"] == 1
    doc = assert_error(upload(client, late, 1, make_payload(config), meta(0)), 409)
    assert doc["error"] == "bad_base"
    assert late.peer_id not in coordinator.protocol.submitted()


def test_contribution_for_a_round_that_has_not_opened(
    client: TestClient, coordinator: Coordinator, config: RunConfig
) -> None:
    peer = register(client)
    work(client, peer)
    for rnd in (1, 2, 10**6):
        doc = assert_error(upload(client, peer, rnd, make_payload(config)), 409)
        assert str(rnd) in doc["detail"] and "not opened" in doc["detail"], doc
    assert coordinator.protocol.submitted() == ()


def test_contribution_without_a_work_order(
    client: TestClient, coordinator: Coordinator, config: RunConfig
) -> None:
    peer = register(client)
    doc = assert_error(upload(client, peer, 0, make_payload(config)), 409)
    assert doc["error"] == "no_order"
    assert coordinator.protocol.submitted() == ()


def test_malformed_round_numbers_are_400_not_500(
    client: TestClient, coordinator: Coordinator, config: RunConfig
) -> None:
    peer = register(client)
    work(client, peer)
    for rnd in ("-1", str(2**63), str(10**30), "abc", "1.5"):
        doc = assert_error(upload(client, peer, rnd, make_payload(config)), 400)
        assert "round_number" in doc["detail"]
    assert coordinator.protocol.submitted() == ()
