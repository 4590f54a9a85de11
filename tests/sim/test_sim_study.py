"""`sim.study`: a discrete-event scenario measured against the data-parallel references."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from crowdtrain.sim.des import Target
from crowdtrain.sim.population import PeerSpec
from crowdtrain.sim.scenario import des_setup, load_scenario
from crowdtrain.sim.study import ddp_per_peer, run_study
from crowdtrain_testing import tiny_des_toml

DDP = """
[report]
method = "ddp"
ddp_max_steps = 12
ddp_eval_every = 4
"""


def scenario_file(tmp_path: Path, corpus: Path, extra: str = "", rtt_s: float = 0.05) -> Path:
    path = tmp_path / "tiny.toml"
    text = tiny_des_toml(corpus, tmp_path / "data", extra)
    path.write_text(text.replace("rtt_s = 0.05", f"rtt_s = {rtt_s}"))
    return path


def test_ddp_on_ideal_links_is_the_datacenter(corpus_file: Path, tmp_path: Path) -> None:
    fat = DDP.replace("[report]", "[report]\nallreduce_bytes_per_param = 0.001")
    scenario = load_scenario(str(scenario_file(tmp_path, corpus_file, fat, rtt_s=0.0)))
    study = run_study(scenario)
    report = study.report
    assert study.sim is None and study.ddp.steps == [0, 4, 8, 12]
    assert report["target_loss"] == pytest.approx(study.ddp.eval_loss[-1], abs=1e-4)
    # identical peers, links that never bind: DDP on them is the datacenter ideal exactly
    assert report["efficiency_vs_datacenter"] == pytest.approx(1.0)
    assert report["ddp_wan_efficiency"] == pytest.approx(1.0)
    assert report["utilization"]["median"] == pytest.approx(1.0)
    json.dumps(study.to_json(), allow_nan=False)


def test_ddp_over_slow_links_is_paced_by_the_all_reduce(corpus_file: Path, tmp_path: Path) -> None:
    scenario = load_scenario(str(scenario_file(tmp_path, corpus_file, DDP)))
    setup = des_setup(scenario)
    report = run_study(scenario, setup=setup).report
    # 2 peers: the ring sends (2 − 1)/2 × 2 × 1e6 × 2 B = 2 MB each way per step at 10 Mbit/s
    peer = setup.population[0]
    compute = 6 * 1e6 * 1000 / (peer.flops * peer.mfu)
    step = max(1e6 * 2 * 8 / 10e6 + 0.05, compute)
    assert report["efficiency_vs_datacenter"] == pytest.approx(compute / step, rel=1e-3)
    assert report["utilization"]["median"] == pytest.approx(compute / step, rel=1e-3)


def test_the_reference_trains_until_the_swarms_loss(corpus_file: Path, tmp_path: Path) -> None:
    extra = "[report]\nddp_eval_every = 2\n"
    scenario = load_scenario(str(scenario_file(tmp_path, corpus_file, extra)))
    study = run_study(scenario)
    assert study.sim is not None and len(study.sim.rounds) == 3
    target = study.report["target_loss"]
    assert target == pytest.approx(study.sim.final_eval_loss, abs=1e-4)
    ddp = study.ddp
    assert ddp.eval_loss[-1] <= target < min(ddp.eval_loss[:-1])  # stopped once it got there
    assert ddp.steps[-1] < 2 * 3 * 4  # before its step limit
    # the target is the final loss rounded up, reached just before the last close
    swarm_s = study.report["time_to_target_s"]["swarm"]
    assert swarm_s == pytest.approx(study.sim.rounds[-1]["close_time_s"], rel=1e-3)
    assert swarm_s > study.sim.rounds[-2]["close_time_s"]


def test_ddp_per_peer_counts_compute_and_ring_bytes() -> None:
    peers = [PeerSpec(f"p{i}", flops=f, mfu=0.5, up_bps=1e8, down_bps=1e8, rtt_s=0.0)
             for i, f in enumerate((1e12, 2e12))]  # fmt: skip
    target = Target(params=100, tokens_per_step=10, bytes_per_param_up=1.0,
                    bytes_per_param_down=4.0, steps_per_proxy_step=2.0)  # fmt: skip
    rows = ddp_per_peer(peers, target, 5, 100.0, {"p1": [(0.0, 50.0)]}, 2.0)
    flop = 5 * 2 * 6 * 100 * 10
    assert rows["p0"]["compute_s"] == pytest.approx(flop / 0.5e12)
    assert rows["p1"]["compute_s"] == pytest.approx(flop / 1e12)
    assert rows["p0"]["online_s"] == 100.0 and rows["p1"]["online_s"] == 50.0
    assert rows["p0"]["bytes_up"] == rows["p0"]["bytes_down"] == pytest.approx(10 * 100 * 2)
    assert rows["p0"]["utilization"] == pytest.approx(flop / 0.5e12 / 100)
    assert math.isfinite(rows["p1"]["utilization"])


def test_a_swarm_too_large_to_simulate_is_extrapolated_and_says_so() -> None:
    scenario = load_scenario("folding-at-home")
    assert scenario.report.method == "analytic"
    assert scenario.population is not None and scenario.population.peers == 10_000
    study = run_study(scenario)
    report = study.to_json()
    assert study.sim is None and study.ddp is None and report["extrapolated"] is True
    assert report["time_to_target_s"] is None  # no numerics, no loss curve
    assert 0 < report["efficiency_vs_datacenter"] < 1
    assert report["efficiency_vs_datacenter"] == report["throughput"]["useful_flop_fraction"]
    assert 0 < report["ddp_wan_efficiency"] < 0.01  # synchronous steps over home uplinks
    assert any("extrapolated" in note for note in report["notes"])
    json.dumps(report, allow_nan=False)
