"""Spot-checks decided by agreeing verifiers: a failure needs `defence.check_fail_quorum`
(default 2) matching reports of a mismatch, so one lying verifier cannot frame an honest peer;
a pass needs `check_pass_quorum` (default 1; 2 so that one colluding verifier cannot clear a
cheat); a split asks for another verifier, and whoever the decision overrules pays for it."""

from __future__ import annotations

import json

from test_protocol_defence import (
    SHARDS,
    STEPS,
    TRUST_FAST,
    Delta,
    Trusted,
    ask_idle,
    join,
    make,
    order,
    play,
    rand,
    scaled,
    snapshot_config,
    submit,
    verdicts,
)

from crowdtrain.protocol import (
    Banned,
    CheckDone,
    CheckReported,
    Decision,
    Flagged,
    PeerBanned,
    RoundProtocol,
    RunFinished,
    ScoreOrder,
    ScoreSubmitted,
    Unknown,
    VerificationSubmitted,
    VerifyOrder,
    WorkRequested,
)
from crowdtrain.protocol.core import CHECK_LIFETIME_ROUNDS
from crowdtrain.protocol.snapshot import check_from_json, check_to_json
from crowdtrain.robust import DictSource
from crowdtrain.robust.usefulness import Score

PEERS = ("a", "b", "c", "d")


def two(**defence: object) -> Trusted:
    return Trusted(PEERS, **{"check_fail_quorum": 2, **defence})


def check_of(p: RoundProtocol, target: str) -> str:
    (check_id,) = [c for c, check in p.checks.items() if check.order.target == target]
    return check_id


def report(p: RoundProtocol, verifier: str, check_id: str, delta: Delta) -> list[Decision]:
    return p.handle(VerificationSubmitted(check_id, verifier, DictSource(delta), STEPS))


def assign(p: RoundProtocol, verifier: str, check_id: str) -> None:
    """Give CHECK_ID to VERIFIER directly (as `check_for` would; the tests choose who)."""
    p.checks[check_id].assigned[verifier] = p.clock()


def test_one_match_passes_by_default_and_two_when_the_pass_quorum_is_two() -> None:
    t = two()
    p = t.p
    check_id = check_of(p, "b")
    assign(p, "a", check_id)
    (done,) = report(p, "a", check_id, t.deltas["b"])
    assert isinstance(done, CheckDone) and done.passed and done.verifier == "a"

    t = two(check_pass_quorum=2)
    p = t.p
    check_id = check_of(p, "b")
    assign(p, "a", check_id)
    assign(p, "c", check_id)
    (first,) = report(p, "a", check_id, t.deltas["b"])
    assert first == CheckReported(check_id, "b", 0, "a")
    assert verdicts(p) == [] and check_id in p.checks
    (done,) = report(p, "c", check_id, t.deltas["b"])
    assert isinstance(done, CheckDone) and done.passed and done.verifier == "a,c"
    assert p.peers["b"].standing.passed_checks == 1
    assert verdicts(p) == [("b", 0, "spot_check", "check_passed")]


def test_a_mismatch_is_handed_to_a_second_verifier_before_anything_is_decided() -> None:
    t = two()
    p = t.p
    check_id = check_of(p, "b")
    assign(p, "a", check_id)
    assert report(p, "a", check_id, rand(77)) == [CheckReported(check_id, "b", 0, "a")]
    assert p.peers["b"].standing.strikes == 0
    got = ask_idle(p, "c")
    while isinstance(got, VerifyOrder) and got.check_id != check_id:
        report(p, "c", got.check_id, t.deltas[got.target])
        got = ask_idle(p, "c")
    assert isinstance(got, VerifyOrder) and got.check_id == check_id


