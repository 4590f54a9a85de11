"""The round machine's transition table, read as data and checked against what the machine does.

Every (state, event type) pair has an entry; driving a protocol through open -> pause -> resume
-> close -> finish (and a pause and resume after the end) moves it exactly as the table says;
an event refused in a state gets its usual answer; an event type without a handler is a
TypeError that changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import get_args

import pytest
from test_protocol_core import SHARDS, delta, join_and_order, make, submit

from crowdtrain.protocol import (
    Accepted,
    ContributionSubmitted,
    Decision,
    Event,
    PeerJoined,
    PeerSeen,
    Rejected,
    RoundClosed,
    RoundProtocol,
    RunFinished,
    RunPaused,
    RunResumed,
    Tick,
    Wait,
    WorkOrder,
    WorkRequested,
)
from crowdtrain.protocol.core import EVENT_TYPES, LAST_ROUND_CLOSED, TRANSITIONS, RunState


def test_every_state_has_an_entry_for_every_event_type() -> None:
    assert set(EVENT_TYPES) == set(get_args(Event))
    assert set(TRANSITIONS) == set(RunState)
    for state in RunState:
        assert set(TRANSITIONS[state]) == set(EVENT_TYPES), state
        assert all(isinstance(after, RunState) for after in TRANSITIONS[state].values())
    assert set(RoundProtocol.HANDLERS) == set(EVENT_TYPES)


def test_only_pause_and_resume_move_the_run_and_only_a_close_finishes_it() -> None:
    for state in RunState:
        for kind, after in TRANSITIONS[state].items():
            if kind not in (RunPaused, RunResumed):
                assert after is state, (state, kind)
            assert after.finished == state.finished  # no event finishes or revives a run
        assert TRANSITIONS[state][RunPaused].paused
        assert not TRANSITIONS[state][RunResumed].paused
    for before, after in LAST_ROUND_CLOSED.items():
        assert not before.finished and not before.paused and after.finished and not after.paused


def test_state_flags_name_each_state_once() -> None:
    flags = {(s.finished, s.paused) for s in RunState}
    assert len(flags) == len(RunState) == 4
    for state in RunState:
        assert RunState.of(state.finished, state.paused) is state


def state(p: RoundProtocol) -> RunState:
    """The machine's state (read through a call: mypy would keep it narrowed across events)."""
    return p.state


def step(p: RoundProtocol, event: Event) -> list[Decision]:
    """Handle EVENT and check the state after it against the tables."""
    before = p.state
    decisions = p.handle(event)
    expected = TRANSITIONS[before][type(event)]
    if any(isinstance(d, RunFinished) for d in decisions) and not expected.finished:
        expected = LAST_ROUND_CLOSED[expected]  # the event closed the last round
    assert p.state is expected, (before, type(event).__name__, decisions)
    assert (p.finished, p.paused) == (p.state.finished, p.state.paused)
    assert (p.paused_at is not None) == p.paused
    return decisions


def contribution(p: RoundProtocol, peer: str, value: float) -> ContributionSubmitted:
    return ContributionSubmitted(
        peer_id=peer,
        round=p.round,
        base_version=p.version,
        delta=delta(value),
        samples=10,
        tokens=80,
        steps=5,
        train_loss=2.0,
    )


def test_open_pause_resume_close_finish_follow_the_table() -> None:
    p, clock = make(rounds={"total": 2, "quorum": 2})
    assert state(p) is RunState.COLLECTING  # round 0 is open
    for peer in ("a", "b"):
        assert step(p, PeerJoined(peer, peer)) == []
        (order,) = step(p, WorkRequested(peer))
        assert isinstance(order, WorkOrder)

    assert step(p, RunPaused()) == [] and state(p) is RunState.PAUSED
    (wait,) = step(p, WorkRequested("a"))
    assert isinstance(wait, Wait) and "paused" in wait.reason
    (accepted,) = step(p, contribution(p, "a", 1.0))  # taken, but nothing closes while paused
    assert isinstance(accepted, Accepted)
    clock.now += 500.0
    assert step(p, PeerSeen("b")) == [] and step(p, Tick()) == []
    assert step(p, RunPaused()) == [] and state(p) is RunState.PAUSED

    assert step(p, RunResumed()) == [] and state(p) is RunState.COLLECTING
    decisions = step(p, contribution(p, "b", 1.0))  # every assigned peer is in: it closes
    assert [type(d) for d in decisions] == [Accepted, RoundClosed]
    assert state(p) is RunState.COLLECTING and p.round == 1

    join_and_order(p, "a", "b")
    step(p, contribution(p, "a", 1.0))
    decisions = step(p, contribution(p, "b", 1.0))  # the last round closes: the run is over
    assert [type(d) for d in decisions] == [Accepted, RoundClosed, RunFinished]
    assert state(p) is RunState.FINISHED

    (finished,) = step(p, WorkRequested("a"))
    assert finished == RunFinished(p.version)
    (closed,) = step(p, contribution(p, "a", 1.0))
    assert isinstance(closed, Rejected) and closed.code == "closed"
    assert step(p, RunPaused()) == [] and state(p) is RunState.FINISHED_PAUSED
    (finished,) = step(p, WorkRequested("b"))
    assert finished == RunFinished(p.version)
    deadline = p.deadline
    clock.now += 10.0
    assert step(p, RunResumed()) == [] and state(p) is RunState.FINISHED
    assert p.deadline == pytest.approx(
        deadline + 10.0
    )  # a resume moves the last round's clock, as ever


@pytest.mark.parametrize("pause", [False, True])
@pytest.mark.parametrize("finish", [False, True])
def test_the_state_survives_a_snapshot(pause: bool, finish: bool) -> None:
    p, clock = make(rounds={"total": 1, "quorum": 1})
    join_and_order(p, "a")
    if finish:
        assert any(isinstance(d, RunFinished) for d in submit(p, "a", 1.0))
    if pause:
        p.handle(RunPaused())
    doc = json.loads(json.dumps(p.snapshot()))
    assert (doc["finished"], doc["paused_at"] is not None) == (finish, pause)
    tensors = {k: {n: t.clone() for n, t in v.items()} for k, v in p.tensors().items()}
    q = RoundProtocol.restore(p.config, doc, tensors, SHARDS, clock, lambda ref: delta(0.0))
    assert q.state is state(p) is RunState.of(finish, pause)


@dataclass(frozen=True)
class Stray:
    """An event type the protocol has no handler for."""

    peer_id: str


def test_an_event_type_without_a_handler_is_a_type_error_that_changes_nothing() -> None:
    p, _ = make()
    join_and_order(p, "a")
    before = json.dumps(p.snapshot())
    for event in (Stray("a"), object(), "Tick"):
        with pytest.raises(TypeError, match="unknown event type"):
            p.handle(event)  # type: ignore[arg-type]
    assert json.dumps(p.snapshot()) == before and state(p) is RunState.COLLECTING
    p.handle(RunPaused())
    with pytest.raises(TypeError, match="unknown event type Stray"):
        p.handle(Stray("a"))  # type: ignore[arg-type]
    assert state(p) is RunState.PAUSED


def test_a_subclass_of_an_event_type_is_handled_as_that_type() -> None:
    @dataclass(frozen=True)
    class Pause(RunPaused):
        pass

    p, _ = make()
    assert p.handle(Pause()) == [] and state(p) is RunState.PAUSED
