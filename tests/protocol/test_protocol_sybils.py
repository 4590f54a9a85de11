"""Fresh identities (sybils) against the screening stages: the norm stage measures against the
median of established peers' updates once a round has two, and peers on probation together hold
at most `defence.probation_share` of a round's aggregation weight, however many they are."""

from __future__ import annotations

from test_protocol_defence import TRUST_FAST, closed_of, join, make, order, play, rand, submit

from crowdtrain.protocol import Decision, Flagged, PeerJoined, RoundProtocol
from crowdtrain.robust.reputation import is_trusted

HONEST = ("a", "b", "c")


def established(**defence: object) -> RoundProtocol:
    """Round 0 played by three honest peers, who are established after it."""
    p, _ = make(
        defence={"spot_check": "off", "score_per_round": 0, **TRUST_FAST, **defence},
        rounds={"quorum": 3},
    )
    join(p, *HONEST)
    play(p, {x: rand(i + 1) for i, x in enumerate(HONEST)})
    assert all(is_trusted(p.peers[x].standing, p.config.defence) for x in HONEST)
    return p


def flood_round(
    p: RoundProtocol, sybils: list[str], joined: tuple[str, ...] = ()
) -> list[Decision]:
    """The SYBILS (and JOINED) join; everyone takes an order; the sybils send tiny random
    updates, then the honest peers their own."""
    join(p, *joined, *sybils)
    order(p, *HONEST, *sybils)
    decisions: list[Decision] = []
    for i, x in enumerate(sybils):
        decisions += submit(p, x, rand(50 + i, norm=1e-3))
    for i, x in enumerate(HONEST):
        decisions += submit(p, x, rand(10 + i))
    return decisions


def test_sybils_sending_tiny_updates_cannot_make_established_peers_look_too_large() -> None:
    p = established()
    sybils = [f"s{i}" for i in range(6)]  # twice the honest peers
    decisions = flood_round(p, sybils)
    closed = closed_of(decisions)
    assert set(closed.contributors) == set(HONEST)
    flagged = {d.peer_id: d for d in decisions if isinstance(d, Flagged)}
    assert set(flagged) == set(sybils)
    assert all("established peers' updates" in f.reason for f in flagged.values())
    assert all(p.peers[x].standing.strikes == 0 for x in HONEST)


def test_peers_on_probation_hold_at_most_their_share_of_the_weight() -> None:
    p = established(probation_share=0.25)
    fresh = [f"n{i}" for i in range(6)]
    join(p, *fresh)
    order(p, *HONEST, *fresh)
    decisions = []
    for i, x in enumerate([*HONEST, *fresh]):
        decisions += submit(p, x, rand(20 + i))
    closed = closed_of(decisions)
    weights = dict(zip(closed.contributors, closed.weights, strict=True))
    assert set(weights) == {*HONEST, *fresh}
    share = sum(weights[x] for x in fresh) / sum(weights.values())
    assert abs(share - 0.25) < 1e-9  # 6 newcomers at half weight would hold 50%
    assert len({weights[x] for x in HONEST}) == 1 and len({weights[x] for x in fresh}) == 1


def test_a_round_of_newcomers_only_keeps_its_weights() -> None:
    p, _ = make(defence={"spot_check": "off", "score_per_round": 0}, rounds={"quorum": 3})
    join(p, *HONEST)
    closed = closed_of(play(p, {x: rand(i + 1) for i, x in enumerate(HONEST)}))
    assert len(set(closed.weights)) == 1 and closed.weights[0] > 0


def test_seed_volunteers_hold_the_reference_from_round_zero() -> None:
    """Sybils present from the first round outvote fresh honest peers' norms; two seed
    volunteers (the organizer vouches for them) are established from the start, so the
    round-0 median is theirs and the sybils' tiny updates are the ones refused."""
    p, _ = make(
        defence={"spot_check": "off", "score_per_round": 0, **TRUST_FAST},
        rounds={"quorum": 3},
    )
    p.handle(PeerJoined("a", "a", seed=True))
    p.handle(PeerJoined("b", "b", seed=True))
    join(p, "c")
    assert is_trusted(p.peers["a"].standing, p.config.defence)
    assert not is_trusted(p.peers["c"].standing, p.config.defence)
    sybils = [f"s{i}" for i in range(8)]
    decisions = flood_round(p, sybils)
    closed = closed_of(decisions)
    assert set(closed.contributors) == set(HONEST)
    flagged = {d.peer_id for d in decisions if isinstance(d, Flagged)}
    assert flagged == set(sybils)
    # the same round without seeds: the sybils' median makes every honest update too large
    q, _ = make(
        defence={"spot_check": "off", "score_per_round": 0, **TRUST_FAST},
        rounds={"quorum": 1},
    )
    decisions = flood_round(q, sybils, joined=HONEST)
    assert {d.peer_id for d in decisions if isinstance(d, Flagged)} == set(HONEST)
    # a seed joining again keeps its standing; an ordinary re-join does not promote anyone
    join(p, "d")
    p.handle(PeerJoined("d", "d", seed=True))
    assert not is_trusted(p.peers["d"].standing, p.config.defence)