def test_a_lying_verifier_cannot_frame_an_honest_peer_and_is_overruled() -> None:
    t = two()
    p = t.p
    check_id = check_of(p, "b")
    samples = p.peers["b"].samples
    assign(p, "a", check_id)
    assign(p, "c", check_id)
    # a lies: it reports a replay that does not match b's honest contribution
    assert report(p, "a", check_id, scaled(t.deltas["b"], -1.0)) == [
        CheckReported(check_id, "b", 0, "a")
    ]
    assert report(p, "c", check_id, t.deltas["b"]) == [CheckReported(check_id, "b", 0, "c")]
    # a split: nothing is decided, the check wants a third verifier and gets d (not a or c)
    assert p.peers["b"].standing.strikes == 0 and p.peers["b"].samples == samples
    assert p.checks[check_id].tally() == (1, 1)
    got = ask_idle(p, "d")
    assert isinstance(got, VerifyOrder)
    while got.check_id != check_id:  # d may hold another check first: answer it truthfully
        report(p, "d", got.check_id, t.deltas[got.target])
        got = ask_idle(p, "d")
        assert isinstance(got, VerifyOrder)
    decisions = report(p, "d", check_id, t.deltas["b"])
    done = decisions[0]
    assert isinstance(done, CheckDone) and done.passed and done.verifier == "c,d"
    assert p.peers["b"].standing.strikes == 0 and p.peers["b"].samples == samples
    assert p.peers["b"].standing.failed_checks == 0
    liar = p.peers["a"].standing
    assert liar.strikes == p.config.defence.check_strikes and liar.failed_checks == 1
    assert Banned("a", liar.ban_reason) in decisions  # 3 strikes: the default bans at once
    assert ("a", 0, "spot_check", "verifier_overruled") in verdicts(p)


def test_two_matching_mismatches_void_the_credit_and_strike_the_target() -> None:
    t = two(check_strikes=1.0)
    p = t.p
    check_id = check_of(p, "b")
    assign(p, "a", check_id)
    assign(p, "c", check_id)
    report(p, "a", check_id, rand(77))
    done, flag = report(p, "c", check_id, rand(78))
    assert isinstance(done, CheckDone) and not done.passed
    assert isinstance(flag, Flagged) and (flag.peer_id, flag.stage) == ("b", "spot_check")
    assert p.peers["b"].samples == 0 and p.peers["b"].standing.strikes == 1.0
    assert p.peers["a"].standing.strikes == 0 and p.peers["c"].standing.strikes == 0


def test_with_a_pass_quorum_of_two_a_colluding_verifier_cannot_clear_a_cheat() -> None:
    """b cheated; a (its accomplice) reports a match, c and d the mismatch."""
    t = two(check_strikes=1.0, check_pass_quorum=2)
    p = t.p
    check_id = check_of(p, "b")
    for v in ("a", "c", "d"):
        assign(p, v, check_id)
    report(p, "a", check_id, t.deltas["b"])  # "it matched"
    report(p, "c", check_id, rand(77))
    decisions = report(p, "d", check_id, rand(78))
    done = decisions[0]
    assert isinstance(done, CheckDone) and not done.passed and done.verifier == "c,d"
    assert p.peers["b"].standing.strikes == 1.0 and p.peers["a"].standing.strikes == 1.0
    assert ("a", 0, "spot_check", "verifier_overruled") in verdicts(p)


def test_a_verifier_never_gets_a_check_it_answered_nor_its_own() -> None:
    t = two(check_pass_quorum=2)
    p = t.p
    seen: set[str] = set()
    for _ in range(10):  # a answers every check it is given, until none is left for it
        got = ask_idle(p, "a")
        if not isinstance(got, VerifyOrder):
            break
        assert got.target != "a" and got.check_id not in seen
        seen.add(got.check_id)
        report(p, "a", got.check_id, t.deltas[got.target])
    assert len(seen) == 3  # b's, c's and d's work; each still wants a second verifier
    assert all(p.checks[c].tally() == (1, 0) for c in seen)


def test_a_lone_report_that_expires_strikes_no_one() -> None:
    t = two(check_strikes=1.0)
    p = t.p
    check_id = check_of(p, "b")
    assign(p, "a", check_id)
    report(p, "a", check_id, rand(77))  # a mismatch, but alone
    join(p, "e")  # a newcomer keeps the rounds going (and, once trusted, answers checks)
    deltas = dict(t.deltas)
    for r in range(CHECK_LIFETIME_ROUNDS):
        got = p.handle(WorkRequested("e"))[0]
        while isinstance(got, VerifyOrder):
            report(p, "e", got.check_id, deltas.get(got.target, rand(5)))
            got = p.handle(WorkRequested("e"))[0]
        deltas["e"] = rand(100 + r)
        submit(p, "e", deltas["e"])
        if check_id not in p.checks:
            break
    assert check_id not in p.checks
    assert p.peers["b"].standing.strikes == 0 and p.peers["b"].standing.failed_checks == 0
    expired = [v for v in p.verdicts if v.peer_id == "b" and v.outcome == "check_expired"]
    assert expired and "too few to agree" in expired[0].reason


