"""Overlapped contributions: the overlap claim is derived and checked at submission (it must
continue the same peer's accepted contribution of the round before, from the batch after that
one's own steps), and such a contribution is checked with a `prior` naming that submission's
payload, its work order, the first batch and the overlapped step count. A claim of another
round or batch is refused with a strike; overlap without a known prior is refused without one.
Snapshots keep all of it."""

from __future__ import annotations

import json
import math

import torch

from crowdtrain.config import parse_config
from crowdtrain.protocol import (
    ContributionSubmitted,
    Decision,
    PeerJoined,
    Rejected,
    RoundClosed,
    RoundProtocol,
    Tick,
    VerifyOrder,
    WorkOrder,
    WorkRequested,
)
from crowdtrain.protocol.core import replayable
from crowdtrain.protocol.events import PriorWork
from crowdtrain.protocol.snapshot import submission_to_json
from crowdtrain.robust import DictSource

SHARDS = [f"{i:064x}" for i in range(10)]
BATCH, CONTEXT, STEPS = 2, 8, 5
SHAPES: dict[str, tuple[int, ...]] = {"w": (8, 8), "b": (8,)}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(spot_check: str = "coordinator") -> tuple[RoundProtocol, FakeClock]:
    """Every contribution drawn for a check; peers trusted after one round."""
    cfg = parse_config(
        {
            "model": {"context": CONTEXT},
            "data": {"batch_size": BATCH, "shards_per_peer": 2},
            "inner": {"steps": STEPS},
            "rounds": {"total": 10, "quorum": 1, "deadline_s": 60.0, "peer_timeout_s": 1e6},
            "outer": {"optimizer": "nesterov", "lr": 1.0, "momentum": 0.0},
            "aggregation": {"method": "mean", "bucket_size": 1},
            "defence": {
                "spot_check": spot_check,
                "check_p_new": 1.0,
                "reputation_initial": 0.5,
                "trust_threshold": 0.5,
                "probation_rounds": 1,
            },
        }
    )
    clock = FakeClock()
    params = {k: torch.zeros(shape) for k, shape in SHAPES.items()}
    return RoundProtocol(cfg, params, SHARDS, clock), clock


