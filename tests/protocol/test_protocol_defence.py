"""The verification pipeline inside the round protocol, driven event by event.

Claims at submission, norm and copy screening at a round's close, recomputation spot-checks
(peer and coordinator mode), probation, strikes and bans, and their snapshot: each asserted on
the decisions, `verdicts`, `peers[x].standing` and what enters the aggregate. Tiny tensors and a
fake clock; usefulness scoring (a probe and a tiny GPT) appears only where named.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from crowdtrain.config import RunConfig, parse_config
from crowdtrain.data import BatchSampler
from crowdtrain.data.probe import ShardProbe
from crowdtrain.models import build_model, initial_state
from crowdtrain.protocol import (
    Accepted,
    Banned,
    CheckDone,
    ContributionMalformed,
    ContributionSubmitted,
    Decision,
    Flagged,
    PeerBanned,
    PeerJoined,
    Rejected,
    RoundClosed,
    RoundProtocol,
    Tick,
    Unknown,
    Verdict,
    VerificationSubmitted,
    VerifyOrder,
    Wait,
    WorkOrder,
    WorkRequested,
)
from crowdtrain.protocol.core import CHECK_LIFETIME_ROUNDS, MOMENTS_PEER
from crowdtrain.robust import DictSource
from crowdtrain.robust.reputation import is_trusted
from crowdtrain.train.moments import WORKERS, split_base, validate

SHARDS = [f"{i:064x}" for i in range(10)]
BATCH, CONTEXT, STEPS = 2, 8, 5
SAMPLES = STEPS * BATCH
SHAPES: dict[str, tuple[int, ...]] = {"w": (8, 8), "b": (8,)}
Delta = dict[str, torch.Tensor]

# A peer becomes trusted (may verify others) after one accepted round.
TRUST_FAST: dict[str, object] = {
    "reputation_initial": 0.5,
    "trust_threshold": 0.5,
    "probation_rounds": 1,
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def config(
    defence: Mapping[str, object] | None = None,
    rounds: Mapping[str, object] | None = None,
    **sections: Mapping[str, object],
) -> RunConfig:
    """θ ← θ − mean(Δ) (Nesterov, lr 1, no momentum, θ broadcast exactly), defended,
    spot-checks off and no coordinator confirmation of failed checks by default."""
    raw: dict[str, dict[str, object]] = {
        "model": {"context": CONTEXT},
        "data": {"batch_size": BATCH, "shards_per_peer": 2},
        "inner": {"steps": STEPS},
        "rounds": {"total": 10, "quorum": 1, "deadline_s": 60.0, "peer_timeout_s": 1e6},
        "outer": {"optimizer": "nesterov", "lr": 1.0, "momentum": 0.0},
        "broadcast": {"codec": "fp32"},
        "aggregation": {"method": "mean", "bucket_size": 1},
        # the verifiers' agreement decides (the coordinator's confirmation has its own tests)
        "defence": {"spot_check": "off", "check_confirm": "off"},
    }
    raw["defence"].update(defence or {})
    raw["rounds"].update(rounds or {})
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return parse_config(raw)


def make(
    defence: Mapping[str, object] | None = None,
    rounds: Mapping[str, object] | None = None,
    **sections: Mapping[str, object],
) -> tuple[RoundProtocol, FakeClock]:
    clock = FakeClock()
    params = {k: torch.zeros(shape) for k, shape in SHAPES.items()}
    return RoundProtocol(config(defence, rounds, **sections), params, SHARDS, clock), clock


def rand(seed: int, norm: float = 1.0) -> Delta:
    """A random direction (distinct seeds: nearly orthogonal in 72 dimensions) of this norm."""
    g = torch.Generator().manual_seed(seed)
    d = {k: torch.randn(shape, generator=g) for k, shape in SHAPES.items()}
    total = math.sqrt(sum(float(t.square().sum()) for t in d.values()))
    return {k: t * (norm / total) for k, t in d.items()}


def scaled(d: Mapping[str, torch.Tensor], factor: float) -> Delta:
    return {k: t * factor for k, t in d.items()}


def submit(
    p: RoundProtocol,
    peer: str,
    d: Mapping[str, torch.Tensor],
    *,
    samples: int = SAMPLES,
    steps: int = STEPS,
    tokens: int | None = None,
    ref: str = "",
    overlap_steps: int = 0,
    overlap_round: int = -1,
    overlap_first_batch: int = 0,
) -> list[Decision]:
    event = ContributionSubmitted(
        peer_id=peer,
        round=p.round,
        base_version=p.version,
        delta=DictSource(d),
        samples=samples,
        tokens=samples * CONTEXT if tokens is None else tokens,
        steps=steps,
        train_loss=2.0,
        ref=ref,
        overlap_steps=overlap_steps,
        overlap_round=overlap_round,
        overlap_first_batch=overlap_first_batch,
    )
    return p.handle(event)


def join(p: RoundProtocol, *peers: str) -> None:
    for peer in peers:
        assert p.handle(PeerJoined(peer, peer)) == []


def order(p: RoundProtocol, *peers: str) -> dict[str, WorkOrder]:
    orders = {}
    for peer in peers:
        (o,) = p.handle(WorkRequested(peer))
        assert isinstance(o, WorkOrder), o
        orders[peer] = o
    return orders


def play(p: RoundProtocol, deltas: Mapping[str, Mapping[str, torch.Tensor]]) -> list[Decision]:
    """Every peer gets its order, then all submit in the given order; the round closes."""
    order(p, *deltas)
    out: list[Decision] = []
    for peer, d in deltas.items():
        out.extend(submit(p, peer, d))
    assert any(isinstance(x, RoundClosed) for x in out)
    return out


def ask_idle(p: RoundProtocol, peer: str) -> Decision:
    """What PEER gets when it asks for work with none of its own to do (its contribution to
    the open round is in, or it came too late for it): a check for it, or a Wait. The round
    core routes only such a peer to `Verification.check_for`; the routing has its own test
    (test_a_trusted_peer_gets_a_verify_order_for_another_peers_work)."""
    check = p.verification.check_for(p.peers[peer], p.clock())
    return check if check is not None else Wait(peer, 0.25, "no check for it")


def only(decisions: Sequence[Decision], kind: type[Any]) -> list[Any]:
    return [d for d in decisions if isinstance(d, kind)]


def closed_of(decisions: Sequence[Decision]) -> RoundClosed:
    (closed,) = only(decisions, RoundClosed)
    assert isinstance(closed, RoundClosed)
    return closed


def verdicts(p: RoundProtocol) -> list[tuple[str, int, str, str]]:
    return [(v.peer_id, v.round, v.stage, v.outcome) for v in p.verdicts]


def mean_of(deltas: Sequence[Mapping[str, torch.Tensor]]) -> Delta:
    return {k: torch.stack([d[k] for d in deltas]).mean(0) for k in SHAPES}


# --- claims stage (at submission) ------------------------------------------------------------


def test_claimed_samples_must_equal_steps_times_batch_size() -> None:
    p, _ = make()
    join(p, "a", "b")
    order(p, "a", "b")
    (d,) = submit(p, "a", rand(1), samples=SAMPLES + 1)
    assert isinstance(d, Rejected) and d.code == "bad_claim"
    assert "samples" in d.reason
    assert verdicts(p) == [("a", 0, "claims", "rejected")]
    st = p.peers["a"].standing
    assert (st.strikes, st.failures, st.banned) == (1.0, 1, False)
    assert p.peers["a"].samples == 0 and p.submitted() == ()


def test_steps_beyond_the_work_orders_budget_are_rejected() -> None:
    p, _ = make()
    join(p, "a")
    (o,) = order(p, "a").values()
    assert (o.budget, o.max_steps) == ("steps", STEPS)
    (d,) = submit(p, "a", rand(1), steps=STEPS + 1, samples=(STEPS + 1) * BATCH)
    assert isinstance(d, Rejected) and d.code == "bad_claim" and "budget" in d.reason
    assert verdicts(p) == [("a", 0, "claims", "rejected")]


def test_an_honest_claim_is_accepted_even_after_a_refused_one() -> None:
    p, _ = make()
    join(p, "a", "b")
    order(p, "a", "b")
    (bad,) = submit(p, "a", rand(1), tokens=SAMPLES * CONTEXT + 1)
    assert isinstance(bad, Rejected) and bad.code == "bad_claim" and "tokens" in bad.reason
    (ok,) = submit(p, "a", rand(1))
    assert isinstance(ok, Accepted) and p.submitted() == ("a",)
    closed = closed_of(submit(p, "b", rand(2)))
    assert closed.contributors == ("a", "b") and closed.samples == 2 * SAMPLES


def test_claims_are_not_checked_when_the_defence_is_off() -> None:
    p, _ = make(defence={"enabled": False})
    join(p, "a")
    order(p, "a")
    decisions = submit(p, "a", rand(1), samples=SAMPLES * 100)
    assert isinstance(decisions[0], Accepted) and decisions[0].weight == SAMPLES * 100
    assert p.verdicts == []


# --- format stage (the driver reports a malformed payload) -----------------------------------


def test_malformed_payload_is_rejected_with_a_strike() -> None:
    p, _ = make()
    join(p, "a")
    order(p, "a")
    (d,) = p.handle(ContributionMalformed("a", 0, "the payload's digest does not match"))
    assert isinstance(d, Rejected) and d.code == "bad_payload"
    assert d.reason == "the payload's digest does not match"
    assert verdicts(p) == [("a", 0, "format", "rejected")]
    st = p.peers["a"].standing
    assert (st.strikes, st.failures) == (1.0, 1)
    assert st.score == pytest.approx(0.3 * 0.5)  # reputation_initial × reputation_slash
    assert p.peers["a"].rejected == 1
    (d,) = p.handle(ContributionMalformed("ghost", 0, "x"))
    assert isinstance(d, Unknown)


def test_malformed_payload_without_defence_is_rejected_without_strikes() -> None:
    p, _ = make(defence={"enabled": False})
    join(p, "a")
    order(p, "a")
    for _ in range(5):
        (d,) = p.handle(ContributionMalformed("a", 0, "bad bytes"))
        assert isinstance(d, Rejected) and d.code == "bad_payload"
    st = p.peers["a"].standing
    assert (st.strikes, st.failures, st.banned) == (0.0, 0, False)
    assert p.verdicts == [] and p.peers["a"].rejected == 5
    assert isinstance(submit(p, "a", rand(1))[0], Accepted)


# --- norm screening (at close) ----------------------------------------------------------------


def test_a_contribution_scaled_1000x_is_flagged_and_left_out_of_the_aggregate() -> None:
    p, _ = make()
    peers = ["a", "b", "c", "d", "e"]
    join(p, *peers)
    honest = {peer: rand(i, norm=1.0 + 0.1 * i) for i, peer in enumerate(peers[:4])}
    decisions = play(p, {**honest, "e": scaled(rand(9), 1000.0)})
    (flag,) = only(decisions, Flagged)
    assert (flag.peer_id, flag.round, flag.stage) == ("e", 0, "norm")
    assert "median" in flag.reason
    closed = closed_of(decisions)
    assert closed.contributors == ("a", "b", "c", "d")
    assert closed.samples == 4 * SAMPLES
    assert decisions.index(flag) < decisions.index(closed)
    assert verdicts(p) == [("e", 0, "norm", "flagged")]
    # θ = 0 − mean of the four honest Δ (equal weights): the ×1000 one had no effect
    expected = mean_of(list(honest.values()))
    assert all(torch.allclose(p.params[k], -expected[k], atol=1e-6) for k in SHAPES)
    e = p.peers["e"]
    assert (e.standing.strikes, e.standing.failures, e.standing.rounds_ok) == (1.0, 1, 0)
    assert e.samples == 0  # the flagged contribution earns no credit
    assert (e.accepted, e.rejected, e.flagged) == (1, 0, 1)
    for peer in peers[:4]:
        st = p.peers[peer].standing
        assert st.rounds_ok == 1 and st.strikes == 0.0
        assert st.score == pytest.approx(0.3 + 0.2 * 0.7)
        assert p.peers[peer].samples == SAMPLES


def test_a_zero_contribution_is_flagged_as_a_free_ride() -> None:
    p, _ = make()
    join(p, "a", "b", "c")
    zero = {k: torch.zeros(shape) for k, shape in SHAPES.items()}
    decisions = play(p, {"a": rand(1), "b": zero, "c": rand(3)})
    (flag,) = only(decisions, Flagged)
    assert (flag.peer_id, flag.stage) == ("b", "norm") and "zero" in flag.reason
    assert closed_of(decisions).contributors == ("a", "c")
    assert p.peers["b"].standing.rounds_ok == 0 and p.peers["a"].standing.rounds_ok == 1


def test_a_round_where_everything_is_flagged_still_closes_and_keeps_theta() -> None:
    p, _ = make(defence={"probation_rounds": 0})
    join(p, "a", "b")
    play(p, {"a": rand(1), "b": rand(2)})  # round 0: θ moves
    theta = {k: t.clone() for k, t in p.params.items()}
    zero = {k: torch.zeros(shape) for k, shape in SHAPES.items()}
    decisions = play(p, {"a": zero, "b": zero})
    assert {(f.peer_id, f.stage) for f in only(decisions, Flagged)} == {
        ("a", "norm"),
        ("b", "norm"),
    }
    closed = closed_of(decisions)
    assert closed.round == 1 and closed.new_version == 2
    assert closed.contributors == () and closed.weights == () and closed.samples == 0
    assert math.isnan(closed.train_loss)
    assert all(torch.equal(p.params[k], theta[k]) for k in SHAPES)
    assert p.round == 2 and p.version == 2
    # the next round works as usual
    closed = closed_of(play(p, {"a": rand(3), "b": rand(4)}))
    assert closed.contributors == ("a", "b") and closed.new_version == 3


# --- copy detection (at close) ---------------------------------------------------------------


@pytest.mark.parametrize("factor", [1.0, 2.5])
def test_a_copy_submitted_later_in_the_round_is_flagged_not_the_original(factor: float) -> None:
    p, _ = make()
    join(p, "a", "b", "c", "d")
    original = rand(2)
    decisions = play(p, {"a": rand(1), "b": original, "c": rand(3), "d": scaled(original, factor)})
    (flag,) = only(decisions, Flagged)
    assert (flag.peer_id, flag.stage) == ("d", "copy")
    assert "#1" in flag.reason  # b, the second contribution of the round
    assert closed_of(decisions).contributors == ("a", "b", "c")
    assert verdicts(p) == [("d", 0, "copy", "flagged")]
    assert set(p.fingerprints) == {"0/a", "0/b", "0/c"}  # a copy leaves no fingerprint


def test_replaying_a_previous_rounds_contribution_is_flagged() -> None:
    p, _ = make()
    join(p, "a", "b", "c", "d")
    first = {"a": rand(1), "b": rand(2), "c": rand(3), "d": rand(4)}
    play(p, first)
    decisions = play(p, {"a": rand(11), "b": rand(12), "c": rand(13), "d": first["a"]})
    (flag,) = only(decisions, Flagged)
    assert (flag.peer_id, flag.round, flag.stage) == ("d", 1, "copy")
    assert "earlier round" in flag.reason
    assert closed_of(decisions).contributors == ("a", "b", "c")
    # the peer's own old update is a replay too
    decisions = play(p, {"a": first["a"], "b": rand(22), "c": rand(23), "d": rand(24)})
    (flag,) = only(decisions, Flagged)
    assert (flag.peer_id, flag.round, flag.stage) == ("a", 2, "copy")


def test_fingerprint_history_older_than_copy_history_rounds_is_forgotten() -> None:
    p, _ = make(defence={"copy_history_rounds": 1})
    join(p, "a", "b", "c", "d")
    first = {"a": rand(1), "b": rand(2), "c": rand(3), "d": rand(4)}
    play(p, first)
    assert set(p.fingerprints) == {"0/a", "0/b", "0/c", "0/d"}
    decisions = play(p, {"a": rand(11), "b": rand(12), "c": rand(13), "d": first["a"]})
    assert [(f.peer_id, f.stage) for f in only(decisions, Flagged)] == [("d", "copy")]
    assert set(p.fingerprints) == {"1/a", "1/b", "1/c"}  # round 0 is forgotten
    decisions = play(p, {"a": rand(21), "b": rand(22), "c": rand(23), "d": first["b"]})
    assert only(decisions, Flagged) == []
    assert closed_of(decisions).contributors == ("a", "b", "c", "d")


# --- strikes and bans ------------------------------------------------------------------------


def test_ban_strikes_failures_ban_the_peer_and_evict_its_order() -> None:
    p, _ = make()
    join(p, "a", "b")
    order(p, "a", "b")
    for _ in range(2):
        (d,) = submit(p, "a", rand(1), samples=1)
        assert isinstance(d, Rejected)
    rejected, banned = submit(p, "a", rand(1), samples=1)
    assert isinstance(rejected, Rejected) and rejected.code == "bad_claim"
    assert isinstance(banned, Banned) and banned.peer_id == "a"
    assert "3 failures" in banned.reason
    assert verdicts(p)[-1] == ("a", 0, "reputation", "banned")
    st = p.peers["a"].standing
    assert st.banned and st.ban_reason == banned.reason and st.strikes == 3.0
    assert "a" not in p.assigned()
    (d,) = p.handle(WorkRequested("a"))
    assert isinstance(d, Banned) and d.reason == banned.reason
    (d,) = submit(p, "a", rand(1))
    assert isinstance(d, Banned)
    (d,) = p.handle(ContributionMalformed("a", 0, "x"))
    assert isinstance(d, Banned)
    closed = closed_of(submit(p, "b", rand(2)))
    assert closed.contributors == ("b",)


def test_a_ban_evicts_an_accepted_contribution_of_the_open_round() -> None:
    p, _ = make(rounds={"quorum": 2})
    join(p, "a", "b", "c")
    order(p, "a", "b", "c")
    assert isinstance(submit(p, "a", rand(1))[0], Accepted)
    assert isinstance(submit(p, "b", rand(2))[0], Accepted)
    for i in range(3):
        decisions = p.handle(ContributionMalformed("a", 0, f"bad upload {i}"))
    assert isinstance(decisions[-1], Banned)
    assert p.submitted() == ("b",) and set(p.assigned()) == {"b", "c"}
    closed = closed_of(submit(p, "c", rand(3)))
    assert closed.contributors == ("b", "c")


def test_a_ban_at_submission_closes_a_round_that_waits_on_nobody_else() -> None:
    p, _ = make()
    join(p, "a", "b")
    order(p, "a", "b")
    assert isinstance(submit(p, "b", rand(2))[0], Accepted)  # a is the only one awaited
    for _ in range(2):
        submit(p, "a", rand(1), samples=1)
    decisions = submit(p, "a", rand(1), samples=1)
    assert isinstance(decisions[1], Banned)
    assert only(decisions, RoundClosed), "the round waits on nobody, so it closes now"
    assert closed_of(decisions).contributors == ("b",)


@pytest.mark.parametrize(("forgive", "banned"), [(0.0, True), (0.5, False)])
def test_strike_forgive_lets_an_occasional_failure_fade(forgive: float, banned: bool) -> None:
    p, _ = make(defence={"ban_strikes": 2.0, "strike_forgive": forgive})
    join(p, "a", "b")
    for r in range(3):
        order(p, "a", "b")
        if r != 1:  # a fails in rounds 0 and 2, and contributes well in every round
            p.handle(ContributionMalformed("a", r, "bad upload"))
        submit(p, "a", rand(10 * r + 1))
        if p.peers["a"].standing.banned:
            break
        closed = closed_of(submit(p, "b", rand(10 * r + 2)))
        assert "a" in closed.contributors
    st = p.peers["a"].standing
    assert st.banned is banned and st.failures == 2
    if not banned:
        assert st.strikes == 0.5  # 1, then 0.5, 0 after two good rounds; 1, then 0.5


# --- probation --------------------------------------------------------------------------------


def test_a_newcomer_weighs_probation_weight_until_probation_rounds_accepted_rounds() -> None:
    p, _ = make(defence={"probation_rounds": 2, "probation_weight": 0.25})
    join(p, "a", "b")
    weights = []
    for r in range(4):
        order(p, "a", "b")
        (acc,) = submit(p, "a", rand(10 * r + 1))
        assert isinstance(acc, Accepted)
        weights.append(acc.weight)
        if r == 2:
            join(p, "c")  # a newcomer in a later round is on probation again
            order(p, "c")
            (c_acc,) = submit(p, "c", rand(99))
            assert isinstance(c_acc, Accepted) and c_acc.weight == SAMPLES * 0.25
        closed = closed_of(submit(p, "b", rand(10 * r + 2)))
        assert closed.weights[0] == weights[-1]
    assert weights == [SAMPLES * 0.25, SAMPLES * 0.25, SAMPLES, SAMPLES]
    assert p.peers["a"].standing.rounds_ok == 4


def test_a_flagged_round_does_not_count_towards_probation() -> None:
    p, _ = make(defence={"probation_rounds": 1, "probation_weight": 0.5})
    join(p, "a", "b", "c")
    zero = {k: torch.zeros(shape) for k, shape in SHAPES.items()}
    play(p, {"a": zero, "b": rand(2), "c": rand(3)})
    order(p, "a", "b", "c")
    (acc,) = submit(p, "a", rand(11))
    assert isinstance(acc, Accepted) and acc.weight == SAMPLES * 0.5
    (acc,) = submit(p, "b", rand(12))
    assert isinstance(acc, Accepted) and acc.weight == SAMPLES


# --- spot-checks, peer mode ------------------------------------------------------------------


class Trusted:
    """Round 0 closed with every contribution spot-checked; its peers are now trusted."""

    def __init__(self, peers: Sequence[str] = ("a", "b", "c"), **defence: object) -> None:
        self.p, self.clock = make(
            defence={
                "spot_check": "peer",
                "check_p_new": 1.0,
                "check_fail_quorum": 1,  # one verifier decides; two: the tests further down
                **TRUST_FAST,
                **defence,
            }
        )
        join(self.p, *peers)
        self.deltas = {peer: rand(i + 1) for i, peer in enumerate(peers)}
        self.orders = order(self.p, *peers)
        decisions = play(self.p, self.deltas)
        assert only(decisions, VerifyOrder) == []  # peer mode: nothing for the coordinator
        assert {c.order.target for c in self.p.checks.values()} == set(peers)
        assert all(is_trusted(self.p.peers[x].standing, self.p.config.defence) for x in peers)


def test_a_trusted_peer_gets_a_verify_order_for_another_peers_work() -> None:
    t = Trusted(("a", "b"))
    p = t.p
    first = p.history[-1]
    assert first.contributors == ("a", "b")
    # Its own work comes first: a trusted peer with checks pending gets its order ...
    mine = order(p, "a", "b")
    assert {o.round for o in mine.values()} == {1}
    assert p.handle(WorkRequested("a")) == [mine["a"]]
    # ... and the check once its contribution is in, while it waits for the round to close
    submit(p, "a", rand(3))
    v = ask_idle(p, "a")
    assert isinstance(v, VerifyOrder)
    assert (v.peer_id, v.target, v.round, v.base_version, v.steps) == ("a", "b", 0, 0, STEPS)
    b_order = t.orders["b"]  # the work it replays
    assert (v.shard_ids, v.seed, v.step_offset) == (
        b_order.shard_ids,
        b_order.seed,
        b_order.step_offset,
    )
    assert p.handle(WorkRequested("a")) == [v]  # asking again gives the same check
    assert p.handle(WorkRequested("b")) == [mine["b"]]  # b still owes the round its work
    (done,) = p.handle(VerificationSubmitted(v.check_id, "a", DictSource(rand(2)), STEPS))
    assert isinstance(done, CheckDone) and done.passed
    # a's own contribution is still pending, but a never gets its own check
    (w,) = p.handle(WorkRequested("a"))
    assert isinstance(w, Wait) and "is in" in w.reason
    w = ask_idle(p, "b")
    assert isinstance(w, VerifyOrder) and (w.peer_id, w.target) == ("b", "a")


def test_untrusted_peers_never_get_a_verify_order() -> None:
    t = Trusted(("a", "b"))
    p = t.p
    join(p, "newcomer")
    (o,) = p.handle(WorkRequested("newcomer"))
    assert isinstance(o, WorkOrder)
    assert isinstance(ask_idle(p, "a"), VerifyOrder)  # a trusted peer does
    # with the default reputation a peer is not trusted after one round either
    q, _ = make(defence={"spot_check": "peer", "check_p_new": 1.0})
    join(q, "a", "b")
    play(q, {"a": rand(1), "b": rand(2)})
    assert len(q.checks) == 2
    for peer in ("a", "b"):
        (o,) = q.handle(WorkRequested(peer))
        assert isinstance(o, WorkOrder)


def test_a_matching_replay_passes_the_check() -> None:
    t = Trusted(("a", "b"))
    p, deltas = t.p, t.deltas
    v = ask_idle(p, "a")
    assert isinstance(v, VerifyOrder) and v.target == "b"
    replay = scaled(deltas["b"], 1.01)  # within the 5% tolerance
    (done,) = p.handle(VerificationSubmitted(v.check_id, "a", DictSource(replay), STEPS))
    assert isinstance(done, CheckDone)
    assert (done.check_id, done.target, done.round, done.verifier) == (v.check_id, "b", 0, "a")
    assert done.passed
    assert p.peers["b"].standing.passed_checks == 1
    assert p.peers["b"].standing.strikes == 0.0 and p.peers["b"].samples == SAMPLES
    assert p.peers["a"].standing.verified == 1
    assert verdicts(p) == [("b", 0, "spot_check", "check_passed")]
    assert v.check_id not in p.checks
    (again,) = p.handle(VerificationSubmitted(v.check_id, "a", DictSource(replay), STEPS))
    assert isinstance(again, Unknown)


@pytest.mark.parametrize(("check_strikes", "banned"), [(3.0, True), (1.0, False)])
def test_a_mismatching_replay_fails_voids_the_credit_and_can_ban(
    check_strikes: float, banned: bool
) -> None:
    t = Trusted(("a", "b", "c"), check_strikes=check_strikes)
    p, deltas = t.p, t.deltas
    v = ask_idle(p, "a")
    assert isinstance(v, VerifyOrder)
    target = v.target
    assert p.peers[target].samples == SAMPLES
    flipped = scaled(deltas[target], -1.0)
    decisions = p.handle(VerificationSubmitted(v.check_id, "a", DictSource(flipped), STEPS))
    done, flag, *rest = decisions
    assert isinstance(done, CheckDone) and not done.passed and done.target == target
    assert isinstance(flag, Flagged)
    assert (flag.peer_id, flag.round, flag.stage) == (target, 0, "spot_check")
    assert p.peers[target].samples == 0  # the contribution's credit is void
    assert p.peers[target].flagged == 1
    st = p.peers[target].standing
    assert (st.failed_checks, st.passed_checks, st.strikes) == (1, 0, check_strikes)
    expected = [(target, 0, "spot_check", "check_failed")]
    if banned:
        (ban,) = rest
        assert isinstance(ban, Banned) and ban.peer_id == target and st.banned
        expected.append((target, 0, "reputation", "banned"))
        (d,) = p.handle(WorkRequested(target))
        assert isinstance(d, Banned)
    else:
        assert rest == [] and not st.banned
        # a peer with a failed check is no longer trusted to verify others
        (d,) = p.handle(WorkRequested(target))
        assert isinstance(d, WorkOrder)
    assert verdicts(p) == expected


def test_a_banned_verifier_releases_its_check_to_another_trusted_peer() -> None:
    t = Trusted(("a", "b", "c"))
    p, deltas = t.p, t.deltas
    of = {c.order.target: check_id for check_id, c in p.checks.items()}
    p.checks[of["b"]].assigned["a"] = p.clock()  # a checks b, b checks a
    p.checks[of["a"]].assigned["b"] = p.clock()
    va = ask_idle(p, "a")
    vb = ask_idle(p, "b")
    assert isinstance(va, VerifyOrder) and isinstance(vb, VerifyOrder)
    assert (va.target, vb.target) == ("b", "a")
    # b's own contribution fails its check: b is banned and its assignment released
    decisions = p.handle(VerificationSubmitted(va.check_id, "a", DictSource(rand(77)), STEPS))
    assert isinstance(decisions[-1], Banned) and decisions[-1].peer_id == "b"
    assert not p.checks[vb.check_id].assigned
    (d,) = p.handle(VerificationSubmitted(vb.check_id, "b", DictSource(deltas["a"]), STEPS))
    assert isinstance(d, Unknown)
    p.checks[of["c"]].assigned["a"] = p.clock()  # keep c's own check out of the way
    vc = ask_idle(p, "c")
    assert isinstance(vc, VerifyOrder) and vc.check_id == vb.check_id and vc.peer_id == "c"


def test_verifiers_get_pending_checks_in_their_own_secret_order() -> None:
    """Whose work a verifier checks does not follow from when it asks: each peer sees the
    pending checks in an order drawn from the coordinator's secret, its id and the check's."""
    firsts = set()
    for secret in range(8):
        t = Trusted(("a", "b", "c", "d"))
        p = t.p
        p.verification.secret = secret
        v = ask_idle(p, "a")
        assert isinstance(v, VerifyOrder) and v.target != "a"
        firsts.add(v.target)
    assert len(firsts) > 1


def test_verifiers_get_the_oldest_pending_checks_first() -> None:
    """A check that expires unanswered lets its target off, so a verifier is handed the checks
    nearest to expiring first, whatever its secret order within a round."""
    for secret in range(6):
        t = Trusted(("a", "b", "c", "d"))
        p = t.p
        p.verification.secret = secret
        play(p, {x: rand(10 + i) for i, x in enumerate("abcd")})  # round 1, checked too
        rounds = {c.order.round for c in p.checks.values()}
        assert rounds == {0, 1}
        for peer in ("a", "b"):
            v = ask_idle(p, peer)
            assert isinstance(v, VerifyOrder) and v.round == 0, (secret, peer, v)


def test_a_replay_with_a_different_step_count_fails_the_check() -> None:
    t = Trusted(("a", "b"), check_strikes=1.0)
    p, deltas = t.p, t.deltas
    v = ask_idle(p, "a")
    assert isinstance(v, VerifyOrder)
    decisions = p.handle(
        VerificationSubmitted(v.check_id, "a", DictSource(deltas[v.target]), STEPS - 1)
    )
    done, flag = decisions
    assert isinstance(done, CheckDone) and not done.passed and "steps" in done.reason
    assert isinstance(flag, Flagged) and flag.stage == "spot_check"


def test_verifications_for_unknown_or_unassigned_checks_are_refused() -> None:
    t = Trusted(("a", "b", "c"))
    p, deltas = t.p, t.deltas
    (d,) = p.handle(VerificationSubmitted("0" * 24, "a", DictSource(deltas["a"]), STEPS))
    assert isinstance(d, Unknown) and d.peer_id == "a"
    v = ask_idle(p, "a")
    assert isinstance(v, VerifyOrder)
    # c is trusted too, but this check is assigned to a
    (d,) = p.handle(VerificationSubmitted(v.check_id, "c", DictSource(deltas[v.target]), STEPS))
    assert isinstance(d, Unknown)
    # a check nobody was given cannot be answered by a peer either
    free = next(
        c.order.check_id for c in p.checks.values() if not c.assigned and c.order.target != "c"
    )
    target = p.checks[free].order.target
    (d,) = p.handle(VerificationSubmitted(free, "c", DictSource(deltas[target]), STEPS))
    assert isinstance(d, Unknown)
    assert verdicts(p) == [] and len(p.checks) == 3


def test_a_check_assigned_long_ago_is_handed_to_another_verifier() -> None:
    t = Trusted(("a", "b", "c"))
    p, clock = t.p, t.clock
    v = ask_idle(p, "a")
    assert isinstance(v, VerifyOrder)
    clock.now += 61.0  # longer than the round deadline: a's assignment lapses
    handed = []
    for peer in ("b", "c"):  # each takes, and answers, every check it may
        got = ask_idle(p, peer)
        while isinstance(got, VerifyOrder):
            handed.append(got.check_id)
            if got.check_id == v.check_id:
                break
            p.handle(
                VerificationSubmitted(got.check_id, peer, DictSource(t.deltas[got.target]), STEPS)
            )
            got = ask_idle(p, peer)
    assert v.check_id in handed


# --- spot-checks, coordinator mode ------------------------------------------------------------


def coordinator(**extra: Mapping[str, object]) -> tuple[RoundProtocol, FakeClock]:
    return make(defence={"spot_check": "coordinator", "check_p_new": 1.0, **TRUST_FAST}, **extra)


def test_coordinator_mode_emits_verify_orders_at_close_and_takes_its_own_replays() -> None:
    p, _ = coordinator()
    join(p, "a", "b")
    deltas = {"a": rand(1), "b": rand(2)}
    decisions = play(p, deltas)
    orders = only(decisions, VerifyOrder)
    assert {(v.peer_id, v.target, v.round) for v in orders} == {("", "a", 0), ("", "b", 0)}
    assert decisions.index(orders[-1]) < decisions.index(closed_of(decisions))
    # trusted peers get work, not checks: the coordinator replays them itself
    (o,) = p.handle(WorkRequested("a"))
    assert isinstance(o, WorkOrder)
    va, vb = sorted(orders, key=lambda v: v.target)
    (ok,) = p.handle(VerificationSubmitted(va.check_id, "", DictSource(deltas["a"]), STEPS))
    assert isinstance(ok, CheckDone) and ok.passed and ok.verifier == ""
    assert p.peers["a"].standing.passed_checks == 1
    bad = p.handle(VerificationSubmitted(vb.check_id, "", DictSource(rand(50)), STEPS))
    assert isinstance(bad[0], CheckDone) and not bad[0].passed and bad[0].verifier == ""
    assert isinstance(bad[1], Flagged) and isinstance(bad[2], Banned)
    assert verdicts(p) == [
        ("a", 0, "spot_check", "check_passed"),
        ("b", 0, "spot_check", "check_failed"),
        ("b", 0, "reputation", "banned"),
    ]


def test_overlap_without_a_prior_round_is_refused_without_a_strike() -> None:
    """Overlapped steps that continue nothing anyone can replay are refused (an honest
    volunteer never sends them: it drops overlap that continues a refused upload)."""
    p, _ = coordinator()
    join(p, "a", "b")
    order(p, "a", "b")
    (refused,) = submit(p, "a", rand(1), overlap_steps=2)
    assert isinstance(refused, Rejected) and refused.code == "unreplayable"
    assert p.peers["a"].standing.strikes == 0
    submit(p, "a", rand(1))
    decisions = submit(p, "b", rand(2))
    assert sorted(v.target for v in only(decisions, VerifyOrder)) == ["a", "b"]


@pytest.mark.parametrize(
    "sections",
    [
        {"codec": {"name": "topk2bit", "chunk_size": 16, "topk": 4}},
        {"outer": {"optimizer": "error_feedback"}},
    ],
)
def test_no_checks_when_peers_keep_an_error_feedback_residual(
    sections: dict[str, Mapping[str, object]],
) -> None:
    p, _ = coordinator(**sections)
    join(p, "a", "b")
    decisions = play(p, {"a": rand(1), "b": rand(2)})
    assert only(decisions, VerifyOrder) == [] and p.checks == {}


def test_pending_checks_expire_after_check_lifetime_rounds() -> None:
    p, _ = coordinator()
    join(p, "a", "b")
    first = only(play(p, {"a": rand(1), "b": rand(2)}), VerifyOrder)
    ids = {v.check_id for v in first}
    for r in range(1, CHECK_LIFETIME_ROUNDS + 1):
        assert ids <= set(p.checks)
        assert not any(v[3] == "check_expired" for v in verdicts(p))
        play(p, {"a": rand(10 * r + 1), "b": rand(10 * r + 2)})
    assert not ids & set(p.checks)
    expired = [v for v in p.verdicts if v.outcome == "check_expired"]
    assert {(v.peer_id, v.round, v.stage) for v in expired} == {
        ("a", 0, "spot_check"),
        ("b", 0, "spot_check"),
    }
    (d,) = p.handle(VerificationSubmitted(first[0].check_id, "", DictSource(rand(1)), STEPS))
    assert isinstance(d, Unknown)
    # expiry is no failure
    assert all(p.peers[x].standing.strikes == 0.0 for x in ("a", "b"))


def test_a_late_contribution_is_checked_against_the_work_it_did() -> None:
    p, clock = coordinator(rounds={"late": "accept"})
    join(p, "a", "b")
    orders0 = order(p, "a", "b")
    submit(p, "a", rand(1))
    clock.now += 61.0
    closed_of(p.handle(Tick()))  # round 0 closes without b
    order(p, "b")  # b already holds its round-1 order when its round-0 work arrives
    late = ContributionSubmitted(
        "b", 0, 0, DictSource(rand(2)), SAMPLES, SAMPLES * CONTEXT, STEPS, 2.0
    )
    assert isinstance(p.handle(late)[0], Accepted)
    clock.now += 61.0
    decisions = p.handle(Tick())
    closed_of(decisions)
    # checking it is optional, but a check must replay the work b was given in round 0
    for v in only(decisions, VerifyOrder):
        if v.target != "b":
            continue
        assert (v.round, v.base_version) == (0, 0)
        assert v.shard_ids == orders0["b"].shard_ids


def test_a_peer_with_a_late_contribution_can_still_contribute_to_the_open_round() -> None:
    p, clock = make(rounds={"late": "accept"})
    join(p, "a", "b")
    order(p, "a", "b")
    submit(p, "a", rand(1))
    clock.now += 61.0
    closed_of(p.handle(Tick()))  # round 0 closes without b
    order(p, "a", "b")
    late = ContributionSubmitted(
        "b", 0, 0, DictSource(rand(2)), SAMPLES, SAMPLES * CONTEXT, STEPS, 2.0
    )
    (late_receipt,) = p.handle(late)
    assert isinstance(late_receipt, Accepted) and late_receipt.round == 0
    submit(p, "a", rand(3))
    decisions = submit(p, "b", rand(4))
    accepted = decisions[0]
    assert isinstance(accepted, Accepted) and accepted.round == 1
    assert accepted.receipt != late_receipt.receipt
    assert "b" in closed_of(decisions).contributors  # everyone assigned is in: it closes


# --- administration -----------------------------------------------------------------------------


def test_an_admin_ban_bans_evicts_and_may_close_the_round() -> None:
    p, _ = make()
    join(p, "a", "b", "c")
    order(p, "a", "b", "c")
    submit(p, "a", rand(1))
    submit(p, "b", rand(2))
    decisions = p.handle(PeerBanned("c", "spamming the dashboard"))
    assert decisions[0] == Banned("c", "spamming the dashboard")
    assert closed_of(decisions).contributors == ("a", "b")  # nobody else was awaited
    assert verdicts(p) == [("c", 0, "admin", "banned")]
    assert p.peers["c"].standing.banned
    (d,) = p.handle(WorkRequested("c"))
    assert d == Banned("c", "spamming the dashboard")
    # an admin ban of a peer that contributed to the open round drops its contribution
    order(p, "a", "b")
    submit(p, "a", rand(11))
    decisions = p.handle(PeerBanned("a", "stolen key"))
    assert p.submitted() == () and "a" not in p.assigned()
    assert only(decisions, RoundClosed) == []
    assert closed_of(submit(p, "b", rand(12))).contributors == ("b",)
    (d,) = p.handle(PeerBanned("ghost", "x"))
    assert isinstance(d, Unknown)


# --- snapshot and determinism -----------------------------------------------------------------


def script_round0(p: RoundProtocol, sources: dict[str, DictSource]) -> list[Decision]:
    """Round 0 with a refused claim, a copy and checks for everyone; a gets a check to do."""
    out: list[Decision] = []
    join(p, "a", "b", "c", "d")
    order(p, "a", "b", "c", "d")
    deltas = {"a": rand(1), "b": rand(2), "c": rand(3), "d": rand(2)}  # d copies b
    out.extend(submit(p, "c", deltas["c"], samples=3))
    for peer, d in deltas.items():
        ref = f"{peer}/0"
        sources[ref] = DictSource(d)
        event = ContributionSubmitted(
            peer, 0, 0, sources[ref], SAMPLES, SAMPLES * CONTEXT, STEPS, 2.0, ref=ref
        )
        out.extend(p.handle(event))
    out.append(ask_idle(p, "a"))
    return out


def script_round1(p: RoundProtocol, sources: dict[str, DictSource]) -> list[Decision]:
    """Checks answered (one passes, one fails), then a replay of round 0 in round 1."""
    out: list[Decision] = []
    for peer in ("a", "b"):
        v = ask_idle(p, peer)
        out.append(v)
        if isinstance(v, VerifyOrder):
            good = sources[f"{v.target}/0"]
            answer = good if peer == "a" else DictSource(rand(66))
            out.extend(p.handle(VerificationSubmitted(v.check_id, peer, answer, STEPS)))
    for peer in ("a", "b", "c", "d"):
        out.extend(p.handle(WorkRequested(peer)))
    for peer, d in (("a", rand(11)), ("c", rand(2)), ("d", rand(14)), ("b", rand(12))):
        if p.peers[peer].standing.banned or peer not in p.assigned():
            continue
        out.extend(submit(p, peer, d))
    return out


def snapshot_config() -> dict[str, object]:
    return {"spot_check": "peer", "check_p_new": 1.0, "check_fail_quorum": 1, **TRUST_FAST}


def test_snapshot_and_restore_keep_checks_verdicts_standings_and_fingerprints() -> None:
    sources: dict[str, DictSource] = {}
    p, clock = make(defence=snapshot_config())
    script_round0(p, sources)
    assert p.checks and p.verdicts and p.fingerprints
    assert any("a" in c.assigned for c in p.checks.values())
    doc = json.loads(json.dumps(p.snapshot()))
    tensors = {k: {n: t.clone() for n, t in v.items()} for k, v in p.tensors().items()}
    q = RoundProtocol.restore(p.config, doc, tensors, SHARDS, clock, sources.__getitem__)
    assert q.verdicts == p.verdicts
    assert {k: v.standing for k, v in q.peers.items()} == {
        k: v.standing for k, v in p.peers.items()
    }
    assert set(q.checks) == set(p.checks)
    for check_id, check in p.checks.items():
        other = q.checks[check_id]
        assert (other.order, other.ref, other.samples, other.assigned, other.reports) == (
            check.order,
            check.ref,
            check.samples,
            check.assigned,
            check.reports,
        )
    assert set(q.fingerprints) == set(p.fingerprints)
    assert all(torch.equal(q.fingerprints[k], p.fingerprints[k]) for k in p.fingerprints)

    original, restored = script_round1(p, sources), script_round1(q, sources)
    assert restored == original
    assert any(isinstance(d, CheckDone) and d.passed for d in original)
    assert any(isinstance(d, CheckDone) and not d.passed for d in original)
    assert any(isinstance(d, Flagged) and d.stage == "copy" and d.round == 1 for d in original)
    assert q.verdicts == p.verdicts
    assert {k: v.standing for k, v in q.peers.items()} == {
        k: v.standing for k, v in p.peers.items()
    }
    assert all(torch.equal(q.params[k], p.params[k]) for k in SHAPES)


def run_script(secret: int) -> tuple[list[Decision], list[Verdict], set[str]]:
    sources: dict[str, DictSource] = {}
    clock = FakeClock()
    params = {k: torch.zeros(shape) for k, shape in SHAPES.items()}
    cfg = config(defence={**snapshot_config(), "check_p_new": 0.5})
    p = RoundProtocol(cfg, params, SHARDS, clock, secret=secret)
    out = script_round0(p, sources) + script_round1(p, sources)
    return out, list(p.verdicts), set(p.checks)


def test_the_same_events_give_the_same_verdicts() -> None:
    first, second = run_script(secret=1234), run_script(secret=1234)
    assert first == second
    assert any(v.outcome == "flagged" for v in first[1])


# --- usefulness scoring (a real probe and a tiny model) ---------------------------------------

VAL = [f"{i + 100:064x}" for i in range(2)]
MODEL = {"arch": "gpt", "vocab_size": 256, "context": CONTEXT, "width": 16, "depth": 1, "heads": 2}


def corpus() -> dict[str, npt.NDArray[np.uint8]]:
    """Shards of text over a 6-letter alphabet: a unigram a model learns in one step."""
    alphabet = np.frombuffer(b"abcdef", dtype=np.uint8)
    return {
        sha: np.random.default_rng(i).choice(alphabet, 4096).astype(np.uint8)
        for i, sha in enumerate(SHARDS + VAL)
    }


class SpyProbe(ShardProbe):
    """A real probe that remembers which work order each scored batch came from (not the
    batches of the published moments, drawn for the pseudo-peer MOMENTS_PEER)."""

    def __init__(self, shards: Mapping[str, npt.NDArray[np.uint8]], cfg: RunConfig) -> None:
        self.moment_calls = 0
        super().__init__(
            shards,
            VAL,
            train_batch_size=BATCH,
            batch_size=cfg.defence.score_batch_size,
            context=CONTEXT,
            seed=0,
        )
        self.calls: list[tuple[str, int, tuple[str, ...]]] = []

    def assigned(
        self, shard_ids: Sequence[str], *, seed: int, round: int, peer: str, index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if peer != MOMENTS_PEER:
            self.calls.append((peer, round, tuple(shard_ids)))
        else:
            self.moment_calls += 1
        return super().assigned(shard_ids, seed=seed, round=round, peer=peer, index=index)


def scored_protocol(
    **extra: Any,
) -> tuple[RoundProtocol, SpyProbe, dict[str, npt.NDArray[np.uint8]]]:
    cfg = config(model=MODEL, defence={"score_batch_size": 8, "score_per_round": 8}, **extra)
    shards = corpus()
    probe = SpyProbe(shards, cfg)
    p = RoundProtocol(cfg, initial_state(cfg.model), SHARDS, FakeClock(), probe=probe)
    return p, probe, shards


def trained(
    p: RoundProtocol, o: WorkOrder, shards: Mapping[str, npt.NDArray[np.uint8]], lr: float
) -> Delta:
    """Δ = lr × ∇loss over the peer's batches of its work order (one big descent step)."""
    model = build_model(p.config.model, p.params)
    sampler = BatchSampler(
        shards,
        o.shard_ids,
        seed=o.seed,
        round=o.round,
        peer=o.peer_id,
        batch_size=BATCH,
        context=CONTEXT,
    )
    xs, ys = zip(*(sampler.batch(i) for i in range(STEPS)), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    named = dict(model.named_parameters())
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    grads = torch.autograd.grad(loss, list(named.values()))
    return {n: lr * g.detach() for n, g in zip(named, grads, strict=True)}


def test_usefulness_scoring_flags_an_update_that_raises_the_loss() -> None:
    p, probe, shards = scored_protocol()
    peers = ["a", "b", "c", "d"]
    join(p, *peers)
    orders = order(p, *peers)
    deltas = {x: trained(p, orders[x], shards, lr=0.5) for x in peers}
    deltas["d"] = scaled(deltas["d"], -1.0)  # sign-flipped: ascends the loss
    decisions: list[Decision] = []
    for x in peers:
        decisions.extend(submit(p, x, deltas[x]))
    flags = only(decisions, Flagged)
    assert [(f.peer_id, f.stage) for f in flags] == [("d", "usefulness")]
    assert closed_of(decisions).contributors == ("a", "b", "c")
    assert p.scored == 4
    # each contribution is scored on a batch of the work order it trained on
    assert {(peer, r, ids) for peer, r, ids in probe.calls} == {
        (x, 0, orders[x].shard_ids) for x in peers
    }


def test_contributions_of_later_rounds_are_scored_on_their_own_work_order() -> None:
    p, probe, shards = scored_protocol()
    join(p, "a", "b", "c")
    for _ in range(2):
        orders = order(p, "a", "b", "c")
        probe.calls.clear()
        for x in ("a", "b", "c"):
            submit(p, x, trained(p, orders[x], shards, lr=0.5))
        assert probe.calls
        for peer, r, ids in probe.calls:
            assert (r, ids) == (orders[peer].round, orders[peer].shard_ids)


def test_overlapped_steps_are_not_scored_on_the_new_orders_data() -> None:
    """With overlap, a contribution's first steps continued the previous round's order; only
    the steps after them trained on this order's batches. A contribution that is all overlap
    (a slow link) has no steps on its own data to score, so it is not scored at all: scoring it
    on batches it never saw would flag an honest peer (a ban after three rounds)."""
    p, probe, shards = scored_protocol()
    peers = ["a", "b", "c", "d"]
    join(p, *peers)
    orders = order(p, *peers)
    for x in peers:
        submit(p, x, trained(p, orders[x], shards, lr=0.5), ref=f"{x}/0")
    assert p.round == 1
    scored, probe.calls = p.scored, []
    orders = order(p, *peers)
    deltas = {x: trained(p, orders[x], shards, lr=0.5) for x in peers}
    deltas["d"] = scaled(deltas["d"], -1.0)  # useless on this order's data
    decisions: list[Decision] = []
    for x in peers:
        overlap = {"overlap_steps": STEPS, "overlap_round": 0, "overlap_first_batch": STEPS}
        decisions.extend(submit(p, x, deltas[x], ref=f"{x}/1", **(overlap if x == "d" else {})))
    assert not only(decisions, Flagged) and not only(decisions, Rejected)
    assert p.scored - scored == 3 and {peer for peer, _, _ in probe.calls} == {"a", "b", "c"}


@pytest.mark.parametrize("state", ["published", "derived"])
def test_published_moments_come_with_the_next_base_and_survive_a_restore(state: str) -> None:
    p, probe, shards = scored_protocol(inner={"optimizer_state": state})
    assert p.config.inner.optimizer_state == state and p.moments == {}
    assert set(p.base()) == set(p.params)  # round 0 starts from zeros
    peers = ["a", "b", "c"]
    join(p, *peers)
    orders = order(p, *peers)
    for x in peers:
        submit(p, x, trained(p, orders[x], shards, lr=0.05))
    assert p.round == 1 and p.moments
    base = p.base()
    params, moments = split_base(base)
    assert set(params) == set(p.params) and set(moments) == set(p.moments)
    validate(moments, p.shapes)  # they fit the model and are finite
    if state == "derived":  # the mean steps and the round's contributions, no model pass
        assert float(moments[WORKERS]) == 3 and probe.moment_calls == 0
    else:
        assert probe.moment_calls == p.config.inner.moment_batches
    tensors = {k: dict(v) for k, v in p.tensors().items()}
    q = RoundProtocol.restore(
        p.config, p.snapshot(), tensors, SHARDS, FakeClock(), lambda ref: None, probe=p.probe
    )  # type: ignore[arg-type,return-value]
    assert all(torch.equal(q.moments[k], t) for k, t in p.moments.items())
    fresh = RoundProtocol(
        p.config.model_copy(
            update={"inner": p.config.inner.model_copy(update={"optimizer_state": "fresh"})}
        ),
        initial_state(p.config.model),
        SHARDS,
        FakeClock(),
        probe=p.probe,
    )
    join(fresh, *peers)
    fresh_orders = order(fresh, *peers)
    for x in peers:
        submit(fresh, x, trained(fresh, fresh_orders[x], shards, lr=0.05))
    assert fresh.round == 1 and fresh.moments == {}


# --- work on arrival: the close reuses what was computed as contributions came in -------------


@pytest.mark.parametrize("newcomers", [False, True])
def test_work_done_on_arrival_changes_nothing_the_close_decides(newcomers: bool) -> None:
    """Each accepted contribution's norm, fingerprint and (when it ranks among the first to be
    scored) usefulness score may be computed as it arrives (`analysis_job`); the close then
    decides exactly what it decides without them, and scores only what was left. With
    `score_newcomers` every newcomer's contribution is scored, at once on arrival."""

    def run(on_arrival: bool) -> tuple[RoundProtocol, SpyProbe, list[Decision], int]:
        defence = {"score_batch_size": 8, "score_per_round": 2, "score_newcomers": newcomers}
        cfg = config(model=MODEL, defence=defence)
        shards = corpus()
        probe = SpyProbe(shards, cfg)
        p = RoundProtocol(cfg, initial_state(cfg.model), SHARDS, FakeClock(), probe=probe)
        peers = ["a", "b", "c", "d", "e"]
        join(p, *peers)
        orders = order(p, *peers)
        deltas = {x: trained(p, orders[x], shards, lr=0.5) for x in peers}
        deltas["b"] = scaled(deltas["b"], -1.0)
        decisions: list[Decision] = []
        before_close = 0
        for x in peers:
            before_close = len(probe.calls)
            decisions.extend(submit(p, x, deltas[x]))
            job = p.analysis_job(x, 0) if on_arrival and p.round == 0 else None
            if job is not None:
                job()
        return p, probe, decisions, len(probe.calls) - before_close

    eager, eager_probe, eager_decisions, at_close = run(True)
    lazy, lazy_probe, lazy_decisions, _ = run(False)
    assert eager_decisions == lazy_decisions
    assert verdicts(eager) == verdicts(lazy)
    assert eager.scored == lazy.scored == (5 if newcomers else 2)
    assert all(torch.equal(eager.params[k], lazy.params[k]) for k in lazy.params)
    # the close's choices were scored on the same batches, all but perhaps the last one before
    # the close (some that ranked among the first two when they came were scored in vain)
    assert set(lazy_probe.calls) <= set(eager_probe.calls) and at_close <= 1


def test_an_analysis_of_an_older_theta_is_not_used() -> None:
    """An analysis belongs to θ of one version: a job that finishes after its round closed
    leaves nothing the next close would use."""
    p, _, shards = scored_protocol()
    join(p, "a", "b")
    orders = order(p, "a", "b")
    submit(p, "a", trained(p, orders["a"], shards, lr=0.5))
    job = p.analysis_job("a", 0)
    assert job is not None and p.analysis_job("zz", 0) is None
    submit(p, "b", trained(p, orders["b"], shards, lr=0.5))  # closes round 0
    assert p.round == 1
    job()  # late: θ_0's analysis of round 0's contribution
    orders = order(p, "a", "b")
    for x in ("a", "b"):
        submit(p, x, trained(p, orders[x], shards, lr=0.5))
    assert p.round == 2 and p.verification._analyses == {}


# --- sybils from the first round: scores give the reference no majority can move ------------


@pytest.mark.parametrize("newcomers", [True, False])
def test_round_zero_sybils_cannot_pull_the_norm_reference(newcomers: bool) -> None:
    """Before anyone is established, the norm stage measures against the updates whose scores
    show a real gain (every newcomer is scored), so twice as many fresh identities sending tiny
    updates are the ones refused; without scoring newcomers, their median made every honest
    update look too large."""
    defence = {"score_batch_size": 8, "score_per_round": 2, "score_newcomers": newcomers}
    cfg = config(model=MODEL, defence=defence)
    shards = corpus()
    p = RoundProtocol(
        cfg, initial_state(cfg.model), SHARDS, FakeClock(), probe=SpyProbe(shards, cfg)
    )
    honest, sybils = ["a", "b", "c"], [f"s{i}" for i in range(6)]
    join(p, *honest, *sybils)
    orders = order(p, *honest, *sybils)
    decisions: list[Decision] = []
    for i, x in enumerate(sybils):
        g = torch.Generator().manual_seed(40 + i)
        tiny = {k: 1e-6 * torch.randn(v.shape, generator=g) for k, v in p.params.items()}
        decisions += submit(p, x, tiny)
    for x in honest:
        decisions += submit(p, x, trained(p, orders[x], shards, lr=0.5))
    flagged = {d.peer_id: d.reason for d in decisions if isinstance(d, Flagged)}
    if newcomers:
        assert set(flagged) == set(sybils)
        assert all("updates shown useful" in r for r in flagged.values())
    else:
        assert set(honest) <= set(flagged)
