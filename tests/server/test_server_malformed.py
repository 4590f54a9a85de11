"""Malformed uploads are 400 with a detail naming the problem, and never reach the aggregator."""

from __future__ import annotations

import json
import math
import random

import pytest
from fastapi.testclient import TestClient
from server_helpers import (
    assert_error,
    make_payload,
    meta,
    nan_payload,
    register,
    upload,
    work,
    wrong_shape_payload,
)

from crowdtrain.config import RunConfig
from crowdtrain.server.coordinator import Coordinator


def bad_payloads(config: RunConfig) -> list[tuple[str, bytes, str]]:
    good = make_payload(config)
    noise = random.Random(3).randbytes(5000)
    return [
        ("truncated", good[: len(good) - 100], "bytes of tensor data"),
        ("truncated header", good[:50], "payload"),
        ("random bytes", noise, "payload"),
        ("empty", b"", "payload"),
        ("wrong shape", wrong_shape_payload(config), "has shape [3, 5]"),
        ("NaN inside", nan_payload(config), "NaN or Inf"),
        ("flipped byte", good[:-1] + bytes([good[-1] ^ 1]), "digest"),
    ]


BAD_META = [
    ("not JSON", "not json", "invalid"),
    ("a list", "[1, 2]", "valid dictionary"),
    ("missing field", json.dumps({"base_version": 0, "samples": 1}), "tokens"),
    ("negative samples", meta(samples=-1), "samples"),
    ("NaN loss", meta(train_loss=math.nan), "train_loss"),
    ("Inf loss", meta(train_loss=math.inf), "train_loss"),
    ("string loss", meta(train_loss="low"), "train_loss"),
    ("extra field", meta(bonus=1), "bonus"),
    ("negative base", meta(base_version=-1), "base_version"),
    ("huge", json.dumps({"pad": "x" * 5000}), "too long"),
]


def test_malformed_payloads_are_refused(
    client: TestClient, coordinator: Coordinator, config: RunConfig
) -> None:
    peer = register(client)
    work(client, peer)
    for what, payload, words in bad_payloads(config):
        doc = assert_error(upload(client, peer, 0, payload), 400)
        assert doc["error"] == "bad_payload", what
        assert words in doc["detail"], (what, doc)
        assert peer.peer_id not in coordinator.protocol.submitted(), what
    rows = coordinator.store.contributions_for_round(0)
    assert len(rows) == len(bad_payloads(config))
    assert all(r.status == "rejected" and r.reason for r in rows)
    # The peer is not locked out: a good upload afterwards is accepted and recorded.
    ok = upload(client, peer, 0, make_payload(config))
    assert ok.status_code == 200, ok.text
    assert coordinator.protocol.submitted() == (peer.peer_id,)
    accepted = coordinator.store.contributions_for_round(0, status="accepted")
    assert [r.receipt for r in accepted] == [ok.json()["receipt"]]


@pytest.mark.parametrize(("what", "header", "words"), BAD_META, ids=[m[0] for m in BAD_META])
def test_bad_meta_header_is_refused(
    client: TestClient,
    coordinator: Coordinator,
    config: RunConfig,
    what: str,
    header: str,
    words: str,
) -> None:
    peer = register(client)
    work(client, peer)
    doc = assert_error(upload(client, peer, 0, make_payload(config), header), 400)
    assert doc["error"] == "bad_meta"
    assert "X-Crowdtrain-Meta" in doc["detail"] and words in doc["detail"], doc
    assert coordinator.protocol.submitted() == ()


def test_missing_meta_and_zero_samples_are_refused(
    client: TestClient, coordinator: Coordinator, config: RunConfig
) -> None:
    peer = register(client)
    work(client, peer)
    payload = make_payload(config)
    r = client.put("/v1/contributions/0", content=payload, headers=peer.auth)
    assert assert_error(r, 400)["error"] == "bad_meta"
    for header in (meta(samples=0), meta(steps=0)):
        doc = assert_error(upload(client, peer, 0, payload, header), 400)
        assert "positive number of samples" in doc["detail"]
    assert coordinator.protocol.submitted() == ()
