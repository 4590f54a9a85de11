"""A discrete-event scenario measured against its references: the headline of issue 5.

`run_study` runs a scenario's volunteers (DiLoCo rounds in `sim.des`, Douillard et al. 2023,
arXiv:2311.08105; or synchronous data-parallel training for the `ddp` method), then the
data-parallel references of `sim.ddp` on the same proxy, data and population, and builds the
report of `sim.report`: time to a target loss and efficiency against the datacenter ideal with
the same total compute, utilization, bytes per peer, and the same for DDP over the volunteers'
links. The references train until they reach the swarm's loss, so their cost is bounded by how
far the swarm got.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from crowdtrain.config import RunConfig
from crowdtrain.sim.ddp import DdpCurve, datacenter_step_s, ddp_wan_times, train_ddp
from crowdtrain.sim.des import SimResult, Target, online_seconds
from crowdtrain.sim.population import PeerSpec, online_fraction
from crowdtrain.sim.report import Curve, build_report, curve_from_rounds, default_target
from crowdtrain.sim.scenario import (
    DesSetup,
    Scenario,
    des_setup,
    online_schedule,
    simulate_scenario,
)

__all__ = ["Study", "ddp_per_peer", "run_study"]

Interval = tuple[float, float]


@dataclass
class Study:
    """What `run_study` measured: the report, and the runs behind it."""

    report: dict[str, Any]
    sim: SimResult | None  # the DiLoCo swarm (None for the ddp and analytic methods)
    ddp: DdpCurve | None  # the data-parallel numerics all references share (None: analytic)

    def to_json(self) -> dict[str, Any]:
        """The report, with the swarm's rounds and per-peer figures and the DDP curve."""
        return {
            **self.report,
            "simulation": None if self.sim is None else self.sim.to_json(),
            "ddp_reference": None if self.ddp is None else self.ddp.to_json(),
        }


def analytic_study(scenario: Scenario, setup: DesSetup) -> Study:
    """The `analytic` method: DiLoCo's steady-state throughput for a swarm too large to
    simulate peer by peer (`sim.analytic`), and DDP over the same links from its step time.

    There are no numerics, so no loss curve and no time to a target loss. The efficiency is the
    fraction of the online compute that lands in accepted contributions (the systems part of
    the efficiency of the other methods); DiLoCo's algorithmic cost per token is not in it.
    ddp-wan's efficiency is the datacenter's step time over its step time, with every peer
    online (their numerics are the same, so this is exact under the step-time model).
    """
    from crowdtrain.sim.analytic import extrapolate_peers

    population, target, cfg = setup.population, setup.target, scenario.report
    pop = scenario.population
    assert pop is not None
    churn = setup.online is not None
    close = scenario.coordinator.close(setup.run, target)
    close_s = close(0)
    for _ in range(8):  # the close's cost depends on the contributions, and they on it
        throughput, rounds = extrapolate_peers(
            setup.run,
            population,
            target,
            online_fraction=online_fraction(pop) if churn else 1.0,
            mean_session_s=pop.session_s.mean() if churn else math.inf,
            coordinator_in_bps=scenario.coordinator.in_bps,
            coordinator_out_bps=scenario.coordinator.out_bps,
            close_s=close_s,
            fail_mid_round=setup.fail_mid_round,
        )
        then = close(round(throughput.contributors_per_round))
        if abs(then - close_s) <= 1e-3 * max(1.0, close_s):
            break
        close_s = then
    dc_step = datacenter_step_s(population, target)
    wan_step = ddp_wan_times(
        population, target, [0, 1], allreduce_bytes_per_param=cfg.allreduce_bytes_per_param
    )[-1]
    util = [float(u) for u in rounds.utilization]
    report: dict[str, Any] = {
        "scenario": scenario.name,
        "efficiency_vs_datacenter": throughput.useful_flop_fraction,
        "ddp_wan_efficiency": dc_step / wan_step,
        "utilization": {
            "median": statistics.median(util),
            "mean": throughput.utilization,
            "min": min(util),
            "max": max(util),
        },
        "time_to_target_s": None,
        "bytes_per_peer": {"per_round": throughput.bytes_per_peer_per_round},
        "extrapolated": True,
        "throughput": throughput.to_json(),
        "setup": {
            "peers": len(population),
            "target_params": target.params,
            "datacenter_proxy_step_s": dc_step,
            "ddp_wan_proxy_step_s": wan_step,
            "churn": churn,
            "coordinator_close_s": close_s,
            "coordinator_workers": scenario.coordinator.workers,
        },
        "notes": [
            "extrapolated analytically (sim.analytic), not simulated peer by peer",
            "efficiency_vs_datacenter is the fraction of the online compute that lands in "
            "accepted contributions; DiLoCo's algorithmic cost per token is not in it",
            "ddp_wan_efficiency assumes every peer online",
        ],
    }
    return Study(report, None, None)


def ddp_per_peer(
    population: Sequence[PeerSpec],
    target: Target,
    steps: int,
    end_s: float,
    online: Mapping[str, Sequence[Interval]] | None,
    allreduce_bytes_per_param: float,
) -> dict[str, dict[str, float]]:
    """Each rank's compute, bytes and utilization over `steps` proxy steps of DDP lasting
    `end_s`, with all N ranks sharing the global batch (exact without churn; with churn, ranks
    online take a larger share, which this leaves out)."""
    n = len(population)
    target_steps = steps * target.steps_per_proxy_step
    ring = 2 * (n - 1) / n * target.params * allreduce_bytes_per_param if n > 1 else 0.0
    rows: dict[str, dict[str, float]] = {}
    for p in population:
        compute = target_steps * target.flops_per_step / (p.flops * p.mfu)
        online_s = online_seconds(None if online is None else online.get(p.peer_id), end_s)
        rows[p.peer_id] = {
            "compute_s": compute,
            "online_s": online_s,
            "utilization": min(1.0, compute / online_s) if online_s > 0 else 0.0,
            "bytes_up": ring * target_steps,
            "bytes_down": ring * target_steps,
        }
    return rows


