"""The discrete-event simulator: round durations in virtual time follow the cost model exactly,
churn lapses orders, and the real numerics still train."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from crowdtrain.config import CodecConfig, RunConfig
from crowdtrain.protocol import WorkOrder
from crowdtrain.sim.des import SimResult, Target, bytes_per_param, fitted_steps, simulate
from crowdtrain.sim.network import LATENCY_RTTS, transfer_time
from crowdtrain.sim.population import PeerSpec, flops_per_step, step_seconds
from crowdtrain_testing import tiny_config

TARGET = Target(params=1_000_000, tokens_per_step=1000, bytes_per_param_up=1.0,
                bytes_per_param_down=4.0)  # fmt: skip
UP, DOWN, RTT = 10e6, 100e6, 0.05
STEPS = 8  # inner.steps of tiny_config


def peer(i: int, flops: float = 1e12) -> PeerSpec:
    return PeerSpec(f"peer-{i}", flops=flops, mfu=0.5, up_bps=UP, down_bps=DOWN, rtt_s=RTT)


def compute_s(p: PeerSpec, steps: int = STEPS) -> float:
    return steps * step_seconds(flops_per_step(TARGET.params, TARGET.tokens_per_step), p)


DOWNLOAD = transfer_time(TARGET.download_bytes, DOWN, RTT)
UPLOAD = transfer_time(TARGET.upload_bytes, UP, RTT)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("des") / "data"


def config(corpus: Path, data: Path, **overrides: dict[str, object]) -> RunConfig:
    """The tiny run, without overlap unless `inner` turns it on (the cost model in its plainest
    form: download, compute, upload)."""
    rounds: dict[str, object] = {"total": 3, "quorum": 2, **overrides.pop("rounds", {})}
    inner: dict[str, object] = {"overlap": False, **overrides.pop("inner", {})}
    defence = {"enabled": False, **overrides.pop("defence", {})}
    return tiny_config(corpus, data, rounds=rounds, inner=inner, defence=defence, **overrides)


def run(cfg: RunConfig, peers: list[PeerSpec], **kwargs: Any) -> SimResult:
    """The simulation with the corpus in every peer's cache (unless the test says otherwise),
    so that a round's transfers are θ down and Δ up only."""
    kwargs.setdefault("shards_cached", True)
    return simulate(cfg, peers, TARGET, eval_batches=2, eval_batch_size=4, **kwargs)


def durations(result: SimResult) -> list[float]:
    return [r["duration_s"] for r in result.rounds]


def test_identical_peers_rounds_last_download_compute_upload(
    corpus_file: Path, data_dir: Path
) -> None:
    peers = [peer(i) for i in range(3)]
    rows: list[dict[str, Any]] = []
    result = run(config(corpus_file, data_dir), peers, on_round=rows.append)
    one = DOWNLOAD + compute_s(peers[0]) + UPLOAD
    assert [r["round"] for r in result.rounds] == [0, 1, 2]
    assert rows == result.rounds
    assert durations(result) == pytest.approx([one] * 3)
    assert [r["close_time_s"] for r in result.rounds] == pytest.approx([one, 2 * one, 3 * one])
    assert result.virtual_time_s == pytest.approx(3 * one)
    assert all(r["contributions"] == 3 for r in result.rounds)
    for stats in result.per_peer.values():
        assert stats["compute_s"] == pytest.approx(3 * compute_s(peers[0]))
        assert stats["online_s"] == pytest.approx(3 * one)
        assert stats["utilization"] == pytest.approx(compute_s(peers[0]) / one)
        assert stats["bytes_up"] == 3 * TARGET.upload_bytes
        assert stats["bytes_down"] == 3 * TARGET.download_bytes
        assert stats["contributions"] == 3
    # the real numerics trained: the loss falls, and the result is JSON
    assert result.final_eval_loss < result.initial_eval_loss
    assert result.final_eval_loss == result.rounds[-1]["eval_loss"]
    doc = json.loads(json.dumps(result.to_json()))
    assert doc["rounds"] == result.rounds
    assert set(doc["per_peer"]["peer-0"]) >= {"compute_s", "online_s", "utilization"}
    assert doc["events"] == result.events > 0