def test_a_banned_verifiers_report_no_longer_counts() -> None:
    t = two()
    p = t.p
    check_id = check_of(p, "b")
    assign(p, "a", check_id)
    report(p, "a", check_id, rand(77))
    assert p.checks[check_id].tally() == (0, 1)
    p.handle(PeerBanned("a", "an administrator banned a"))
    assert p.checks[check_id].reports == {}


def test_reports_survive_a_snapshot_and_restore() -> None:
    p, _ = make(defence={**snapshot_config(), "check_fail_quorum": 2, "check_pass_quorum": 2})
    join(p, *PEERS)
    order(p, *PEERS)
    deltas = {peer: rand(i + 1) for i, peer in enumerate(PEERS)}
    for peer in PEERS:
        submit(p, peer, deltas[peer], ref=f"{peer}/0")
    sources = {f"{peer}/0": DictSource(deltas[peer]) for peer in PEERS}
    check_id = check_of(p, "b")
    assign(p, "a", check_id)
    assign(p, "c", check_id)
    report(p, "a", check_id, deltas["b"])
    doc = json.loads(json.dumps(p.snapshot()))
    tensors = {k: {n: x.clone() for n, x in v.items()} for k, v in p.tensors().items()}
    q = RoundProtocol.restore(p.config, doc, tensors, SHARDS, p.clock, sources.__getitem__)
    assert q.checks[check_id].reports == {"a": ""}
    assert set(q.checks[check_id].assigned) == {"c"}
    (done,) = report(q, "c", check_id, deltas["b"])
    assert isinstance(done, CheckDone) and done.passed


def test_the_coordinators_own_replay_decides_alone() -> None:
    p, _ = make(defence={"spot_check": "coordinator", "check_p_new": 1.0, "check_fail_quorum": 2})
    join(p, "a")
    decisions = play(p, {"a": rand(1)})
    (v,) = [d for d in decisions if isinstance(d, VerifyOrder)]
    (done, *_) = p.handle(VerificationSubmitted(v.check_id, "", DictSource(rand(1)), STEPS))
    assert isinstance(done, CheckDone) and done.passed and done.verifier == ""


# --- usefulness scores on volunteers (`defence.scoring = "peer"`) --------------------------------


def scoring(**defence: object) -> Trusted:
    """Round 0 closed with volunteers scoring (every contribution: score_per_round 4), no
    replays (spot_check off), and every peer trusted."""
    return Trusted(
        PEERS,
        **{
            "scoring": "peer",
            "spot_check": "off",
            "score_per_round": 4,
            "check_fail_quorum": 2,
            **defence,
        },
    )


GOOD = Score(3.0, 2.5, 3.1, 3.05, 0.01)  # lowers the loss on its data, held-out unchanged
BAD = Score(3.0, 3.6, 3.1, 3.7, 0.01)  # raises both


def score_of(p: RoundProtocol, verifier: str, check_id: str, score: Score) -> list[Decision]:
    return p.handle(ScoreSubmitted(check_id, verifier, score))


def test_volunteers_get_score_orders_for_the_contributions_the_coordinator_would_score() -> None:
    t = scoring()
    p = t.p
    orders = {c.order.target: c.order for c in p.checks.values()}
    assert set(orders) == set(PEERS)
    for o in orders.values():
        assert isinstance(o, ScoreOrder) and o.base_version == 0 and o.round == 0
        assert o.payload_ref == p.checks[o.check_id].ref
    got = ask_idle(p, "a")
    assert isinstance(got, ScoreOrder) and got.peer_id == "a" and got.target != "a"
    assert p.verification.peer_scoring
    # "auto" scores on the coordinator for a model this small: no score orders
    assert not make(defence={"scoring": "auto"})[0].verification.peer_scoring


