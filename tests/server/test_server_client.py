"""The volunteer's own client (`CoordinatorApi`) against the real app, through the test transport.

This pins the wire contract from both sides: what the server sends, the client's strict
message models accept, and what the client sends, the server accepts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from server_helpers import make_payload

from crowdtrain.client.api import ContributionMeta, CoordinatorApi, FinishedMsg, WorkOrderMsg
from crowdtrain.client.identity import verify_manifest
from crowdtrain.client.transfer import ApiError
from crowdtrain.config import RunConfig
from crowdtrain.server.coordinator import Coordinator


def api(client: TestClient) -> CoordinatorApi:
    return CoordinatorApi("http://testserver", transport=client._transport, insecure=True)


def test_client_runs_a_whole_round_trip(
    client: TestClient, coordinator: Coordinator, config: RunConfig, tmp_path: Path
) -> None:
    one, two = api(client), api(client)
    one.register("one", None, {"kind": "cpu", "threads": 1, "name": "t"})
    two.register("two", None, {"kind": "cpu", "threads": 1, "name": "t"})
    verified = verify_manifest(one.manifest(), None)
    for rnd in range(config.rounds.total):
        orders = [one.work(), two.work()]
        for i, (vol, order) in enumerate(zip((one, two), orders, strict=True)):
            assert isinstance(order, WorkOrderMsg) and order.round == rnd
            if rnd == 0:
                assert order.weights == verified.initial_weights
            path = vol.download(order.weights, tmp_path / f"w{rnd}-{i}", max_bytes=1 << 24)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == order.weights
            meta = ContributionMeta(
                base_version=order.base_version, samples=4, tokens=128, steps=2, train_loss=5.5
            )
            payload = make_payload(config, seed=rnd * 2 + i)
            receipt = vol.upload(rnd, payload, meta, max_payload_bytes=order.max_payload_bytes)
            assert receipt.receipt and receipt.weight == 4.0
            assert vol.upload(rnd, payload, meta).receipt == receipt.receipt
        beat = one.heartbeat()
        assert beat.version == rnd + 1
    finished = one.work()
    assert isinstance(finished, FinishedMsg) and finished.version == config.rounds.total
    assert one.status()["finished"] is True
    # A retry of a long-closed round's upload still gets its receipt (idempotent).
    meta = ContributionMeta(base_version=0, samples=4, tokens=128, steps=2, train_loss=5.5)
    assert one.upload(0, make_payload(config, 0), meta).receipt
    # A newcomer's upload after the end is refused with the server's code and sentence.
    three = api(client)
    three.register("three", None, {"kind": "cpu", "threads": 1, "name": "t"})
    with pytest.raises(ApiError) as info:
        three.upload(config.rounds.total - 1, make_payload(config, 99), meta)
    assert (info.value.status, info.value.code) == (409, "closed")
