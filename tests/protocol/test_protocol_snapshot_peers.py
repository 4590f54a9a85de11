"""Peers and work orders in the protocol snapshot: the same documents as ``dataclasses.asdict``."""

from __future__ import annotations

from dataclasses import asdict

from hypothesis import given
from hypothesis import strategies as st

from crowdtrain.protocol.events import PeerRecord, WorkOrder
from crowdtrain.protocol.snapshot import order_to_json, peer_from_json, peer_to_json
from crowdtrain.robust.reputation import Standing

small = st.integers(min_value=0, max_value=10**6)
floats = st.floats(allow_nan=False, allow_infinity=False, width=64)


@given(
    st.text(min_size=1, max_size=20),
    floats,
    st.booleans(),
    small,
    st.lists(small, max_size=5),
    st.lists(small, max_size=5),
    floats,
    st.booleans(),
    st.text(max_size=20),
)
def test_a_peer_record_is_asdict_and_round_trips(
    name: str,
    seen: float,
    online: bool,
    samples: int,
    rounds: list[int],
    steps: list[int],
    score: float,
    banned: bool,
    reason: str,
) -> None:
    standing = Standing(score=score, strikes=1.5, rounds_ok=2, banned=banned, ban_reason=reason)
    peer = PeerRecord("p-1", name, 1.0, seen, online, samples, 3, 4, 5, rounds, steps, standing)
    doc = peer_to_json(peer)
    assert doc == asdict(peer)
    assert doc["rounds"] is not peer.rounds and doc["steps"] is not peer.steps  # copies
    assert peer_from_json(doc) == peer


def test_a_work_order_is_asdict() -> None:
    order = WorkOrder("p-1", 3, 2, ("a", "b"), 7, 30, "steps", 10, 60.0, 123.5)
    assert order_to_json(order) == asdict(order)
