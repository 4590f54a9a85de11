"""The discrete-event loop: time order, FIFO ties, cancel, nesting, limits, determinism."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crowdtrain.sim.events import EventLoop, Handle, VirtualClock


def recorder(loop: EventLoop, log: list[tuple[float, str]], name: str) -> None:
    log.append((loop.now, name))


def test_events_run_in_time_order_and_clock_follows() -> None:
    loop = EventLoop()
    log: list[tuple[float, str]] = []
    for at, name in [(3.0, "c"), (1.0, "a"), (2.5, "b")]:
        loop.schedule(at, partial(recorder, loop, log, name))
    assert loop.pending == 3
    assert loop.run() == 3
    assert log == [(1.0, "a"), (2.5, "b"), (3.0, "c")]
    assert loop.now == 3.0 and loop.clock() == 3.0 and loop.pending == 0


def test_ties_run_in_scheduling_order() -> None:
    loop = EventLoop()
    log: list[tuple[float, str]] = []
    for i in range(20):
        loop.schedule(5.0, partial(recorder, loop, log, str(i)))
    loop.run()
    assert [n for _, n in log] == [str(i) for i in range(20)]


def test_after_is_relative_to_now_and_rejects_the_past() -> None:
    loop = EventLoop(start=10.0)
    log: list[tuple[float, str]] = []
    h = loop.after(2.0, lambda: recorder(loop, log, "x"), label="x")
    assert h.at == 12.0 and h.label == "x" and h.pending
    loop.run()
    assert log == [(12.0, "x")] and h.done and not h.pending
    with pytest.raises(ValueError, match="before now"):
        loop.schedule(11.0, lambda: None)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="delay"):
            loop.after(bad, lambda: None)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="finite"):
            loop.schedule(bad, lambda: None)
    with pytest.raises(ValueError, match="finite"):
        EventLoop(start=float("inf"))
    loop.schedule(12.0, lambda: recorder(loop, log, "now"))  # "now" is allowed
    loop.run()
    assert log[-1] == (12.0, "now")


def test_cancel() -> None:
    loop = EventLoop()
    log: list[tuple[float, str]] = []
    a = loop.schedule(1.0, lambda: recorder(loop, log, "a"))
    b = loop.schedule(2.0, lambda: recorder(loop, log, "b"))
    assert loop.cancel(a) is True
    assert loop.cancel(a) is False  # twice is a no-op
    assert loop.pending == 1 and a.cancelled and not a.pending
    assert loop.peek() == 2.0
    assert loop.run() == 1
    assert log == [(2.0, "b")]
    assert loop.cancel(b) is False  # already ran
    assert loop.peek() is None


def test_actions_schedule_and_cancel_more_events() -> None:
    loop = EventLoop()
    log: list[tuple[float, str]] = []
    victim = loop.schedule(4.0, lambda: recorder(loop, log, "victim"))

    def parent() -> None:
        recorder(loop, log, "parent")
        loop.after(0.0, lambda: recorder(loop, log, "child-now"))
        loop.after(1.0, lambda: recorder(loop, log, "child-later"))
        loop.cancel(victim)

    loop.schedule(1.0, parent)
    loop.schedule(1.0, lambda: recorder(loop, log, "sibling"))
    assert loop.run() == 4
    # A child scheduled for "now" runs after events already queued for the same time (FIFO).
    assert log == [(1.0, "parent"), (1.0, "sibling"), (1.0, "child-now"), (2.0, "child-later")]


def test_chain_of_self_rescheduling_events() -> None:
    loop = EventLoop()
    ticks: list[float] = []

    def tick() -> None:
        ticks.append(loop.now)
        if len(ticks) < 100:
            loop.after(0.5, tick)

    loop.after(0.0, tick)
    assert loop.run() == 100
    assert ticks == [0.5 * i for i in range(100)]


def test_until_and_max_events() -> None:
    loop = EventLoop()
    log: list[tuple[float, str]] = []
    for t in (1.0, 2.0, 3.0, 4.0):
        loop.schedule(t, partial(recorder, loop, log, str(t)))
    assert loop.run(until=2.0) == 2  # events at exactly `until` run
    assert loop.now == 2.0
    assert loop.run(until=2.5) == 0
    assert loop.now == 2.5  # time passes even when nothing happens
    assert loop.run(max_events=1) == 1
    assert loop.now == 3.0
    assert loop.run(max_events=0) == 0
    assert loop.run(until=10.0, max_events=5) == 1
    assert loop.now == 10.0 and loop.pending == 0
    assert loop.run() == 0 and loop.now == 10.0
    with pytest.raises(ValueError, match="before now"):
        loop.run(until=5.0)
    with pytest.raises(ValueError, match="max_events"):
        loop.run(max_events=-1)


def test_max_events_leaves_clock_at_last_event() -> None:
    loop = EventLoop()
    loop.schedule(1.0, lambda: None)
    loop.schedule(5.0, lambda: None)
    assert loop.run(until=9.0, max_events=1) == 1
    assert loop.now == 1.0 and loop.pending == 1


def test_run_from_inside_an_event_is_refused() -> None:
    loop = EventLoop()
    errors: list[Exception] = []

    def nested() -> None:
        try:
            loop.run()
        except RuntimeError as exc:
            errors.append(exc)

    loop.schedule(1.0, nested)
    loop.schedule(2.0, lambda: None)
    assert loop.run() == 2
    assert len(errors) == 1 and "inside an event" in str(errors[0])


def test_failing_action_stops_the_loop_and_it_can_resume() -> None:
    loop = EventLoop()
    log: list[tuple[float, str]] = []

    def boom() -> None:
        raise KeyError("boom")

    loop.schedule(1.0, lambda: recorder(loop, log, "a"))
    failing = loop.schedule(2.0, boom)
    loop.schedule(3.0, lambda: recorder(loop, log, "c"))
    with pytest.raises(KeyError, match="boom"):
        loop.run()
    assert loop.now == 2.0 and failing.done and loop.pending == 1
    assert loop.run() == 1  # the loop is usable again (not stuck "running")
    assert log == [(1.0, "a"), (3.0, "c")]


def test_virtual_clock_is_read_only_and_injectable() -> None:
    clock = VirtualClock(7.0)
    assert clock() == 7.0 and clock.now == 7.0
    loop = EventLoop()
    read: list[float] = []
    protocol_clock = loop.clock  # what the protocol core would be handed

    loop.schedule(3.25, lambda: read.append(protocol_clock()))
    loop.run()
    assert read == [3.25]


def _trace(seed_times: list[float]) -> list[tuple[float, int]]:
    loop = EventLoop()
    out: list[tuple[float, int]] = []
    for i, t in enumerate(seed_times):

        def act(i: int = i) -> None:
            out.append((loop.now, i))
            if i % 3 == 0:
                loop.after(0.25 * (i % 5), lambda: out.append((loop.now, -i)))

        loop.schedule(t, act)
    loop.run()
    return out


def test_runs_are_deterministic() -> None:
    times = [float((i * 7919) % 13) for i in range(60)]
    assert _trace(times) == _trace(times)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0, 100, allow_nan=False),
            st.booleans(),
            st.lists(st.floats(0, 10, allow_nan=False), max_size=3),
        ),
        max_size=40,
    )
)
def test_random_schedules_run_in_order_exactly_once(
    spec: list[tuple[float, bool, list[float]]],
) -> None:
    loop = EventLoop()
    ran: list[tuple[float, int]] = []  # (time it ran, event id)
    expected: set[int] = set()
    counter = iter(range(10**9))

    def leaf(eid: int) -> Callable[[], None]:
        return lambda: ran.append((loop.now, eid))

    def parent(eid: int, children: list[float]) -> Callable[[], None]:
        def act() -> None:
            ran.append((loop.now, eid))
            for d in children:
                cid = next(counter)
                expected.add(cid)
                loop.after(d, leaf(cid))

        return act

    handles: list[tuple[int, bool, Handle]] = []
    for at, cancel, children in spec:
        eid = next(counter)
        handles.append((eid, cancel, loop.schedule(at, parent(eid, children))))
    for eid, cancel, h in handles:
        if cancel:
            loop.cancel(h)
        else:
            expected.add(eid)
    loop.run()
    times = [t for t, _ in ran]
    assert times == sorted(times)
    ids = [e for _, e in ran]
    assert len(ids) == len(set(ids)) and set(ids) == expected
    assert loop.pending == 0
