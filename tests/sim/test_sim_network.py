"""The transfer-time model: latency + size / bottleneck rate, FIFO links, shared coordinator."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crowdtrain.sim.events import EventLoop
from crowdtrain.sim.network import LATENCY_RTTS, Link, Network, transfer_time

MB = 1_000_000
MBIT = 1_000_000.0
Workload = tuple[float, float, list[Link], list[tuple[float, int, bool, int]]]


def at_now(loop: EventLoop, log: list[tuple[str, float]], name: str) -> Callable[[], None]:
    return lambda: log.append((name, loop.now))


def test_single_transfer_is_latency_plus_size_over_bandwidth() -> None:
    loop = EventLoop()
    net = Network(loop)
    net.add_peer("a", Link(up_bps=8 * MBIT, down_bps=16 * MBIT, rtt_s=0.1))
    log: list[tuple[str, float]] = []
    up = net.upload("a", MB, at_now(loop, log, "up"))
    down = net.download("a", MB, at_now(loop, log, "down"))
    assert up == pytest.approx(1.5 * 0.1 + 1.0)
    assert down == pytest.approx(1.5 * 0.1 + 0.5)
    assert up == transfer_time(MB, 8 * MBIT, 0.1)
    assert LATENCY_RTTS == 1.5
    loop.run()
    assert log == [("down", down), ("up", up)]  # up and down links are independent


def test_transfer_starts_at_the_current_virtual_time() -> None:
    loop = EventLoop(start=100.0)
    net = Network(loop)
    net.add_peer("a", Link(8 * MBIT, 8 * MBIT, 0.0))
    assert net.upload("a", MB, lambda: None) == pytest.approx(101.0)
    assert net.download("a", 0, lambda: None) == 100.0  # nothing to send, no latency


def test_bottleneck_is_the_slower_of_peer_and_coordinator() -> None:
    loop = EventLoop()
    net = Network(loop, coordinator_in_bps=4 * MBIT, coordinator_out_bps=32 * MBIT)
    net.add_peer("a", Link(8 * MBIT, 16 * MBIT, 0.0))
    assert net.upload("a", MB, lambda: None) == pytest.approx(2.0)  # coordinator-bound
    assert net.download("a", MB, lambda: None) == pytest.approx(0.5)  # peer-bound


def test_fifo_queueing_on_one_link() -> None:
    loop = EventLoop()
    net = Network(loop)
    net.add_peer("a", Link(8 * MBIT, 8 * MBIT, 0.2))
    log: list[tuple[str, float]] = []
    first = net.upload("a", MB, at_now(loop, log, "1"))
    second = net.upload("a", 2 * MB, at_now(loop, log, "2"))
    third = net.upload("a", 0, at_now(loop, log, "3"))
    assert first == pytest.approx(0.3 + 1.0)
    # The second transmits once the first's bytes are out; latency occupies no bandwidth.
    assert second == pytest.approx(1.0 + 2.0 + 0.3)
    assert third == pytest.approx(3.0 + 0.3)
    loop.run()
    assert [n for n, _ in log] == ["1", "2", "3"]
    assert net.in_flight("a") == 0


def test_link_is_free_again_after_the_queue_drains() -> None:
    loop = EventLoop()
    net = Network(loop)
    net.add_peer("a", Link(8 * MBIT, 8 * MBIT, 0.0))
    net.upload("a", MB, lambda: None)
    loop.run(until=5.0)
    assert net.upload("a", MB, lambda: None) == pytest.approx(6.0)


def test_two_peers_serialize_on_a_slow_coordinator_ingress() -> None:
    loop = EventLoop()
    net = Network(loop, coordinator_in_bps=8 * MBIT)
    for p in ("a", "b"):
        net.add_peer(p, Link(100 * MBIT, 100 * MBIT, 0.1))
    a = net.upload("a", MB, lambda: None)
    b = net.upload("b", MB, lambda: None)
    assert a == pytest.approx(0.15 + 1.0)
    assert b == pytest.approx(0.15 + 2.0)
    # Egress is a separate resource: downloads do not wait for the uploads.
    assert net.download("a", MB, lambda: None) == pytest.approx(0.15 + 0.08)


def test_coordinator_capacity_is_shared_by_rate() -> None:
    loop = EventLoop()
    net = Network(loop, coordinator_in_bps=10 * MBIT)
    for i in range(11):
        net.add_peer(f"p{i}", Link(1 * MBIT, 1 * MBIT, 0.0))
    times = [net.upload(f"p{i}", MB // 8, lambda: None) for i in range(11)]
    # Ten peers at a tenth of the coordinator's capacity run side by side; the eleventh waits.
    assert times[:10] == pytest.approx([1.0] * 10)
    assert times[10] == pytest.approx(2.0)


def test_later_transfer_uses_capacity_left_idle_before_an_earlier_booking() -> None:
    loop = EventLoop()
    net = Network(loop, coordinator_in_bps=8 * MBIT)
    net.add_peer("a", Link(8 * MBIT, 8 * MBIT, 0.0))
    net.add_peer("b", Link(8 * MBIT, 8 * MBIT, 0.0))
    assert net.upload("a", 4 * MB, lambda: None) == pytest.approx(4.0)  # coordinator [0, 4)
    assert net.upload("a", MB, lambda: None) == pytest.approx(5.0)  # a's link: [4, 5)
    loop.run(until=4.0)
    # b asks at 4: the coordinator is booked for a in [4, 5), so b goes after it.
    assert net.upload("b", MB, lambda: None) == pytest.approx(6.0)


def test_backfill_does_not_delay_earlier_bookings() -> None:
    loop = EventLoop()
    net = Network(loop, coordinator_in_bps=8 * MBIT)
    net.add_peer("slow", Link(1 * MBIT, 1 * MBIT, 0.0))
    net.add_peer("a", Link(8 * MBIT, 8 * MBIT, 0.0))
    net.add_peer("b", Link(8 * MBIT, 8 * MBIT, 0.0))
    assert net.upload("a", MB, lambda: None) == pytest.approx(1.0)  # full capacity [0, 1)
    assert net.upload("a", MB, lambda: None) == pytest.approx(2.0)  # full capacity [1, 2)
    # The slow peer needs 1/8 of the capacity; it must wait until a's bookings end at 2.
    assert net.upload("slow", MB // 8, lambda: None) == pytest.approx(3.0)
    # b needs the full capacity for 1 s: [2, 3) is partly taken by slow, so it goes at 3.
    assert net.upload("b", MB, lambda: None) == pytest.approx(4.0)
    # A small transfer at 1/8 of capacity fits beside slow in [2, 3).
    net.add_peer("c", Link(1 * MBIT, 1 * MBIT, 0.0))
    assert net.upload("c", MB // 8, lambda: None) == pytest.approx(3.0)


def test_infinite_coordinator_makes_peers_independent() -> None:
    loop = EventLoop()
    net = Network(loop)
    for i in range(50):
        net.add_peer(f"p{i}", Link(8 * MBIT, 8 * MBIT, 0.05))
    times = [net.upload(f"p{i}", MB, lambda: None) for i in range(50)]
    assert times == [pytest.approx(1.075)] * 50


def test_cancel_peer_drops_its_transfers_and_frees_capacity() -> None:
    loop = EventLoop()
    net = Network(loop, coordinator_in_bps=8 * MBIT)
    net.add_peer("gone", Link(8 * MBIT, 8 * MBIT, 0.0))
    net.add_peer("stay", Link(8 * MBIT, 8 * MBIT, 0.0))
    log: list[tuple[str, float]] = []
    net.upload("gone", 4 * MB, at_now(loop, log, "gone-up"))  # coordinator [0, 4)
    net.upload("gone", MB, at_now(loop, log, "gone-up2"))  # [4, 5)
    net.download("gone", 2 * MB, at_now(loop, log, "gone-down"))
    assert net.in_flight("gone") == 3
    loop.run(until=1.0)
    assert net.cancel_peer("gone") == 3
    assert net.in_flight("gone") == 0 and net.cancel_peer("gone") == 0
    # The capacity it had booked from now on is free again, and so is its own link.
    assert net.upload("stay", MB, at_now(loop, log, "stay")) == pytest.approx(2.0)
    assert net.upload("gone", MB, at_now(loop, log, "rejoined")) == pytest.approx(3.0)
    loop.run()
    assert log == [("stay", 2.0), ("rejoined", 3.0)]
    assert net.stats("gone").bytes_up == MB and net.stats("gone").bytes_down == 0
    assert net.coordinator_bytes_in == 2 * MB


def test_counters_and_busy_time() -> None:
    loop = EventLoop()
    net = Network(loop, coordinator_out_bps=4 * MBIT)
    net.add_peer("a", Link(8 * MBIT, 16 * MBIT, 0.1))
    net.add_peer("b", Link(8 * MBIT, 16 * MBIT, 0.1))
    net.upload("a", MB, lambda: None)
    net.upload("a", 3 * MB, lambda: None)
    net.download("a", MB, lambda: None)
    net.download("b", 2 * MB, lambda: None)
    assert net.stats("a").bytes_up == 0  # counted on arrival
    loop.run()
    a, b = net.stats("a"), net.stats("b")
    assert (a.bytes_up, a.bytes_down, b.bytes_up, b.bytes_down) == (4 * MB, MB, 0, 2 * MB)
    assert a.busy_up_s == pytest.approx(4.0)
    assert a.busy_down_s == pytest.approx(2.0)  # at the coordinator's 4 Mbit/s
    assert b.busy_down_s == pytest.approx(4.0)
    assert net.coordinator_bytes_in == 4 * MB and net.coordinator_bytes_out == 3 * MB
    assert net.peers == ["a", "b"]


def test_add_peer_again_changes_the_link() -> None:
    loop = EventLoop()
    net = Network(loop)
    net.add_peer("a", Link(8 * MBIT, 8 * MBIT, 0.0))
    net.add_peer("a", Link(16 * MBIT, 8 * MBIT, 0.0))
    assert net.link("a").up_bps == 16 * MBIT
    assert net.upload("a", MB, lambda: None) == pytest.approx(0.5)


def test_validation_errors_are_one_sentence() -> None:
    with pytest.raises(ValueError, match="up_bps must be a positive"):
        Link(0.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="down_bps must be a positive"):
        Link(1.0, math.nan, 0.1)
    with pytest.raises(ValueError, match="rtt_s must be zero or more"):
        Link(1.0, 1.0, -0.1)
    with pytest.raises(ValueError, match="rtt_s must be zero or more"):
        Link(1.0, 1.0, math.inf)
    loop = EventLoop()
    with pytest.raises(ValueError, match="coordinator_in_bps"):
        Network(loop, coordinator_in_bps=-1.0)
    net = Network(loop)
    with pytest.raises(ValueError, match="unknown peer 'x'"):
        net.upload("x", 1, lambda: None)
    net.add_peer("a", Link(1.0, 1.0, 0.0))
    with pytest.raises(ValueError, match="whole number of bytes"):
        net.upload("a", -1, lambda: None)
    with pytest.raises(ValueError, match="whole number of bytes"):
        net.download("a", 1.5, lambda: None)  # type: ignore[arg-type]
    assert Link(math.inf, math.inf, 0.0).up_bps == math.inf  # an unlimited link is allowed


def _scenario() -> list[tuple[str, float]]:
    loop = EventLoop()
    net = Network(loop, coordinator_in_bps=50 * MBIT, coordinator_out_bps=80 * MBIT)
    log: list[tuple[str, float]] = []
    for i in range(8):
        net.add_peer(f"p{i}", Link((10 + 7 * i) * MBIT, (30 + 11 * i) * MBIT, 0.02 * (i + 1)))

    def round_trip(i: int, k: int) -> None:
        def uploaded() -> None:
            log.append((f"up{i}.{k}", loop.now))
            if k < 3:
                net.download(f"p{i}", (1 + i) * MB, downloaded)

        def downloaded() -> None:
            log.append((f"down{i}.{k}", loop.now))
            loop.after(0.1 * i, lambda: round_trip(i, k + 1))

        net.upload(f"p{i}", (2 + i % 3) * MB, uploaded)

    for i in range(8):
        loop.schedule(0.05 * i, lambda i=i: round_trip(i, 0))  # type: ignore[misc]

    def churn() -> None:
        net.cancel_peer("p3")

    loop.schedule(1.0, churn)
    loop.run()
    return log


def test_runs_are_deterministic() -> None:
    first = _scenario()
    assert len(first) > 40
    assert first == _scenario()


@st.composite
def workloads(
    draw: st.DrawFn,
) -> tuple[float, float, list[Link], list[tuple[float, int, bool, int]]]:
    rate = st.sampled_from([1 * MBIT, 2 * MBIT, 5 * MBIT, 10 * MBIT, 100 * MBIT, math.inf])
    cin, cout = draw(rate), draw(rate)
    links = draw(
        st.lists(
            st.builds(
                Link,
                st.sampled_from([1 * MBIT, 3 * MBIT, 8 * MBIT, 20 * MBIT]),
                st.sampled_from([1 * MBIT, 4 * MBIT, 10 * MBIT, 50 * MBIT]),
                st.sampled_from([0.0, 0.02, 0.1, 0.25]),
            ),
            min_size=1,
            max_size=5,
        )
    )
    transfers = draw(
        st.lists(
            st.tuples(
                st.floats(0, 5, allow_nan=False),
                st.integers(0, len(links) - 1),
                st.booleans(),
                st.integers(0, 2 * MB),
            ),
            max_size=25,
        )
    )
    return cin, cout, links, transfers


@settings(max_examples=120, deadline=None)
@given(workloads())
def test_property_no_faster_than_alone_and_links_never_overlap(
    work: Workload,
) -> None:
    cin, cout, links, transfers = work
    loop = EventLoop()
    net = Network(loop, coordinator_in_bps=cin, coordinator_out_bps=cout)
    for i, link in enumerate(links):
        net.add_peer(f"p{i}", link)
    # (peer, up, request order) -> list of (start, end, rate) transmission intervals
    busy: dict[tuple[int, bool], list[tuple[float, float, float]]] = {}
    coord: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
    fired: list[tuple[float, float]] = []

    def request(peer: int, up: bool, nbytes: int) -> None:
        link = links[peer]
        rate = min(link.up_bps if up else link.down_bps, cin if up else cout)
        alone = transfer_time(nbytes, rate, link.rtt_s)
        now = loop.now
        promised: list[float] = []
        go = net.upload if up else net.download
        arrival = go(f"p{peer}", nbytes, lambda: fired.append((promised[0], loop.now)))
        promised.append(arrival)
        assert arrival >= now + alone - 1e-9
        end = arrival - LATENCY_RTTS * link.rtt_s
        start = end - (alone - LATENCY_RTTS * link.rtt_s)
        assert start >= now - 1e-9
        busy.setdefault((peer, up), []).append((start, end, rate))
        coord[up].append((start, end, rate))

    for at, peer, up, nbytes in transfers:
        loop.schedule(at, lambda p=peer, u=up, n=nbytes: request(p, u, n))  # type: ignore[misc]
    loop.run()
    # Every transfer completes exactly once, at the time it promised.
    assert len(fired) == len(transfers)
    assert all(promised == actual for promised, actual in fired)
    # A peer link transmits one transfer at a time, in request order (FIFO).
    for intervals in busy.values():
        for (_, e0, _), (s1, e1, _) in itertools.pairwise(intervals):
            assert s1 >= e0 - 1e-9 and e1 >= s1
    # The coordinator never carries more than its capacity on either side.
    for up, cap in ((True, cin), (False, cout)):
        if math.isinf(cap):
            continue
        spans = [(s, e, r) for s, e, r in coord[up] if e > s]
        for s, _, _ in spans:
            load = sum(r for s2, e2, r in spans if s2 <= s + 1e-12 and e2 > s + 1e-9)
            assert load <= cap * (1 + 1e-6)