def rand(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = {k: torch.randn(shape, generator=g) for k, shape in SHAPES.items()}
    total = math.sqrt(sum(float(t.square().sum()) for t in d.values()))
    return {k: t / total for k, t in d.items()}


def orders(p: RoundProtocol, *peers: str) -> dict[str, WorkOrder]:
    out = {}
    for peer in peers:
        (o,) = p.handle(WorkRequested(peer))
        assert isinstance(o, WorkOrder), o
        out[peer] = o
    return out


def submit(
    p: RoundProtocol,
    peer: str,
    seed: int,
    *,
    overlap: tuple[int, int, int] = (0, -1, 0),
    sources: dict[str, DictSource] | None = None,
) -> list[Decision]:
    """Submit a random Δ with ref "peer/round"; `overlap` is (steps, round, first_batch)."""
    ref = f"{peer}/{p.round}"
    source = DictSource(rand(seed))
    if sources is not None:
        sources[ref] = source
    steps, rnd, first = overlap
    event = ContributionSubmitted(
        peer_id=peer,
        round=p.round,
        base_version=p.version,
        delta=source,
        samples=STEPS * BATCH,
        tokens=STEPS * BATCH * CONTEXT,
        steps=STEPS,
        train_loss=2.0,
        ref=ref,
        overlap_steps=steps,
        overlap_round=rnd,
        overlap_first_batch=first,
    )
    return p.handle(event)


def checks_of(decisions: list[Decision]) -> dict[str, VerifyOrder]:
    assert any(isinstance(d, RoundClosed) for d in decisions)
    return {d.target: d for d in decisions if isinstance(d, VerifyOrder)}


def round0(p: RoundProtocol, *peers: str) -> dict[str, WorkOrder]:
    for peer in peers:
        p.handle(PeerJoined(peer, peer))
    work = orders(p, *peers)
    for i, peer in enumerate(peers):
        submit(p, peer, i + 1)
    assert p.round == 1
    return work


def codes(decisions: list[Decision]) -> list[str]:
    return [d.code for d in decisions if isinstance(d, Rejected)]


def test_overlap_claims_are_derived_and_an_overlapped_contribution_is_checked_with_its_prior() -> (
    None
):
    p, clock = make()
    work0 = round0(p, "a", "b", "c")
    p.handle(PeerJoined("d", "d"))
    work1 = orders(p, "a", "b", "c", "d")
    assert codes(submit(p, "a", 11, overlap=(2, 0, STEPS))) == []
    assert codes(submit(p, "b", 12, overlap=(2, -1, 0))) == ["bad_claim"]  # not round 0
    assert codes(submit(p, "b", 12, overlap=(2, 0, 3))) == ["bad_claim"]  # not batch STEPS
    assert codes(submit(p, "c", 13, overlap=(9, 0, STEPS))) == ["bad_claim"]  # > its steps
    assert codes(submit(p, "d", 14, overlap=(1, 0, 4))) == ["unreplayable"]  # no round-0 work
    assert p.peers["d"].standing.strikes == 0 and p.peers["b"].standing.strikes == 2.0
    assert codes(submit(p, "b", 12)) == codes(submit(p, "c", 13)) == []  # honest claims pass
    clock.now += 61.0  # d never sends anything acceptable: the deadline closes the round
    checks = checks_of(p.handle(Tick()))
    assert set(checks) == {"a", "b", "c"}
    a = checks["a"]
    assert (a.round, a.base_version, a.step_offset, a.steps) == (1, 1, work1["a"].step_offset, 5)
    assert a.shard_ids == work1["a"].shard_ids
    o = work0["a"]
    assert a.prior == PriorWork(
        round=0,
        base_version=0,
        shard_ids=o.shard_ids,
        seed=o.seed,
        step_offset=o.step_offset,
        first_batch=STEPS,
        steps=2,
        payload_ref="a/0",
    )
    assert checks["b"].prior is None and checks["c"].prior is None


def test_the_first_batch_follows_the_fresh_steps_of_the_contribution_it_continues() -> None:
    p, _ = make()
    round0(p, "a")
    orders(p, "a")
    submit(p, "a", 11, overlap=(2, 0, STEPS))  # round 1: 2 overlapped, 3 fresh steps
    orders(p, "a")
    assert p.round == 2
    assert codes(submit(p, "a", 12, overlap=(2, 0, 0))) == ["bad_claim"]  # round 0 is not last
    assert codes(submit(p, "a", 12, overlap=(2, 1, STEPS))) == ["bad_claim"]  # it trained 3
    (check,) = checks_of(submit(p, "a", 12, overlap=(2, 1, STEPS - 2))).values()
    assert check.prior is not None and (check.prior.round, check.prior.payload_ref) == (1, "a/1")
    assert (check.prior.base_version, check.prior.first_batch) == (1, STEPS - 2)


def test_a_contribution_without_overlap_has_no_prior() -> None:
    p, _ = make()
    round0(p, "a")
    orders(p, "a")
    (check,) = checks_of(submit(p, "a", 11)).values()
    assert check.prior is None and check.round == 1


def test_snapshot_and_restore_keep_overlap_claims_and_priors() -> None:
    p, clock = make()
    sources: dict[str, DictSource] = {}

    def restored(proto: RoundProtocol) -> RoundProtocol:
        doc = json.loads(json.dumps(proto.snapshot()))
        tensors = {k: dict(v) for k, v in proto.tensors().items()}
        return RoundProtocol.restore(p.config, doc, tensors, SHARDS, clock, sources.__getitem__)

    for peer in ("a", "b"):
        p.handle(PeerJoined(peer, peer))
    orders(p, "a", "b")
    submit(p, "a", 1, sources=sources)
    submit(p, "b", 2, sources=sources)
    orders(p, "a", "b")
    submit(p, "a", 11, overlap=(2, 0, STEPS), sources=sources)
    q = restored(p)  # the overlapped submission is in the open round
    assert submission_to_json(q._round.submissions["a"]) == submission_to_json(
        p._round.submissions["a"]
    )
    first, again = submit(p, "b", 12, sources=sources), submit(q, "b", 12, sources=sources)
    assert again == first
    check = checks_of(again)["a"]
    assert check.prior is not None and check.prior.payload_ref == "a/0"
    r = restored(q)  # the check is pending
    assert r.checks[check.check_id].order == check


def test_only_fresh_optimizer_state_without_a_private_residual_is_replayable() -> None:
    assert replayable(parse_config({}))
    assert not replayable(parse_config({"inner": {"keep_optimizer_state": True}}))
    assert not replayable(parse_config({"codec": {"name": "topk2bit"}}))
    assert not replayable(parse_config({"outer": {"optimizer": "error_feedback"}}))