def test_two_failing_scores_flag_the_contribution_and_void_its_credit() -> None:
    t = scoring()
    p = t.p
    check_id = check_of(p, "b")
    assign(p, "a", check_id)
    assign(p, "c", check_id)
    assert score_of(p, "a", check_id, BAD) == [CheckReported(check_id, "b", 0, "a")]
    done, flag = score_of(p, "c", check_id, BAD)
    assert isinstance(done, CheckDone) and not done.passed
    assert isinstance(flag, Flagged) and (flag.peer_id, flag.stage) == ("b", "usefulness")
    assert p.peers["b"].samples == 0 and p.peers["b"].standing.strikes == 1.0
    assert ("b", 0, "usefulness", "flagged") in verdicts(p)


def test_a_passing_score_passes_and_a_lone_false_failure_frames_no_one() -> None:
    t = scoring()
    p = t.p
    check_id = check_of(p, "b")
    assign(p, "a", check_id)
    (done,) = score_of(p, "a", check_id, GOOD)
    assert isinstance(done, CheckDone) and done.passed
    check_id = check_of(p, "c")
    assign(p, "a", check_id)
    assign(p, "b", check_id)
    assign(p, "d", check_id)
    score_of(p, "a", check_id, BAD)  # a lies about c's contribution
    score_of(p, "b", check_id, GOOD)
    decisions = score_of(p, "d", check_id, GOOD)
    assert isinstance(decisions[0], CheckDone) and decisions[0].passed
    assert p.peers["c"].standing.strikes == 0 and p.peers["c"].samples > 0
    # a's numbers are far from the others': it is struck (and banned at 3 strikes)
    assert p.peers["a"].standing.strikes == p.config.defence.check_strikes
    assert ("a", 0, "spot_check", "verifier_overruled") in verdicts(p)


def test_an_honest_split_near_the_bar_strikes_no_verifier() -> None:
    """Two honest machines may land either side of the bar; numbers within the tolerance
    of the majority's are not a lie."""
    t = scoring(score_min_gain=0.0, score_z=0.0)
    p = t.p
    check_id = check_of(p, "b")
    for v in ("a", "c", "d"):
        assign(p, v, check_id)
    near_fail = Score(3.0, 3.0001, 3.1, 3.1, 0.0)  # gain -1e-4: fails the bar of 0
    near_pass = Score(3.0, 2.9999, 3.1, 3.1, 0.0)  # gain 1e-4: passes
    score_of(p, "a", check_id, near_fail)
    score_of(p, "c", check_id, near_pass)
    decisions = score_of(p, "d", check_id, near_pass)
    assert isinstance(decisions[0], CheckDone) and decisions[0].passed
    assert p.peers["a"].standing.strikes == 0
    assert ("a", 0, "spot_check", "verifier_overruled") in verdicts(p)


def test_non_finite_scores_count_as_failures_and_scores_only_answer_score_orders() -> None:
    t = scoring(check_fail_quorum=1)
    p = t.p
    check_id = check_of(p, "b")
    assign(p, "a", check_id)
    nan = Score(3.0, float("nan"), 3.1, 3.1, 0.0)
    done, _flag = score_of(p, "a", check_id, nan)
    assert isinstance(done, CheckDone) and not done.passed and "finite" in done.reason
    replays = Trusted(PEERS)  # replay checks only
    rid = check_of(replays.p, "b")
    (unknown,) = replays.p.handle(ScoreSubmitted(rid, "a", GOOD))
    assert isinstance(unknown, Unknown)
    (unknown,) = p.handle(ScoreSubmitted(check_of(p, "c"), "", GOOD))
    assert isinstance(unknown, Unknown)  # the coordinator does not answer score orders


def test_score_orders_and_reports_survive_a_snapshot_and_restore() -> None:
    p, _ = make(
        defence={
            **snapshot_config(),
            "scoring": "peer",
            "spot_check": "off",
            "score_per_round": 4,
            "check_fail_quorum": 2,
        }
    )
    join(p, *PEERS)
    order(p, *PEERS)
    deltas = {peer: rand(i + 1) for i, peer in enumerate(PEERS)}
    for peer in PEERS:
        submit(p, peer, deltas[peer], ref=f"{peer}/0")
    sources = {f"{peer}/0": DictSource(deltas[peer]) for peer in PEERS}
    check_id = check_of(p, "b")
    assign(p, "a", check_id)
    assign(p, "c", check_id)
    score_of(p, "a", check_id, BAD)
    doc = json.loads(json.dumps(p.snapshot()))
    tensors = {k: {n: x.clone() for n, x in v.items()} for k, v in p.tensors().items()}
    q = RoundProtocol.restore(p.config, doc, tensors, SHARDS, p.clock, sources.__getitem__)
    assert q.checks[check_id].order == p.checks[check_id].order
    assert q.checks[check_id].scores == p.checks[check_id].scores
    done, _flag = score_of(q, "c", check_id, BAD)
    assert isinstance(done, CheckDone) and not done.passed


