"""The analytic throughput model: hand-computed rounds with and without overlap, deadlines,
the coordinator bound, churn, a 10,000-peer swarm and one-sentence errors on bad input."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from crowdtrain.config import RunConfig, parse_config
from crowdtrain.sim.analytic import Throughput, extrapolate, extrapolate_peers
from crowdtrain.sim.des import Target
from crowdtrain.sim.population import PeerSpec, draw_population, online_fraction
from crowdtrain.sim.scenario import load_scenario

# A target step is 6 × 1000 × 1000 = 6e6 FLOPs; θ is 4000 B = 32,000 bit, Δ 1000 B = 8000 bit.
TARGET = Target(params=1000, tokens_per_step=1000, bytes_per_param_up=1.0,
                bytes_per_param_down=4.0)  # fmt: skip
# A: 6 s a step, so 10 steps = 60 s in the budget; θ in 32 s, Δ in 8 s.
# B: 12 s a step, 5 steps = 60 s; θ at 400 bit/s in 80 s, Δ at 200 bit/s in 40 s.
A = PeerSpec("a", flops=1e6, mfu=1.0, up_bps=1000.0, down_bps=1000.0, rtt_s=0.0)
B = PeerSpec("b", flops=5e5, mfu=1.0, up_bps=200.0, down_bps=400.0, rtt_s=0.0)
NO_CHURN: dict[str, Any] = {
    "online_fraction": 1.0,
    "mean_session_s": math.inf,
    "coordinator_in_bps": math.inf,
    "coordinator_out_bps": math.inf,
}


def config(overlap: bool, deadline_s: float = 300.0, **rounds: Any) -> RunConfig:
    return parse_config(
        {
            "inner": {"budget": "seconds", "seconds": 60.0, "overlap": overlap},
            "rounds": {"deadline_s": deadline_s, **rounds},
        }
    )


def test_two_peers_without_overlap_add_transfers_to_compute() -> None:
    t = extrapolate(config(False), [A, B], TARGET, **NO_CHURN)
    # A: 32 + 60 + 8 = 100 s; B: 80 + 60 + 40 = 180 s, and the round waits for B.
    assert t.round_s == pytest.approx(180.0)
    assert t.utilization == pytest.approx(60 / 180)
    assert t.useful_flop_fraction == pytest.approx(60 / 180)
    assert t.contributors_per_round == pytest.approx(2.0)
    assert t.tokens_per_s == pytest.approx((10 + 5) * 1000 / 180)
    assert t.bytes_per_peer_per_round == 5000
    assert t.online_peers == 2.0 and not t.coordinator_bound and t.extrapolated


def test_two_peers_with_overlap_hide_transfers_behind_compute() -> None:
    t, peers = extrapolate_peers(config(True), [A, B], TARGET, **NO_CHURN)
    # A: max(60, 32 + 8) = 60 s; B: max(60, 80 + 40) = 120 s sets the round.
    assert t.round_s == pytest.approx(120.0)
    assert t.utilization == pytest.approx(0.5)
    assert list(peers.submit_s) == pytest.approx([60.0, 120.0])
    assert list(peers.steps) == [10, 5] and list(peers.compute_s) == pytest.approx([60.0, 60.0])
    assert list(peers.download_s) == pytest.approx([32.0, 80.0])
    assert list(peers.upload_s) == pytest.approx([8.0, 40.0])
    # The coordinator's close adds to the round without overlap, and hides behind B's transfers
    # with it: B's period is max(60, 80 + 40 + 10) = 130 s.
    closing = {**NO_CHURN, "close_s": 10.0}
    assert extrapolate(config(False), [A, B], TARGET, **closing).round_s == pytest.approx(190.0)
    assert extrapolate(config(True), [A, B], TARGET, **closing).round_s == pytest.approx(130.0)


def test_latency_counts_one_and_a_half_round_trips_per_transfer() -> None:
    slow = PeerSpec("a", flops=1e6, mfu=1.0, up_bps=1000.0, down_bps=1000.0, rtt_s=2.0)
    t = extrapolate(config(False), [slow], TARGET, **NO_CHURN)
    assert t.round_s == pytest.approx(100.0 + 2 * 1.5 * 2.0)


def test_a_peer_that_misses_the_deadline_contributes_nothing() -> None:
    t, peers = extrapolate_peers(config(False, deadline_s=150.0), [A, B], TARGET, **NO_CHURN)
    # B needs 180 s: it holds the round to the deadline and its compute is lost.
    assert t.round_s == pytest.approx(150.0)
    assert list(peers.keeps_pace) == [True, False]
    assert list(peers.utilization) == pytest.approx([60 / 150, 0.0])
    assert t.contributors_per_round == pytest.approx(1.0)
    assert t.tokens_per_s == pytest.approx(10 * 1000 / 150)
    assert t.useful_flop_fraction == pytest.approx((60 / 150) * 1e6 / 1.5e6)


def test_a_quorum_beyond_the_deadline_holds_the_round_until_it_is_met() -> None:
    t = extrapolate(config(False, deadline_s=150.0, quorum=2), [A, B], TARGET, **NO_CHURN)
    assert t.round_s == pytest.approx(180.0, rel=1e-6)
    assert t.contributors_per_round == pytest.approx(2.0, rel=1e-6)
    assert any("quorum" in note for note in t.notes)


def test_the_coordinators_egress_sets_the_round_and_the_flag() -> None:
    links = {**NO_CHURN, "coordinator_out_bps": 500.0}
    t = extrapolate(config(False), [A, B], TARGET, **links)
    # Max-min fair shares of 500 bit/s: 250 each (both links are faster), θ in 128 s.
    # A: 128 + 60 + 8 = 196 s; B: 128 + 60 + 40 = 228 s, against 180 s unlimited.
    assert t.round_s == pytest.approx(228.0)
    assert t.coordinator_bound
    assert any("coordinator's links are the bound" in note for note in t.notes)
    # A share above B's 400 bit/s: B keeps its link, A gets the rest (600 bit/s, capped at 1000).
    t = extrapolate(config(False), [A, B], TARGET, **{**NO_CHURN, "coordinator_out_bps": 1000.0})
    assert t.round_s == pytest.approx(180.0) and not t.coordinator_bound
    # A coordinator that pushes B past the deadline cuts throughput: bound, round unchanged.
    capped = {**NO_CHURN, "coordinator_in_bps": 150.0}
    t = extrapolate(config(False, deadline_s=200.0), [A, B], TARGET, **capped)
    assert t.round_s == pytest.approx(200.0) and t.coordinator_bound
    assert t.contributors_per_round == pytest.approx(1.0)


def test_the_coordinators_own_transfers_bound_the_round_from_below() -> None:
    many = [PeerSpec(f"p{i}", 1e6, 1.0, 1e9, 1e9, 0.0) for i in range(10)]
    links = {**NO_CHURN, "coordinator_in_bps": 40_000.0}
    t = extrapolate(config(True), many, TARGET, **links)
    # With overlap a peer alone would take max(60, ~0) = 60 s; the coordinator takes in
    # 10 × 8000 bit at 40,000 bit/s = 2 s per round, and each upload at a 4000 bit/s share 2 s.
    assert t.round_s == pytest.approx(60.0)
    links = {**NO_CHURN, "coordinator_in_bps": 800.0}
    t = extrapolate(config(True), many, TARGET, **links)
    assert t.round_s == pytest.approx(10 * 8000 / 800) and t.coordinator_bound


def test_churn_lowers_the_useful_flop_fraction() -> None:
    peers = [PeerSpec(f"p{i}", 1e6, 1.0, 1000.0, 1000.0, 0.0) for i in range(50)]
    still = extrapolate(config(False), peers, TARGET, **NO_CHURN)
    churn = {**NO_CHURN, "online_fraction": 0.75, "mean_session_s": 2 * 3600.0}
    moving = extrapolate(config(False), peers, TARGET, **churn)
    assert still.useful_flop_fraction == pytest.approx(60 / 100)
    assert moving.useful_flop_fraction < still.useful_flop_fraction
    assert moving.round_s > still.round_s  # joiners and silent departures hold rounds
    assert moving.online_peers == pytest.approx(37.5)
    assert moving.contributors_per_round < still.contributors_per_round
    # The longer the sessions, the less is lost.
    longer = extrapolate(config(False), peers, TARGET, **{**churn, "mean_session_s": 1e6})
    assert moving.useful_flop_fraction < longer.useful_flop_fraction < still.useful_flop_fraction


def test_a_session_loses_about_one_round_to_churn() -> None:
    # Sessions long against rounds and no holds (timeout and join window ~0): a synced peer
    # keeps C·e^(−x/S)/R of its time useful, ≈ 1 − R/S here: half a round lost, on average, to
    # the departure that ends a session, and half a round waited for the first order.
    peers = [PeerSpec(f"p{i}", 1e6, 1.0, 1e12, 1e12, 0.0) for i in range(4)]
    cfg = config(False, peer_timeout_s=1e-9, join_window=1e-9)
    _, rows = extrapolate_peers(cfg, peers, TARGET, **{**NO_CHURN, "mean_session_s": 6000.0})
    assert rows.survival[0] == pytest.approx(math.exp(-60 / 6000), rel=1e-6)
    assert rows.utilization[0] == pytest.approx(math.exp(-60 / 6000), rel=1e-3)


def test_crashes_lose_their_work_and_hold_the_round_to_the_deadline() -> None:
    t, rows = extrapolate_peers(config(False), [A, B], TARGET, **NO_CHURN, fail_mid_round=0.1)
    # Neither order crashes with 0.9² = 0.81: 180 s; else the restarted peer holds to 300 s.
    assert t.round_s == pytest.approx(0.81 * 180 + 0.19 * 300)
    assert list(rows.survival) == pytest.approx([0.9, 0.9])
    assert t.utilization == pytest.approx(60 * 0.9 / t.round_s)
    assert any("crash" in note for note in t.notes)
    with pytest.raises(ValueError, match="fail_mid_round must be a probability"):
        extrapolate(config(False), [A, B], TARGET, **NO_CHURN, fail_mid_round=1.5)


def test_max_peers_per_round_leaves_the_others_idle() -> None:
    peers = [PeerSpec(f"p{i}", 1e6, 1.0, 1000.0, 1000.0, 0.0) for i in range(8)]
    t = extrapolate(config(False, max_peers_per_round=2), peers, TARGET, **NO_CHURN)
    assert t.contributors_per_round == pytest.approx(2.0)
    assert t.utilization == pytest.approx(2 / 8 * 60 / 100)


def test_steps_budget_trains_the_same_steps_on_every_peer() -> None:
    inner = {"budget": "steps", "steps": 3, "overlap": False}
    cfg = parse_config({"inner": inner, "rounds": {"deadline_s": 1e4}})
    t, rows = extrapolate_peers(cfg, [A, B], TARGET, **NO_CHURN)
    assert list(rows.compute_s) == pytest.approx([18.0, 36.0])
    assert t.round_s == pytest.approx(80 + 36 + 40)


def test_ten_thousand_peers_of_the_folding_preset() -> None:
    scenario = load_scenario("folding-at-home")
    assert scenario.population is not None and scenario.target is not None
    assert scenario.population.peers == 10_000 and scenario.target.params == 1_000_000_000
    peers = draw_population(scenario.population, scenario.run.seed)
    t = extrapolate(
        scenario.run,
        peers,
        scenario.target.target(scenario.run.codec),
        online_fraction=online_fraction(scenario.population),
        mean_session_s=scenario.population.session_s.mean(),
        coordinator_in_bps=scenario.coordinator.in_bps,
        coordinator_out_bps=scenario.coordinator.out_bps,
    )
    assert isinstance(t, Throughput) and t.extrapolated
    assert t.online_peers == pytest.approx(10_000 / 3)
    assert 0 < t.utilization < 1 and 0 < t.useful_flop_fraction < 1
    assert scenario.run.rounds.quorum <= t.contributors_per_round < t.online_peers
    assert t.round_s <= scenario.run.rounds.deadline_s + 1e-6
    doc = json.loads(json.dumps(t.to_json()))
    assert doc["extrapolated"] is True and doc["notes"] and isinstance(doc["notes"], list)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"online_fraction": 0.0}, "online_fraction must be in"),
        ({"online_fraction": 1.5}, "online_fraction must be in"),
        ({"online_fraction": math.nan}, "online_fraction must be in"),
        ({"mean_session_s": -1.0}, "mean_session_s"),
        ({"mean_session_s": math.nan}, "mean_session_s"),
        ({"coordinator_in_bps": 0.0}, "coordinator_in_bps"),
        ({"coordinator_out_bps": -5.0}, "coordinator_out_bps"),
        ({"close_s": -1.0}, "close_s must be"),
        ({"close_s": math.inf}, "close_s must be"),
    ],
)
def test_bad_arguments_raise_one_sentence(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as err:
        extrapolate(config(False), [A, B], TARGET, **{**NO_CHURN, **kwargs})
    assert "\n" not in str(err.value)


def test_bad_populations_and_quorums_raise_one_sentence() -> None:
    with pytest.raises(ValueError, match="at least one peer"):
        extrapolate(config(False), [], TARGET, **NO_CHURN)
    broken = PeerSpec("z", flops=0.0, mfu=0.5, up_bps=1.0, down_bps=1.0, rtt_s=0.0)
    with pytest.raises(ValueError, match="peer z needs finite positive FLOP/s"):
        extrapolate(config(False), [A, broken], TARGET, **NO_CHURN)
    with pytest.raises(ValueError, match=r"rounds.quorum \(3\) is more than") as err:
        extrapolate(config(False, quorum=3), [A, B], TARGET, **NO_CHURN)
    assert "\n" not in str(err.value)


def test_per_peer_rows_follow_the_population() -> None:
    t, rows = extrapolate_peers(config(False), [B, A], TARGET, **NO_CHURN)
    assert rows.peer_ids == ("b", "a")
    assert float(np.mean(rows.utilization)) == pytest.approx(t.utilization)
