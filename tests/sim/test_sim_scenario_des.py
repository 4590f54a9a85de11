"""Discrete-event scenarios: the [population], [target], [coordinator] and [churn] tables, the
consumer-1b and datacenter presets, and `crowdtrain simulate` running one end to end."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from crowdtrain.cli import app
from crowdtrain.config import BroadcastConfig, CodecConfig, ConfigError
from crowdtrain.sim.des import bytes_per_param
from crowdtrain.sim.population import Uniform, step_seconds
from crowdtrain.sim.scenario import (
    builtin_scenarios,
    default_horizon_s,
    des_setup,
    load_scenario,
    parse_scenario,
)
from crowdtrain_testing import tiny_des_toml

runner = CliRunner()

DES: dict[str, Any] = {
    "population": {"peers": 3},
    "target": {"params": 1_000_000, "tokens_per_step": 1000},
    "run": {"rounds": {"total": 2, "quorum": 2}},
}


def with_(raw: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `raw` with the dotted `path` set to `value` (or removed for `...`)."""
    out = copy.deepcopy(raw)
    *tables, key = path.split(".")
    node = out
    for t in tables:
        node = node.setdefault(t, {})
    if value is ...:
        node.pop(key, None)
    else:
        node[key] = value
    return out


def test_a_scenario_with_population_and_target_is_discrete_event() -> None:
    s = parse_scenario("des", DES)
    assert s.discrete_event and s.population is not None and s.target is not None
    assert s.population.peers == 3
    assert (s.coordinator.in_bps, s.coordinator.out_bps) == (math.inf, math.inf)
    assert s.churn.enabled and s.churn.horizon_s is None and not s.churn.goodbye
    target = s.target.target(s.run.codec)
    assert target.bytes_per_param_up == bytes_per_param(s.run.codec)
    assert target.bytes_per_param_down == 4.0 and target.steps_per_proxy_step == 1.0
    # A run that publishes AdamW moments sends m in bf16 with every θ.
    assert s.target.target(s.run.codec, moments=True).bytes_per_param_down == 6.0
    assert s.run.inner.optimizer_state == "derived"
    assert des_setup(s).target.bytes_per_param_down == 6.0
    # A compressed broadcast: returning peers download its update, measured on its codec.
    assert target.bytes_per_param_update is None
    int8 = BroadcastConfig(codec="int8")
    update = s.target.target(s.run.codec, broadcast=int8).bytes_per_param_update
    assert update == bytes_per_param(int8.spec()) and 1.0 < update < 1.1
    given = {"bytes_per_param_up": 0.5, "bytes_per_param_down": 2.0, "steps_per_proxy_step": 7}
    t = parse_scenario("des", {**DES, "target": {**DES["target"], **given}}).target
    assert t is not None
    target = t.target(CodecConfig(name="fp16"))
    assert (target.bytes_per_param_up, target.bytes_per_param_down) == (0.5, 2.0)
    assert target.steps_per_proxy_step == 7.0
    assert not parse_scenario("swarm", {"swarm": {"peers": 2}}).discrete_event


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        ("target.foo", 1, "unknown scenario key 'target.foo'"),
        ("target.params", 0, "scenario key 'target.params'"),
        ("target.params", ..., "scenario key 'target.params': field required"),
        ("target.steps_per_proxy_step", 0.0, "scenario key 'target.steps_per_proxy_step'"),
        ("target.bytes_per_param_down", -1.0, "scenario key 'target.bytes_per_param_down'"),
        ("target", 5, "scenario key 'target' must be a table"),
        ("coordinator.in_bps", -1.0, "scenario key 'coordinator.in_bps'"),
        ("coordinator.out_bps", math.nan, "scenario key 'coordinator.out_bps'"),
        ("coordinator.bps", 1.0, "unknown scenario key 'coordinator.bps'"),
        ("churn.horizon_s", 0.0, "scenario key 'churn.horizon_s'"),
        ("churn.enabled", "maybe", "scenario key 'churn.enabled'"),
        ("churn.byebye", True, "unknown scenario key 'churn.byebye'"),
        ("population.flops", {"kind": "gauss"}, "config key 'population.flops.kind'"),
        ("population.peerz", 3, "unknown config key 'population.peerz'"),
        ("population", ..., "has a [target] table but no [population] table"),
        ("target", ..., "has a [population] table but no [target] table"),
        ("swarm.peers", 4, "'swarm.peers' does not apply to a discrete-event scenario"),
        ("swarm.attack", "sign_flip", "'swarm.attack' does not apply"),
        ("run.rounds.quorum", 4, "'run.rounds.quorum' is 4, more than the 3 peers"),
        ("extra", {}, "unknown scenario key(s) extra"),
    ],
)
def test_bad_tables_are_one_sentence_naming_the_key(path: str, value: Any, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_scenario("des", with_(DES, path, value))
    message = str(info.value)
    assert needle in message and "\n" not in message


@pytest.mark.parametrize("table", ["coordinator", "churn"])
def test_des_tables_are_refused_in_a_swarm_scenario(table: str) -> None:
    with pytest.raises(ConfigError, match=f"'{table}' applies only to discrete-event"):
        parse_scenario("swarm", {"swarm": {"peers": 2}, table: {}})


def test_presets_load_and_validate() -> None:
    presets = {"consumer-1b", "datacenter", "datacenter-diloco", "ddp-wan", "laptops"}
    assert {"smoke", "folding-at-home"} | presets <= set(builtin_scenarios())
    for name in presets:  # the discrete-event presets all run and are measured
        s = load_scenario(name)
        assert s.discrete_event and s.run.name == name
    assert load_scenario("datacenter").report.method == "ddp"
    assert load_scenario("ddp-wan").report.method == "ddp"
    assert load_scenario("ddp-wan").population == load_scenario("consumer-1b").population
    assert not load_scenario("smoke").discrete_event  # smoke stays an in-process swarm
    consumer, datacenter = load_scenario("consumer-1b"), load_scenario("datacenter")
    for s in (consumer, datacenter):
        assert s.discrete_event and s.target is not None and s.population is not None
        assert s.target.params == 1_000_000_000 and s.target.steps_per_proxy_step == 25.0
        assert s.target.tokens_per_step == 16 * 2048 and s.population.peers == 16
        assert s.run.codec.name == "int8" and s.run.model == consumer.run.model
        # the same inner schedule; the data-parallel presets train at the DDP reference's
        # own learning rate, consumer-1b's volunteers at theirs
        assert s.run.inner.model_copy(update={"lr": 0.0}) == consumer.run.inner.model_copy(
            update={"lr": 0.0}
        )
    assert datacenter.run.inner.lr == consumer.report.ddp_lr
    # a peer of the consumers' mean speed trains 20 proxy steps = H_target 500 per round
    setup = des_setup(datacenter)
    (mean_speed,) = {p.flops for p in setup.population}
    assert consumer.population is not None and isinstance(consumer.population.flops, Uniform)
    assert mean_speed == consumer.population.flops.mean()
    assert consumer.population.flops.high == 4 * consumer.population.flops.low
    step_s = step_seconds(setup.target.flops_per_proxy_step, setup.population[0])
    assert math.floor(datacenter.run.inner.seconds / step_s) == 20
    assert setup.online is None and setup.horizon_s is None
    # 20% of the online consumers leave per hour: E[session] = 5 h
    assert 3600 / consumer.population.session_s.mean() == pytest.approx(0.2, rel=1e-3)
    setup = des_setup(consumer)
    assert setup.online is not None and setup.horizon_s is not None
    assert setup.horizon_s >= consumer.run.rounds.total * consumer.run.rounds.deadline_s
    assert all(82.5e12 <= p.flops < 330e12 for p in setup.population)
    assert setup.population == des_setup(consumer).population  # drawn with the run's seed


def test_churn_is_drawn_to_the_horizon_and_stops_there() -> None:
    raw = with_(DES, "population.session_s", {"kind": "fixed", "value": 100.0})
    raw = with_(raw, "population.offline_s", {"kind": "fixed", "value": 50.0})
    setup = des_setup(parse_scenario("des", with_(raw, "churn.horizon_s", 400.0)))
    assert setup.horizon_s == 400.0 and setup.online is not None
    # sessions [0, 100), [150, 250), [300, 400 = horizon): online from then on
    assert setup.online["peer-0"] == [(0.0, 100.0), (150.0, 250.0), (300.0, math.inf)]
    s = parse_scenario("des", raw)
    setup = des_setup(s)
    assert s.population is not None and s.target is not None
    expected = default_horizon_s(
        s.run, setup.population, s.target.target(s.run.codec), s.coordinator
    )
    assert setup.horizon_s == expected >= 4 * 2 * s.run.rounds.deadline_s
    off = des_setup(parse_scenario("des", with_(raw, "churn.enabled", False)))
    assert off.online is None


def test_simulate_runs_a_discrete_event_scenario_and_writes_json(
    corpus_file: Path, tmp_path: Path
) -> None:
    scenario = tmp_path / "tiny-des.toml"
    scenario.write_text(tiny_des_toml(corpus_file, tmp_path / "data"))
    out = tmp_path / "out" / "des.json"
    args = ["simulate", "--scenario", str(scenario), "--json", str(out), "--rounds", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps lines at the runner's width
    assert "utilization per peer: median" in text
    assert "virtual time to finish" in text
    assert "efficiency vs the datacenter ideal" in text
    doc = json.loads(out.read_text())
    assert doc["scenario"] == "tiny-des"
    assert {"efficiency_vs_datacenter", "utilization", "time_to_target_s", "bytes_per_peer",
            "ddp_wan_efficiency"} <= set(doc)  # fmt: skip
    sim = doc["simulation"]
    assert [r["round"] for r in sim["rounds"]] == [0, 1]
    row = sim["rounds"][0]
    assert {"close_time_s", "duration_s", "contributions", "eval_loss"} <= set(row)
    assert row["contributions"] == 2
    assert set(sim["per_peer"]) == {"peer-0", "peer-1"}
    util = doc["utilization"]
    assert 0 < util["median"] < 1
    assert util["median"] == sim["per_peer"]["peer-0"]["utilization"]  # identical peers
    assert sim["virtual_time_s"] == pytest.approx(sim["rounds"][-1]["close_time_s"])
    assert sim["final_eval_loss"] < sim["initial_eval_loss"]
    # the swarm's final loss is the target; every method reaches it, the swarm last
    assert doc["target_loss"] == pytest.approx(sim["final_eval_loss"], abs=1e-4)
    times = doc["time_to_target_s"]
    assert times["datacenter"] < times["swarm"] < times["ddp-wan"]
    assert 0 < doc["ddp_wan_efficiency"] < doc["efficiency_vs_datacenter"] < 1
    assert doc["efficiency"]["datacenter"] == pytest.approx(1.0)


def test_attack_on_a_discrete_event_scenario_is_refused_in_one_sentence(
    corpus_file: Path, tmp_path: Path
) -> None:
    scenario = tmp_path / "tiny-des.toml"
    scenario.write_text(tiny_des_toml(corpus_file, tmp_path / "data"))
    result = runner.invoke(app, ["simulate", "--scenario", str(scenario), "--attack", "sign_flip"])
    assert result.exit_code == 2
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.output and len(lines) == 1, result.output
    assert "not supported for discrete-event scenarios" in lines[0]