def test_checks_of_the_last_round_still_run_after_the_run_finished() -> None:
    p, _ = make(
        defence={
            "spot_check": "peer",
            "check_p_new": 1.0,
            "check_p_min": 1.0,  # every contribution checked, passed checks or not
            "check_fail_quorum": 1,
            **TRUST_FAST,
        },
        rounds={"total": 2},
    )
    join(p, "a", "b")
    play(p, {"a": rand(1), "b": rand(2)})
    for v in [ask_idle(p, x) for x in ("a", "b")]:  # round 0's checks
        assert isinstance(v, VerifyOrder)
        report(p, v.peer_id, v.check_id, rand(1 if v.target == "a" else 2))
    last = {"a": rand(3), "b": rand(4)}
    play(p, last)
    assert p.finished and {c.order.round for c in p.checks.values()} == {1}
    got = p.handle(WorkRequested("a"))[0]
    assert isinstance(got, VerifyOrder) and got.target == "b" and got.round == 1
    (done,) = report(p, "a", got.check_id, last["b"])
    assert isinstance(done, CheckDone) and done.passed
    assert isinstance(p.handle(WorkRequested("a"))[0], RunFinished)


# --- the coordinator confirms what verifiers agree failed (`defence.check_confirm`) ------------


def test_two_colluding_verifiers_cannot_frame_when_the_coordinator_confirms() -> None:
    """Two verifiers agree b's honest work differs: with `check_confirm`, that only asks the
    coordinator to replay it; its replay matches, b keeps its credit and the two liars are
    overruled (banned at the defaults)."""
    t = two(check_confirm="coordinator")
    p = t.p
    check_id = check_of(p, "b")
    samples = p.peers["b"].samples
    assign(p, "a", check_id)
    assign(p, "c", check_id)
    lie = scaled(t.deltas["b"], -1.0)
    assert report(p, "a", check_id, lie) == [CheckReported(check_id, "b", 0, "a")]
    reported, ask = report(p, "c", check_id, lie)
    assert reported == CheckReported(check_id, "b", 0, "c")
    assert isinstance(ask, VerifyOrder) and ask.peer_id == "" and ask.check_id == check_id
    assert p.checks[check_id].confirming and p.peers["b"].standing.strikes == 0
    got = ask_idle(p, "d")  # no verifier is asked any more
    assert not (isinstance(got, VerifyOrder) and got.check_id == check_id)
    # a restart keeps the check waiting on the coordinator
    doc = json.loads(json.dumps(check_to_json(p.checks[check_id])))
    assert check_from_json(doc, lambda ref: p.checks[check_id].delta).confirming
    decisions = report(p, "", check_id, t.deltas["b"])  # the coordinator's replay matches
    done = decisions[0]
    assert isinstance(done, CheckDone) and done.passed
    assert p.peers["b"].samples == samples and p.peers["b"].standing.strikes == 0
    banned = {d.peer_id for d in decisions if isinstance(d, Banned)}
    assert banned == {"a", "c"}
    overruled = [v for v in p.verdicts if v.outcome == "verifier_overruled"]
    assert {v.peer_id for v in overruled} == {"a", "c"}
    assert all("the coordinator's replay" in v.reason for v in overruled)


def test_a_cheat_fails_once_the_coordinator_confirms_and_its_verifiers_stay_clean() -> None:
    t = two(check_confirm="coordinator")
    p = t.p
    check_id = check_of(p, "b")
    assign(p, "a", check_id)
    assign(p, "c", check_id)
    honest_replay = rand(90)  # b's contribution was not this work
    report(p, "a", check_id, honest_replay)
    report(p, "c", check_id, honest_replay)
    decisions = report(p, "", check_id, honest_replay)
    done = decisions[0]
    assert isinstance(done, CheckDone) and not done.passed
    assert any(isinstance(d, Flagged) and d.peer_id == "b" for d in decisions)
    assert p.peers["a"].standing.strikes == 0 and p.peers["c"].standing.strikes == 0
