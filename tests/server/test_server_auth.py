"""Bearer tokens and invite keys: every auth call refuses a missing or wrong token with 401."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from server_helpers import FakeClock, Peer, assert_error, make_payload, register, upload, work

from crowdtrain.config import RunConfig
from crowdtrain.server.admission import AdmissionConfig
from crowdtrain.server.app import create_app
from crowdtrain.server.coordinator import Coordinator, token_hash

BAD_AUTH = [
    {},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer not-a-token"},
    {"Authorization": "Basic dXNlcjpwYXNz"},
    {"Authorization": "not-even-a-scheme"},
]


@pytest.mark.parametrize("headers", BAD_AUTH)
def test_work_and_heartbeat_need_a_valid_token(client: TestClient, headers: dict[str, str]) -> None:
    register(client)
    assert_error(client.post("/v1/work", headers=headers), 401)
    assert_error(client.post("/v1/heartbeat", headers=headers), 401)


def test_contribution_needs_a_valid_token(
    client: TestClient, coordinator: Coordinator, config: RunConfig
) -> None:
    peer = register(client)
    work(client, peer)
    payload = make_payload(config)
    for headers in BAD_AUTH:
        hdrs = {**headers, "X-Crowdtrain-Meta": "{}"}
        assert_error(client.put("/v1/contributions/0", content=payload, headers=hdrs), 401)
    # Another peer's token with a tampered last character is a different token.
    forged = Peer(peer.peer_id, peer.token[:-1] + ("A" if peer.token[-1] != "A" else "B"))
    assert_error(upload(client, forged, 0, payload), 401)
    assert coordinator.protocol.submitted() == ()
    assert upload(client, peer, 0, payload).status_code == 200


def test_tokens_are_stored_hashed(client: TestClient, coordinator: Coordinator) -> None:
    peer = register(client)
    row = coordinator.store.get_peer(peer.peer_id)
    assert row is not None
    assert row.token_hash == token_hash(peer.token) and peer.token not in row.token_hash
    assert client.post("/v1/heartbeat", headers=peer.auth).status_code == 200


def test_invite_mode(config: RunConfig, tmp_path: Path, clock: FakeClock) -> None:
    coordinator = Coordinator(
        config,
        tmp_path / "state",
        clock=clock,
        admission=AdmissionConfig(invite="s3cret"),
        eval_batch_count=1,
    )
    with TestClient(create_app(coordinator), raise_server_exceptions=False) as client:
        device = {"kind": "cpu", "threads": 1, "name": "t"}
        for body in (
            {"name": "x", "device": device},
            {"name": "x", "invite": None, "device": device},
            {"name": "x", "invite": "wrong", "device": device},
            {"name": "x", "invite": "", "device": device},
            {"name": "x", "invite": "s3cret ", "device": device},
        ):
            assert_error(client.post("/v1/register", json=body), 401)
        assert coordinator.store.list_peers() == []
        peer = register(client, "x", invite="s3cret")
        assert work(client, peer)["kind"] == "work"