def _long_schedule(
    scenario: Scenario, setup: DesSetup, steps: int
) -> dict[str, list[Interval]] | None:
    """The swarm's online schedule, drawn on far enough for DDP over the same volunteers:
    three times the time its `steps` would take with everyone online. The swarm's part of it
    is unchanged, as a longer horizon extends a shorter one."""
    if setup.online is None or setup.horizon_s is None or scenario.population is None:
        return setup.online
    always = ddp_wan_times(
        setup.population,
        setup.target,
        [0, steps],
        allreduce_bytes_per_param=scenario.report.allreduce_bytes_per_param,
    )[-1]
    if 3 * always <= setup.horizon_s:
        return setup.online
    return online_schedule(scenario.population, setup.population, 3 * always, setup.run.seed)


def _ddp_steps(run: RunConfig, scenario: Scenario) -> int:
    report = scenario.report
    return report.ddp_max_steps or 2 * run.rounds.total * run.inner.steps


def run_study(
    scenario: Scenario,
    run: RunConfig | None = None,
    *,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    on_eval: Callable[[int, float], None] | None = None,
    setup: DesSetup | None = None,
) -> Study:
    """Run `scenario` (with `run` in place of its run config, when given) and its references.

    `on_round` gets each swarm round's row; `on_eval` each evaluation of the DDP reference.
    Raises RuntimeError when the swarm stalls.
    """
    setup = des_setup(scenario, run) if setup is None else setup
    run = setup.run
    cfg = scenario.report
    if cfg.method == "analytic":
        return analytic_study(scenario, setup)
    population, target = setup.population, setup.target
    peers = len(population)
    eff = {p.peer_id: p.flops * p.mfu for p in population}
    eval_kw = {
        "eval_batches": scenario.swarm.eval_batches,
        "eval_batch_size": scenario.swarm.eval_batch_size,
    }
    notes: list[str] = []
    sim: SimResult | None = None
    target_loss = cfg.target_loss
    if cfg.method == "diloco":
        sim = simulate_scenario(scenario, run, on_round=on_round, setup=setup)
        swarm = curve_from_rounds(sim.rounds, sim.initial_eval_loss)
        target_loss = target_loss or default_target(swarm)
    ddp = train_ddp(
        run,
        peers,
        max_steps=_ddp_steps(run, scenario),
        eval_every=cfg.ddp_eval_every,
        lr=cfg.ddp_lr,
        stop_below=target_loss,  # the ddp method trains to its step limit unless given one
        on_eval=on_eval,
        **eval_kw,
    )
    target_loss = target_loss or ddp.eval_loss[-1]
    dc_step = datacenter_step_s(population, target)
    datacenter = Curve(
        "datacenter",
        [s * dc_step for s in ddp.steps],
        list(ddp.eval_loss),
        label="datacenter ideal (DDP, same total compute)",
    )
    online = _long_schedule(scenario, setup, ddp.steps[-1])
    wan = Curve(
        "ddp-wan",
        ddp_wan_times(
            population,
            target,
            ddp.steps,
            online=online,
            allreduce_bytes_per_param=cfg.allreduce_bytes_per_param,
        ),
        list(ddp.eval_loss),
        label="DDP over the volunteers' links",
    )
    per_peer: Mapping[str, Mapping[str, float]]
    if sim is not None:
        per_peer = sim.per_peer
    else:
        swarm = Curve(
            "swarm", wan.times_s, wan.eval_loss, label=f"{scenario.name} (DDP on its links)"
        )
        per_peer = ddp_per_peer(
            population,
            target,
            ddp.steps[-1],
            wan.times_s[-1],
            online,
            cfg.allreduce_bytes_per_param,
        )
        notes.append(
            "the scenario runs synchronous data-parallel training over its population's links; "
            "its per-peer figures are computed from the step times, not simulated"
        )
    if ddp.eval_loss and min(ddp.eval_loss) > target_loss:
        notes.append(
            f"the data-parallel reference did not reach the target loss {target_loss:.4f} in "
            f"{ddp.steps[-1]} steps (report.ddp_max_steps)"
        )
    report = build_report(
        scenario.name,
        swarm,
        datacenter,
        wan,
        eff=eff,
        online=online,
        per_peer=per_peer,
        target_loss=cfg.target_loss,  # None: the swarm's final loss, as `target_loss` here
        notes=notes,
    )
    report["setup"] = {
        "seed": run.seed,  # the population's, the churn's, the model's and the data's
        "peers": peers,
        "target_params": target.params,
        "steps_per_proxy_step": target.steps_per_proxy_step,
        "datacenter_proxy_step_s": dc_step,
        "ddp_lr": ddp.lr,
        "ddp_global_batch": ddp.global_batch,
        "churn": online is not None,
        "virtual_time_s": None if sim is None else sim.virtual_time_s,
        "total_effective_flop_per_s": math.fsum(eff.values()),
    }
    return Study(report, sim, ddp)
