"""The round protocol driven directly: no network, no disk, time from a fake clock."""

from __future__ import annotations

import pytest
import torch

from crowdtrain.config import RunConfig, parse_config
from crowdtrain.protocol import (
    Accepted,
    ContributionSubmitted,
    PeerJoined,
    PeerLeft,
    PeerSeen,
    Rejected,
    RoundClosed,
    RoundProtocol,
    RunFinished,
    Tick,
    Unknown,
    Wait,
    WorkOrder,
    WorkRequested,
)
from crowdtrain.robust import DictSource

SHARDS = [f"{i:064x}" for i in range(10)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    rounds: dict[str, object] | None = None,
    outer: dict[str, object] | None = None,
    aggregation: str = "mean",
    inner: dict[str, object] | None = None,
) -> tuple[RoundProtocol, FakeClock]:
    cfg = parse_config(
        {
            "rounds": {"total": 3, "quorum": 2, "deadline_s": 60.0, **(rounds or {})},
            "inner": inner or {},
            "outer": {"optimizer": "error_feedback", "lr": 1.0, **(outer or {})},
            "aggregation": {"method": aggregation, "bucket_size": 1},
            "data": {"shards_per_peer": 2},
            # Round mechanics only; the verification stages have their own tests.
            "defence": {"enabled": False},
        }
    )
    clock = FakeClock()
    params = {"w": torch.zeros(4, 3), "b": torch.zeros(5)}
    return RoundProtocol(cfg, params, SHARDS, clock), clock


def delta(value: float) -> DictSource:
    return DictSource({"w": torch.full((4, 3), value), "b": torch.full((5,), value)})


def submit(
    p: RoundProtocol, peer: str, value: float, samples: int = 10, round_: int | None = None
) -> list[object]:
    rnd = p.round if round_ is None else round_
    return list(
        p.handle(
            ContributionSubmitted(
                peer_id=peer,
                round=rnd,
                base_version=rnd if round_ is None else round_,
                delta=delta(value),
                samples=samples,
                tokens=samples * 8,
                steps=5,
                train_loss=2.0,
            )
        )
    )


def join_and_order(p: RoundProtocol, *peers: str) -> dict[str, WorkOrder]:
    orders = {}
    for peer in peers:
        assert p.handle(PeerJoined(peer, peer)) == []
        (order,) = p.handle(WorkRequested(peer))
        assert isinstance(order, WorkOrder)
        orders[peer] = order
    return orders


def test_work_orders_are_replayable_and_idempotent() -> None:
    p, _ = make()
    orders = join_and_order(p, "a", "b")
    a = orders["a"]
    assert (a.round, a.base_version, a.step_offset) == (0, 0, 0)
    assert len(a.shard_ids) == 2 and set(a.shard_ids) <= set(SHARDS)
    assert p.handle(WorkRequested("a")) == [a]  # asking again gives the same order
    assert orders["a"].deadline == pytest.approx(1060.0)


def test_unknown_peer_is_refused() -> None:
    p, _ = make()
    (d,) = p.handle(WorkRequested("ghost"))
    assert isinstance(d, Unknown)
    (d,) = submit(p, "ghost", 1.0)
    assert isinstance(d, Unknown)


def test_round_closes_early_when_all_assigned_submit_and_weights_by_samples() -> None:
    p, _ = make()
    join_and_order(p, "a", "b")
    first = submit(p, "a", 1.0, samples=30)
    assert len(first) == 1 and isinstance(first[0], Accepted)
    decisions = submit(p, "b", 5.0, samples=10)
    closed = [d for d in decisions if isinstance(d, RoundClosed)]
    assert len(closed) == 1 and closed[0].new_version == 1
    assert closed[0].contributors == ("a", "b")
    # error-feedback outer step with lr 1: θ ← θ − weighted mean(Δ) = −(30·1 + 10·5)/40
    assert torch.allclose(p.params["w"], torch.full((4, 3), -2.0))
    assert p.round == 1 and p.version == 1


def test_repeated_submission_returns_the_same_receipt() -> None:
    p, _ = make(rounds={"quorum": 1})
    join_and_order(p, "a", "b")
    (first,) = submit(p, "a", 1.0)
    (again,) = submit(p, "a", 9.0)
    assert isinstance(first, Accepted) and isinstance(again, Accepted)
    assert first.receipt == again.receipt
    assert p.peers["a"].accepted == 1


