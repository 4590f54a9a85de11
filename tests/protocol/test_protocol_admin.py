"""Administrator events: pause and resume, unban, and moving a round's deadline."""

from __future__ import annotations

import json

import pytest
import torch
from test_protocol_core import SHARDS, join_and_order, make, submit

from crowdtrain.protocol import (
    Banned,
    DeadlineChanged,
    PeerBanned,
    PeerSeen,
    PeerUnbanned,
    RoundClosed,
    RoundProtocol,
    RunPaused,
    RunResumed,
    Tick,
    Unknown,
    Wait,
    WorkOrder,
    WorkRequested,
)


def test_pause_hands_out_no_work_and_closes_nothing_until_resumed() -> None:
    p, clock = make()
    join_and_order(p, "a", "b", "c")
    assert p.handle(RunPaused()) == [] and p.paused
    (wait,) = p.handle(WorkRequested("a"))
    assert isinstance(wait, Wait) and "paused" in wait.reason
    submit(p, "a", 1.0)
    submit(p, "b", 1.0)
    clock.now += 500.0  # far past the deadline: a paused round still does not close
    p.handle(PeerSeen("c"))  # c is still here, training
    assert p.handle(Tick()) == []
    assert p.round == 0
    deadline = p.deadline
    assert p.handle(RunResumed()) == []  # c's order still has the time it had when paused
    assert not p.paused and p.deadline == pytest.approx(deadline + 500.0)
    clock.now += 59.0
    p.handle(PeerSeen("c"))
    assert p.handle(Tick()) == []
    clock.now += 2.0
    (closed,) = p.handle(Tick())
    assert isinstance(closed, RoundClosed) and closed.contributors == ("a", "b")


def test_pausing_twice_counts_the_pause_from_its_start() -> None:
    p, clock = make()
    deadline = p.deadline
    p.handle(RunPaused())
    clock.now += 10.0
    p.handle(RunPaused())
    clock.now += 10.0
    p.handle(RunResumed())
    p.handle(RunResumed())  # resuming a running run changes nothing
    assert p.deadline == pytest.approx(deadline + 20.0)


def test_unban_lets_a_banned_peer_work_again_with_a_clean_record() -> None:
    p, _ = make()
    join_and_order(p, "a", "b")
    (banned, *_) = p.handle(PeerBanned("a", "spam"))
    assert isinstance(banned, Banned)
    (refused,) = p.handle(WorkRequested("a"))
    assert isinstance(refused, Banned) and refused.reason == "spam"
    assert p.handle(PeerUnbanned("a")) == []
    standing = p.peers["a"].standing
    assert not standing.banned and standing.ban_reason == "" and standing.strikes == 0.0
    (order,) = p.handle(WorkRequested("a"))
    assert isinstance(order, WorkOrder)
    outcomes = [(v.stage, v.outcome) for v in p.verdicts]
    assert outcomes == [("admin", "banned"), ("admin", "unbanned")]
    (stranger,) = p.handle(PeerUnbanned("ghost"))
    assert isinstance(stranger, Unknown)


def test_deadline_change_closes_a_round_once_the_new_deadline_passes() -> None:
    p, clock = make()
    join_and_order(p, "a", "b", "c")
    submit(p, "a", 1.0)
    submit(p, "b", 1.0)
    assert p.handle(DeadlineChanged(deadline_in=5.0, round_seconds=30.0)) == []
    assert p.deadline == pytest.approx(clock.now + 5.0)
    clock.now += 6.0
    (closed,) = p.handle(Tick())
    assert isinstance(closed, RoundClosed)
    assert p.deadline == pytest.approx(clock.now + 30.0)  # the next round's length


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_deadline_change_refuses_non_positive_seconds(bad: float) -> None:
    p, _ = make()
    with pytest.raises(ValueError, match="positive"):
        p.handle(DeadlineChanged(deadline_in=bad))
    with pytest.raises(ValueError, match="positive"):
        p.handle(DeadlineChanged(deadline_in=5.0, round_seconds=bad))


def test_pause_and_round_length_survive_a_snapshot() -> None:
    p, clock = make()
    p.handle(DeadlineChanged(deadline_in=5.0, round_seconds=42.0))
    p.handle(RunPaused())
    doc = json.loads(json.dumps(p.snapshot()))
    tensors = {k: {n: t.clone() for n, t in v.items()} for k, v in p.tensors().items()}
    q = RoundProtocol.restore(p.config, doc, tensors, SHARDS, clock, lambda ref: None)  # type: ignore[arg-type,return-value]
    assert q.paused and q.round_seconds == 42.0 and q.deadline == p.deadline
    assert torch.equal(q.params["w"], p.params["w"])
