"""Validate the analytic throughput model (`sim.analytic`) against the discrete-event simulator.

Runs a discrete-event scenario (`sim.scenario.simulate_scenario`) for a few rounds on a cheap
proxy model (width 32, depth 1, context 32, batches of 4: only timing matters here, and the
proxy does not change it) with verification off (the analytic model has no spot-check
replays), and the analytic model on the same drawn population, and prints side by side the
median round duration, the median peer's utilization (useful compute, i.e. that of accepted
contributions, per online second; the simulator's compute utilization, lost work included,
next to it) and the contributions per round. Cases: without churn, then with the scenario's
churn, each with ``inner.overlap`` off and on; optionally coordinator-bound cases
(``--coordinator-bps``), each with the scenario's deadline and with twice it.

With churn the analytic model gets the online fraction the drawn schedule actually has over
the simulated time (every peer starts online, so a short run is above the long-run fraction,
which is printed too) and the mean of the scenario's session law.

    python bench/analytic_vs_des.py --scenario consumer-1b --rounds 16 --seeds 5 \\
        --coordinator-bps 1e9 4e8 --json bench/results/analytic-vs-des.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from crowdtrain.config import RunConfig
from crowdtrain.sim.analytic import PeerRounds, Throughput, extrapolate_peers
from crowdtrain.sim.population import online_fraction
from crowdtrain.sim.scenario import (
    ChurnConfig,
    CoordinatorConfig,
    DesSetup,
    Scenario,
    des_setup,
    load_scenario,
    simulate_scenario,
)


def cheap_run(run: RunConfig, rounds: int, overlap: bool) -> RunConfig:
    """The scenario's run with fewer rounds, a tiny proxy (batches of 4, one thread: the proxy
    sets no virtual time), verification off and `overlap`."""
    model = run.model.model_copy(update={"width": 32, "depth": 1, "context": 32})
    return run.model_copy(
        update={
            "model": model,
            "data": run.data.model_copy(update={"batch_size": 4}),
            "rounds": run.rounds.model_copy(update={"total": rounds}),
            "inner": run.inner.model_copy(update={"overlap": overlap, "threads": 1}),
            "defence": run.defence.model_copy(update={"enabled": False}),
        }
    )


def online_share(online: dict[str, list[tuple[float, float]]] | None, end: float) -> float:
    """The mean fraction of [0, end) the peers were online."""
    if online is None:
        return 1.0
    shares = [
        sum(max(0.0, min(b, end) - min(a, end)) for a, b in intervals) / end
        for intervals in online.values()
    ]
    return statistics.fmean(shares)


def _analytic(
    scenario: Scenario, run: RunConfig, setup: DesSetup, f: float, session: float
) -> tuple[Throughput, PeerRounds, float]:
    """The analytic model on a drawn setup, and its wall time."""
    t0 = time.perf_counter()
    model, rows = extrapolate_peers(
        run,
        setup.population,
        setup.target,
        online_fraction=f,
        mean_session_s=session,
        coordinator_in_bps=scenario.coordinator.in_bps,
        coordinator_out_bps=scenario.coordinator.out_bps,
        close_s=float(getattr(scenario.coordinator, "close_s", 0.0)),
        fail_mid_round=setup.fail_mid_round,
    )
    return model, rows, time.perf_counter() - t0


def compare(scenario: Scenario, run: RunConfig, label: str, seeds: list[int]) -> dict[str, Any]:
    """One case: the simulator and the analytic model on the same populations, one per seed
    (rounds and peers pooled over the seeds)."""
    assert scenario.population is not None
    rounds: list[float] = []
    contributions: list[float] = []
    useful: list[float] = []
    busy: list[float] = []
    models: list[Throughput] = []
    model_util: list[float] = []
    long_runs: list[tuple[Throughput, PeerRounds]] = []
    fractions: list[float] = []
    des_wall = model_wall = 0.0
    session = math.inf
    for seed in seeds:
        seeded = run.model_copy(update={"seed": seed})
        setup = des_setup(scenario, seeded)
        t0 = time.perf_counter()
        sim = simulate_scenario(scenario, seeded)
        des_wall += time.perf_counter() - t0
        f = online_share(setup.online, sim.virtual_time_s)
        session = scenario.population.session_s.mean() if setup.online else math.inf
        model, rows, wall = _analytic(scenario, seeded, setup, f, session)
        model_wall += wall
        compute = dict(zip(rows.peer_ids, rows.compute_s.tolist(), strict=True))
        rounds += [r["duration_s"] for r in sim.rounds]
        contributions += [r["contributions"] for r in sim.rounds]
        useful += [
            p["contributions"] * compute[pid] / p["online_s"] if p["online_s"] > 0 else 0.0
            for pid, p in sim.per_peer.items()
        ]
        busy += [p["utilization"] for p in sim.per_peer.values()]
        models.append(model)
        model_util += rows.utilization.tolist()
        fractions.append(f)
        if setup.online is not None:  # the same model at the long-run online fraction
            steady = online_fraction(scenario.population)
            long_model, long_rows, _ = _analytic(scenario, seeded, setup, steady, session)
            long_runs.append((long_model, long_rows))
    doc: dict[str, Any] = {
        "case": label,
        "overlap": run.inner.overlap,
        "churn": bool(long_runs),
        "seeds": seeds,
        "online_fraction": statistics.fmean(fractions),
        "mean_session_s": session,
        "des": {
            "round_s_median": statistics.median(rounds),
            "utilization_median": statistics.median(useful),
            "compute_utilization_median": statistics.median(busy),
            "contributions_per_round": statistics.fmean(contributions),
            "round_s": rounds,
            "wall_s": des_wall,
        },
        "analytic": {
            "round_s": statistics.fmean(m.round_s for m in models),
            "utilization_median": statistics.median(model_util),
            "contributions_per_round": statistics.fmean(m.contributors_per_round for m in models),
            "coordinator_bound": any(m.coordinator_bound for m in models),
            "wall_s": model_wall,
            "throughput": [m.to_json() for m in models],
        },
    }
    if long_runs:
        doc["analytic_long_run"] = {
            "online_fraction": online_fraction(scenario.population),
            "round_s": statistics.fmean(m.round_s for m, _ in long_runs),
            "utilization_median": statistics.median(
                u for _, rows in long_runs for u in rows.utilization.tolist()
            ),
            "contributions_per_round": statistics.fmean(
                m.contributors_per_round for m, _ in long_runs
            ),
        }
    return doc


def _row(name: str, des: float, model: float, digits: int) -> str:
    diff = (model - des) / des if des else math.nan
    return f"  {name:<34} {des:>10.{digits}f} {model:>10.{digits}f} {diff:>+8.1%}"


def show(doc: dict[str, Any]) -> None:
    """Print one case's table."""
    des, model = doc["des"], doc["analytic"]
    extra = f", online fraction {doc['online_fraction']:.3f}" if doc["churn"] else ""
    if len(doc["seeds"]) > 1:
        extra += f", seeds {doc['seeds'][0]}-{doc['seeds'][-1]} pooled"
    print(f"\n{doc['case']} (overlap {'on' if doc['overlap'] else 'off'}{extra})")
    print(f"  {'':<34} {'DES':>10} {'analytic':>10} {'diff':>8}")
    print(_row("median round duration (s)", des["round_s_median"], model["round_s"], 1))
    print(_row("mean round duration (s)", statistics.fmean(des["round_s"]), model["round_s"], 1))
    print(_row("median utilization", des["utilization_median"], model["utilization_median"], 3))
    print(_row("contributions per round", des["contributions_per_round"],
               model["contributions_per_round"], 2))  # fmt: skip
    busy = des["compute_utilization_median"]
    print(f"  DES compute utilization (lost work included): {busy:.3f}")
    print(f"  DES rounds (s): {', '.join(f'{r:.0f}' for r in des['round_s'][:24])}")
    print(f"  wall time: DES {des['wall_s']:.1f} s, analytic {model['wall_s'] * 1e3:.1f} ms")
    if model["coordinator_bound"]:
        print("  analytic: the coordinator's links are the bound")
    if "analytic_long_run" in doc:
        lr = doc["analytic_long_run"]
        print(
            f"  analytic at the long-run online fraction {lr['online_fraction']:.3f}: round "
            f"{lr['round_s']:.1f} s, median utilization {lr['utilization_median']:.3f}, "
            f"{lr['contributions_per_round']:.2f} contributions per round"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="consumer-1b", help="a discrete-event scenario")
    parser.add_argument("--rounds", type=int, default=8, help="rounds the simulator runs")
    parser.add_argument(
        "--seeds", type=int, default=1, help="run seeds 0..N-1 for the cases with churn, pooled"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--coordinator-bps",
        type=float,
        nargs="*",
        default=[],
        help="also run a case without churn whose coordinator has this ingress and egress",
    )
    args = parser.parse_args()
    scenario = load_scenario(args.scenario)
    if not scenario.discrete_event:
        parser.error(f"scenario {args.scenario} is not a discrete-event scenario")
    if args.rounds < 1 or args.seeds < 1:
        parser.error("--rounds and --seeds must be at least 1")
    base = scenario.run.seed
    one, many = [base], list(range(base, base + args.seeds))
    still = scenario.model_copy(update={"churn": ChurnConfig(enabled=False)})
    cases: list[tuple[str, Scenario, bool, list[int]]] = [
        ("no churn", still, False, one),
        ("no churn", still, True, one),
    ]
    if scenario.churn.enabled:
        cases += [("churn", scenario, False, many), ("churn", scenario, True, many)]
    for bps in args.coordinator_bps:  # with the deadline, and with twice the deadline
        links = scenario.coordinator.model_copy(update={"in_bps": bps, "out_bps": bps})
        narrow = still.model_copy(update={"coordinator": links})
        assert isinstance(narrow.coordinator, CoordinatorConfig)
        cases.append((f"no churn, coordinator {bps:g} bit/s", narrow, False, one))
        cases.append((f"no churn, coordinator {bps:g} bit/s, deadline x2", narrow, False, one))
    results = []
    for label, case, overlap, seeds in cases:
        run = cheap_run(scenario.run, args.rounds, overlap)
        if label.endswith("deadline x2"):
            deadline = 2 * run.rounds.deadline_s
            run = run.model_copy(
                update={"rounds": run.rounds.model_copy(update={"deadline_s": deadline})}
            )
        doc = compare(case, run, label, seeds)
        show(doc)
        sys.stdout.flush()
        results.append(doc)
    if args.json is not None:
        out = {"scenario": args.scenario, "rounds": args.rounds, "cases": results}
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