def test_deadline_closes_with_quorum_and_absent_peers_are_absent() -> None:
    p, clock = make()
    join_and_order(p, "a", "b", "c")
    submit(p, "a", 1.0)
    submit(p, "b", 1.0)
    assert p.handle(Tick()) == []  # c still has time
    clock.now += 61.0
    (closed,) = p.handle(Tick())
    assert isinstance(closed, RoundClosed) and closed.contributors == ("a", "b")
    (late,) = submit(p, "c", 1.0, round_=0)
    assert isinstance(late, Rejected) and late.code == "closed"


def test_deadline_without_quorum_waits_for_quorum() -> None:
    p, clock = make()
    join_and_order(p, "a", "b")
    submit(p, "a", 1.0)
    clock.now += 1000.0
    assert p.handle(Tick()) == []
    assert p.round == 0
    join_and_order(p, "c")
    decisions = submit(p, "c", 1.0)
    assert any(isinstance(d, RoundClosed) for d in decisions)


def test_peer_leaving_releases_its_order() -> None:
    p, _ = make()
    join_and_order(p, "a", "b", "c")
    submit(p, "a", 1.0)
    submit(p, "b", 1.0)
    decisions = p.handle(PeerLeft("c"))
    assert any(isinstance(d, RoundClosed) for d in decisions)


def test_wrong_base_no_order_and_bad_samples_are_rejected() -> None:
    p, _ = make()
    join_and_order(p, "a")
    p.handle(PeerJoined("z"))
    (d,) = submit(p, "z", 1.0)
    assert isinstance(d, Rejected) and d.code == "no_order"
    (d,) = p.handle(
        ContributionSubmitted("a", 0, 7, delta(1.0), samples=5, tokens=5, steps=1, train_loss=1.0)
    )
    assert isinstance(d, Rejected) and d.code == "bad_base"
    (d,) = submit(p, "a", 1.0, samples=0)
    assert isinstance(d, Rejected) and d.code == "bad_samples"
    assert p.peers["a"].rejected == 2


def test_late_contribution_accepted_with_staleness_weight_when_configured() -> None:
    p, clock = make(
        rounds={"late": "accept", "late_weight": 0.5, "quorum": 1, "peer_timeout_s": 1e4}
    )
    join_and_order(p, "a", "b")
    submit(p, "a", 1.0)
    clock.now += 61.0
    (closed,) = p.handle(Tick())
    assert isinstance(closed, RoundClosed)
    (late,) = submit(p, "b", 2.0, samples=10, round_=0)
    assert isinstance(late, Accepted) and late.weight == 5.0
    join_and_order(p, "a")
    decisions = submit(p, "a", 1.0, samples=10)
    (closed,) = [d for d in decisions if isinstance(d, RoundClosed)]
    assert set(closed.contributors) == {"a", "b"}
    assert closed.weights == (10.0, 5.0)


def test_max_peers_per_round_and_run_finishes() -> None:
    p, _ = make(rounds={"max_peers_per_round": 1, "quorum": 1, "total": 2})
    join_and_order(p, "a")
    p.handle(PeerJoined("b"))
    (d,) = p.handle(WorkRequested("b"))
    assert isinstance(d, Wait)
    submit(p, "a", 1.0)
    join_and_order(p, "b")
    decisions = submit(p, "b", 1.0)
    assert any(isinstance(d, RunFinished) for d in decisions)
    (d,) = p.handle(WorkRequested("a"))
    assert isinstance(d, RunFinished)
    (d,) = submit(p, "a", 1.0)
    assert isinstance(d, Rejected)


def test_nesterov_outer_step_is_applied_to_the_aggregate() -> None:
    p, _ = make(outer={"optimizer": "nesterov", "lr": 0.5, "momentum": 0.9})
    join_and_order(p, "a", "b")
    submit(p, "a", 1.0)
    submit(p, "b", 1.0)
    # m = Δ = 1; θ = 0 − 0.5·(Δ + 0.9·m) = −0.95
    assert torch.allclose(p.params["b"], torch.full((5,), -0.95))