def test_runs_are_deterministic(corpus_file: Path, data_dir: Path) -> None:
    cfg = config(corpus_file, data_dir, rounds={"total": 2})
    peers = [peer(0), peer(1, flops=0.7e12)]
    assert run(cfg, peers).to_json() == run(cfg, peers).to_json()


def test_a_slow_peer_sets_the_pace(corpus_file: Path, data_dir: Path) -> None:
    fast, slow = peer(0), peer(1, flops=0.5e12)
    result = run(config(corpus_file, data_dir), [fast, slow])
    assert compute_s(slow) == pytest.approx(2 * compute_s(fast))
    one = DOWNLOAD + compute_s(slow) + UPLOAD
    assert durations(result) == pytest.approx([one] * 3)
    total = 3 * one
    assert result.per_peer["peer-0"]["utilization"] == pytest.approx(3 * compute_s(fast) / total)
    assert result.per_peer["peer-1"]["utilization"] == pytest.approx(3 * compute_s(slow) / total)


def test_a_narrow_coordinator_ingress_serialises_uploads(corpus_file: Path, data_dir: Path) -> None:
    peers = [peer(0), peer(1)]
    result = run(config(corpus_file, data_dir), peers, coordinator_in_bps=UP)
    transmit = TARGET.upload_bytes * 8 / UP
    one = DOWNLOAD + compute_s(peers[0]) + LATENCY_RTTS * RTT + 2 * transmit
    assert durations(result) == pytest.approx([one] * 3)
    wide = run(config(corpus_file, data_dir, rounds={"total": 1}), peers)
    assert durations(wide)[0] == pytest.approx(one - transmit)


def test_a_peer_that_vanishes_mid_round_lapses_after_the_heartbeat_timeout(
    corpus_file: Path, data_dir: Path
) -> None:
    cfg = config(corpus_file, data_dir, rounds={"deadline_s": 10.0, "peer_timeout_s": 1.0})
    peers = [peer(i) for i in range(3)]
    one = DOWNLOAD + compute_s(peers[0]) + UPLOAD
    result = run(cfg, peers, online={"peer-2": [(0.0, 0.5 * DOWNLOAD)]})
    # Ticks (and heartbeats) every second: peer-2, last heard at 0, is gone at the tick at 2 s,
    # when more than peer_timeout_s has passed; the round closes then, not at its deadline.
    assert [r["close_time_s"] for r in result.rounds] == pytest.approx([2.0, 2 + one, 2 + 2 * one])
    # With rare ticks the deadline comes first.
    rare = run(cfg, peers, online={"peer-2": [(0.0, 0.5 * DOWNLOAD)]}, tick_s=60.0)
    assert [r["close_time_s"] for r in rare.rounds] == pytest.approx([10.0, 10 + one, 10 + 2 * one])
    assert [r["contributions"] for r in result.rounds] == [2, 2, 2]
    gone = result.per_peer["peer-2"]
    assert gone["bytes_down"] == 0 and gone["contributions"] == 0 and gone["compute_s"] == 0
    assert gone["online_s"] == pytest.approx(0.5 * DOWNLOAD)
    # saying goodbye instead: the protocol knows at once and does not wait for the deadline
    told = run(cfg, peers, online={"peer-2": [(0.0, 0.5 * DOWNLOAD)]}, goodbye=True)
    assert durations(told) == pytest.approx([one] * 3)