def test_protocol_reads_only_the_injected_clock() -> None:
    p, clock = make()
    clock.now = 5.0
    join_and_order(p, "a")
    assert p.peers["a"].joined_at == 5.0


def test_default_config_builds() -> None:
    p = RoundProtocol(RunConfig(), {"w": torch.zeros(2)}, SHARDS, lambda: 0.0)
    assert p.round == 0 and p.version == 0


def test_snapshot_restore_mid_round_continues_identically() -> None:
    import json

    sources: dict[str, DictSource] = {}

    def submit_ref(p: RoundProtocol, peer: str, value: float) -> list[object]:
        ref = f"{peer}-{p.round}"
        sources[ref] = delta(value)
        event = ContributionSubmitted(
            peer,
            p.round,
            p.round,
            sources[ref],
            samples=10,
            tokens=80,
            steps=5,
            train_loss=2.0,
            ref=ref,
        )
        return list(p.handle(event))

    def run(restart: bool) -> dict[str, torch.Tensor]:
        p, clock = make(rounds={"total": 3, "late": "accept"}, outer={"optimizer": "nesterov"})
        join_and_order(p, "a", "b", "c")
        submit_ref(p, "a", 1.0)
        submit_ref(p, "b", 3.0)
        if restart:
            doc = json.loads(json.dumps(p.snapshot()))
            tensors = {k: {n: t.clone() for n, t in v.items()} for k, v in p.tensors().items()}
            p = RoundProtocol.restore(p.config, doc, tensors, SHARDS, clock, sources.__getitem__)
        clock.now += 61
        p.handle(Tick())
        submit_ref(p, "c", 2.0)  # late for round 0
        join_and_order(p, "a", "b")
        submit_ref(p, "a", -1.0)
        if restart:
            doc = json.loads(json.dumps(p.snapshot()))
            tensors = {k: {n: t.clone() for n, t in v.items()} for k, v in p.tensors().items()}
            p = RoundProtocol.restore(p.config, doc, tensors, SHARDS, clock, sources.__getitem__)
            assert p.round == 1 and p.submitted() == ("a",)
        submit_ref(p, "b", 0.5)
        assert p.version == 2
        return p.params

    straight, restarted = run(False), run(True)
    assert all(torch.equal(straight[k], restarted[k]) for k in straight)


def test_the_derived_join_window_is_the_rounds_work_shared_among_its_orders() -> None:
    # A joiner d seconds late holds the close about d seconds for one more contribution: worth
    # it while d < T / orders (T: 40 s of compute in a 60 s round).
    cfg = parse_config({"inner": {"budget": "seconds", "seconds": 40.0}})
    assert cfg.rounds.join_window is None
    assert [cfg.join_window_s(60.0, n) for n in (0, 1, 4)] == [40.0, 40.0, 10.0]
    assert parse_config({}).join_window_s(60.0, 3) == 20.0  # a steps budget: T = the deadline
    explicit = parse_config({"rounds": {"join_window": 0.5}})
    assert explicit.join_window_s(60.0, 8) == 30.0
    p, clock = make(rounds={"quorum": 2, "deadline_s": 60.0})
    join_and_order(p, "a", "b", "c")
    clock.now += 19.0  # inside 60 s / 3 orders
    join_and_order(p, "d")
    clock.now += 1.0  # 20 s in: past 60 s / 4 orders = 15 s
    p.handle(PeerJoined("e"))
    (d,) = p.handle(WorkRequested("e"))
    assert isinstance(d, Wait) and "next round" in d.reason


def test_a_late_peer_gets_what_is_left_of_a_seconds_budget() -> None:
    # Past the join window with the quorum in, a seconds budget hands a late peer that holds
    # the previous base (it contributed to the round before) the rest of the round's work
    # time, so it ends about when the others do; a peer that would first download all of θ,
    # or one that comes with less than rounds.late_order_min of the work time left, waits.
    seconds = {"budget": "seconds", "seconds": 40.0}
    p, clock = make(rounds={"quorum": 2, "deadline_s": 60.0}, inner=seconds)
    join_and_order(p, "a", "b", "c", "d", "e")
    for peer in "abcde":
        submit(p, peer, 1.0)
    assert p.round == 1
    first = {x: p.handle(WorkRequested(x))[0] for x in "abcd"}  # the window: 40 s / 4 = 10 s
    assert {o.max_seconds for o in first.values()} == {40.0}  # type: ignore[union-attr]
    clock.now += 12.0
    (late,) = p.handle(WorkRequested("e"))
    assert isinstance(late, WorkOrder) and late.round == 1
    assert late.max_seconds == pytest.approx(28.0)
    assert p.handle(WorkRequested("e")) == [late]  # the order it holds, unchanged
    p.handle(PeerJoined("f", "f"))  # new: it would download all of θ first
    (wait,) = p.handle(WorkRequested("f"))
    assert isinstance(wait, Wait) and wait.peer_id == "f" and "next round" in wait.reason
    assert "f" not in p.assigned()
    q, clock2 = make(rounds={"quorum": 2, "deadline_s": 60.0}, inner=seconds)
    join_and_order(q, "a", "b", "c", "d", "e")
    for peer in "abcde":
        submit(q, peer, 1.0)
    for peer in "abcd":
        q.handle(WorkRequested(peer))
    clock2.now += 32.0  # 8 s left, under a quarter of 40 s
    (wait,) = q.handle(WorkRequested("e"))
    assert isinstance(wait, Wait) and "next round" in wait.reason


def test_a_driver_can_move_the_open_rounds_opening_on_by_its_close() -> None:
    p, clock = make(rounds={"deadline_s": 60.0})
    opened = p.deadline - 60.0
    p.delay_open(48.0)
    assert p.deadline == pytest.approx(opened + 108.0)
    clock.now += 50.0  # 2 s after the delayed opening: inside every join window
    assert isinstance(join_and_order(p, "a", "b", "c")["c"], WorkOrder)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite non-negative"):
            p.delay_open(bad)


def test_late_joiner_waits_for_next_round_unless_quorum_is_short() -> None:
    p, clock = make(rounds={"quorum": 1, "join_window": 0.5})
    join_and_order(p, "a")
    clock.now += 31.0  # past half the 60 s deadline
    p.handle(PeerJoined("b"))
    (d,) = p.handle(WorkRequested("b"))
    assert isinstance(d, Wait) and "next round" in d.reason
    submit(p, "a", 1.0)  # closes round 0 early: every assigned peer is in
    (order,) = p.handle(WorkRequested("b"))
    assert isinstance(order, WorkOrder) and order.round == 1
    q, clock2 = make(rounds={"quorum": 2})
    join_and_order(q, "a")
    clock2.now += 59.0
    join_and_order(q, "b")  # the round still needs peers for its quorum, so b gets work
    clock2.now += 2.0
    # Past the deadline the round closes as soon as its quorum is in: with orders out for the
    # whole quorum, a newcomer's work would be refused, so it waits for the next round ...
    q.handle(PeerJoined("c", "c"))
    (wait,) = q.handle(WorkRequested("c"))
    assert isinstance(wait, Wait) and "past its deadline" in wait.reason
    # ... unless an order lapsed (its peer went silent): then the quorum needs it.
    clock2.now += q.config.rounds.peer_timeout_s + 1.0
    q.handle(PeerSeen("a"))
    q.handle(Tick())
    assert set(q.assigned()) == {"a"}
    (order,) = q.handle(WorkRequested("c"))
    assert isinstance(order, WorkOrder) and order.round == 0


def test_silent_peer_times_out_and_heartbeats_keep_it() -> None:

    p, clock = make(rounds={"peer_timeout_s": 10.0, "deadline_s": 1000.0})
    join_and_order(p, "a", "b", "c")
    submit(p, "a", 1.0)
    for _ in range(3):
        clock.now += 6.0
        assert p.handle(PeerSeen("b")) == []
        p.handle(Tick())
    assert p.peers["b"].online and not p.peers["c"].online
    assert set(p.assigned()) == {"a", "b"}  # c's order lapsed; a already contributed
    decisions = submit(p, "b", 1.0)
    assert any(isinstance(d, RoundClosed) for d in decisions)
    (d,) = p.handle(PeerSeen("ghost"))
    assert isinstance(d, Unknown)