def test_a_peer_that_comes_back_resumes_its_order(corpus_file: Path, data_dir: Path) -> None:
    cfg = config(corpus_file, data_dir, rounds={"total": 1, "deadline_s": 10.0})
    peers = [peer(i) for i in range(3)]
    one = DOWNLOAD + compute_s(peers[0]) + UPLOAD
    schedule = {"peer-2": [(0.0, 0.5), (3.0, math.inf)]}
    result = run(cfg, peers, online=schedule)
    assert result.rounds[0]["contributions"] == 3
    # θ had arrived before it left (at 0.5 s > DOWNLOAD), so it trains from its cache
    assert DOWNLOAD < 0.5
    assert result.rounds[0]["close_time_s"] == pytest.approx(3.0 + one - DOWNLOAD)
    assert result.per_peer["peer-2"]["online_s"] == pytest.approx(0.5 + one - DOWNLOAD)


def test_seconds_budget_fits_steps_to_each_peer(corpus_file: Path, data_dir: Path) -> None:
    fast, slow = peer(0), peer(1, flops=0.5e12)
    step = compute_s(fast, steps=1)
    budget = 8.5 * step
    cfg = config(corpus_file, data_dir, inner={"budget": "seconds", "seconds": budget})
    result = run(cfg, [fast, slow])
    # the step that crosses the budget is trained too, as LocalTrainer checks after each step
    assert result.per_peer["peer-0"]["steps"] == 3 * 9
    assert result.per_peer["peer-1"]["steps"] == 3 * 5
    assert result.per_peer["peer-1"]["compute_s"] == pytest.approx(3 * compute_s(slow, steps=5))
    order = WorkOrder("p", 0, 0, ("s",), 0, 0, "seconds", 50, 1.0, 10.0)
    assert [fitted_steps(order, s) for s in (0.1, 0.3, 0.25, 2.0)] == [10, 4, 4, 1]
    assert fitted_steps(dataclasses.replace(order, budget="steps"), 2.0) == 50


def test_a_run_that_cannot_reach_its_quorum_says_so(corpus_file: Path, data_dir: Path) -> None:
    cfg = config(corpus_file, data_dir, rounds={"deadline_s": 5.0})
    with pytest.raises(RuntimeError, match="stalled at round 0"):
        run(cfg, [peer(0)])
    with pytest.raises(RuntimeError, match="stalled at round 0"):
        run(cfg, [peer(0), peer(1)], online={"peer-1": [(0.0, 0.1)]})


def test_bad_inputs_are_refused(corpus_file: Path, data_dir: Path) -> None:
    cfg = config(corpus_file, data_dir)
    with pytest.raises(ValueError, match="not in the population"):
        run(cfg, [peer(0), peer(1)], online={"peer-9": [(0.0, 1.0)]})
    with pytest.raises(ValueError, match="online intervals"):
        run(cfg, [peer(0), peer(1)], online={"peer-1": [(0.0, 2.0), (1.0, 3.0)]})
    with pytest.raises(ValueError, match="bytes_per_param_up"):
        Target(params=10, tokens_per_step=10, bytes_per_param_up=0.0, bytes_per_param_down=4.0)
    assert bytes_per_param(CodecConfig(name="int8", block_size=64)) == pytest.approx(
        1 + 4 / 64, rel=1e-3
    )


def test_steps_per_proxy_step_scales_compute_time(corpus_file: Path, data_dir: Path) -> None:
    k = 3.0
    scaled = dataclasses.replace(TARGET, steps_per_proxy_step=k)
    assert scaled.flops_per_proxy_step == pytest.approx(k * TARGET.flops_per_step)
    peers = [peer(0), peer(1, flops=0.5e12)]
    cfg = config(corpus_file, data_dir, rounds={"total": 2})
    result = simulate(cfg, peers, scaled, eval_batches=2, eval_batch_size=4, shards_cached=True)
    one = DOWNLOAD + k * compute_s(peers[1]) + UPLOAD  # the slow peer sets the pace
    assert durations(result) == pytest.approx([one] * 2)
    assert result.per_peer["peer-0"]["steps"] == 2 * STEPS  # proxy steps, each worth k
    assert result.per_peer["peer-0"]["compute_s"] == pytest.approx(2 * k * compute_s(peers[0]))
    # a seconds budget trains whole proxy steps, each costing k target steps
    budget = 8.5 * k * compute_s(peers[0], steps=1)
    cfg = config(corpus_file, data_dir, rounds={"total": 1}, inner={"budget": "seconds",
                 "seconds": budget})  # fmt: skip
    result = simulate(cfg, peers, scaled, eval_batches=2, eval_batch_size=4, shards_cached=True)
    assert result.per_peer["peer-0"]["steps"] == 9
    assert result.per_peer["peer-1"]["steps"] == 5
    with pytest.raises(ValueError, match="steps_per_proxy_step"):
        dataclasses.replace(TARGET, steps_per_proxy_step=0.0)


def test_overlap_hides_communication_behind_the_next_rounds_compute(
    corpus_file: Path, data_dir: Path
) -> None:
    slow = [peer(i, flops=1e10) for i in range(3)]  # 1.2 s a step: compute outlasts transfers
    step, c = compute_s(slow[0], steps=1), compute_s(slow[0])
    assert c > DOWNLOAD + UPLOAD
    cfg = config(corpus_file, data_dir, inner={"overlap": True})
    result = run(cfg, slow)
    # Round 0 downloads, computes and uploads; from then on a peer keeps training round r's
    # order while its Δ travels and θ_{r+1} arrives, so a round lasts exactly its compute.
    assert durations(result) == pytest.approx([DOWNLOAD + c + UPLOAD, c, c])
    ahead = math.ceil((UPLOAD + DOWNLOAD) / step)  # steps trained ahead, a step under way ends
    assert 0 < ahead < STEPS
    for stats in result.per_peer.values():
        assert stats["steps"] == 3 * STEPS  # speculation after the last round is not counted
        assert stats["first_compute_s"] == pytest.approx(DOWNLOAD)
    assert result.final_eval_loss < result.initial_eval_loss
    plain = run(config(corpus_file, data_dir), slow)
    assert min(p["utilization"] for p in result.per_peer.values()) > max(
        p["utilization"] for p in plain.per_peer.values()
    )


def test_overlap_is_capped_at_one_rounds_budget(corpus_file: Path, data_dir: Path) -> None:
    fast = [peer(i) for i in range(3)]  # 0.012 s a step: transfers outlast a round's compute
    cfg = config(corpus_file, data_dir, inner={"overlap": True})
    result = run(cfg, fast)
    # Round 0 as without overlap; then the whole budget is trained ahead, so a round is the
    # upload and the download only.
    one = DOWNLOAD + compute_s(fast[0]) + UPLOAD
    assert durations(result) == pytest.approx([one, DOWNLOAD + UPLOAD, DOWNLOAD + UPLOAD])
    for stats in result.per_peer.values():
        assert stats["steps"] == 3 * STEPS
        assert stats["utilization"] > compute_s(fast[0]) / one


def test_overlapped_contributions_pass_exact_spot_checks(corpus_file: Path, data_dir: Path) -> None:
    slow = [peer(i, flops=1e10) for i in range(3)]
    defence = {"enabled": True, "spot_check": "peer", "check_p_new": 1.0, "check_p_min": 1.0}
    cfg = config(corpus_file, data_dir, inner={"overlap": True}, defence=defence,
                 rounds={"total": 4})  # fmt: skip
    result = run(cfg, slow)
    passed = result.verdicts.get("spot_check:check_passed", 0)
    # Peers verify only while they have no work of their own (these three finish together),
    # so some checks expire; every replay that ran matched.
    assert passed >= 2, result.verdicts
    assert set(result.verdicts) <= {"spot_check:check_passed", "spot_check:check_expired"}
    assert all(r["outcome"] == "check_expired" for r in result.to_json()["refusals"])


def test_the_coordinators_close_time_delays_the_next_base(
    corpus_file: Path, data_dir: Path
) -> None:
    peers = [peer(i) for i in range(3)]
    close = 0.25
    result = run(config(corpus_file, data_dir), peers, coordinator_close_s=close)
    one = DOWNLOAD + compute_s(peers[0]) + UPLOAD
    assert durations(result) == pytest.approx([one + close] * 3)
    assert result.virtual_time_s == pytest.approx(3 * (one + close))


def test_a_close_that_costs_by_contributions_is_charged_per_round(
    corpus_file: Path, data_dir: Path
) -> None:
    peers = [peer(i) for i in range(3)]
    result = run(config(corpus_file, data_dir), peers, coordinator_close_s=lambda k: 0.1 * k)
    one = DOWNLOAD + compute_s(peers[0]) + UPLOAD
    assert [r["close_s"] for r in result.rounds] == pytest.approx([0.3] * 3)
    assert durations(result) == pytest.approx([one + 0.3] * 3)


def test_crashes_mid_round_lose_work_and_the_volunteer_comes_back(
    corpus_file: Path, data_dir: Path
) -> None:
    cfg = config(corpus_file, data_dir, rounds={"total": 4, "deadline_s": 30.0,
                 "peer_timeout_s": 4.0})  # fmt: skip
    peers = [peer(i) for i in range(3)]
    result = run(cfg, peers, fail_mid_round=0.3, restart_s=1.0)
    failures = sum(p["failures"] for p in result.per_peer.values())
    assert failures > 0
    assert len(result.rounds) == 4
    done = sum(p["contributions"] for p in result.per_peer.values())
    assert done == sum(r["contributions"] for r in result.rounds) < 4 * 3 + failures
    with pytest.raises(ValueError, match="fail_mid_round"):
        run(cfg, peers, fail_mid_round=1.5)
    with pytest.raises(ValueError, match="coordinator_close_s"):
        run(cfg, peers, coordinator_close_s=-1.0)


def test_peers_fetch_the_shards_they_lack_once(corpus_file: Path, data_dir: Path) -> None:
    cfg = config(corpus_file, data_dir, rounds={"total": 2})
    peers = [peer(i) for i in range(2)]
    cold = run(cfg, peers, shards_cached=False)
    warm = run(cfg, peers)
    for pid, stats in cold.per_peer.items():
        extra = stats["bytes_down"] - warm.per_peer[pid]["bytes_down"]
        assert extra > 0 and extra % 8192 == 0  # whole shards of the tiny corpus
    # the first round waits for the shards: one more request each, one after the other
    assert durations(cold)[0] > durations(warm)[0] + RTT


def test_a_compressed_broadcast_is_downloaded_by_returning_peers(
    corpus_file: Path, data_dir: Path
) -> None:
    """A peer holding the previous version downloads the update instead of θ: the first round
    costs a full download, every later one the update's bytes."""
    cfg = config(corpus_file, data_dir, broadcast={"codec": "int8"})
    target = dataclasses.replace(TARGET, bytes_per_param_update=1.03)
    peers = [peer(i) for i in range(3)]
    result = simulate(cfg, peers, target, eval_batches=2, eval_batch_size=4, shards_cached=True)
    update = transfer_time(target.update_bytes or 0, DOWN, RTT)
    compute, upload = compute_s(peers[0]), UPLOAD
    assert durations(result) == pytest.approx(
        [DOWNLOAD + compute + upload, *([update + compute + upload] * 2)]
    )
    for stats in result.per_peer.values():
        assert stats["bytes_down"] == TARGET.download_bytes + 2 * (target.update_bytes or 0)
    with pytest.raises(ValueError, match="bytes_per_param_update"):
        dataclasses.replace(TARGET, bytes_per_param_update=0.0)
