"""Split a swarm's efficiency into what DiLoCo costs and what the volunteers' world costs.

    .venv/bin/python bench/sim_decompose.py bench/results/sim-consumer-1b.json \\
        bench/results/sim-datacenter-diloco.json [SCENARIO.toml [TARGET_LOSS]] [--seed N]

The first document is a volunteer scenario, the second the same DiLoCo rounds on the
datacenter's hardware (identical machines of the volunteers' mean speed, so the same total
compute; unlimited links; no churn). At the volunteer scenario's target loss (or TARGET_LOSS,
to compare variants at one loss every one of them reaches):

* algorithmic efficiency = datacenter DDP against datacenter DiLoCo (DiLoCo's cost per token,
  with no slow link, straggler or churn);
* systems efficiency = datacenter DiLoCo against the volunteer swarm, per FLOP online (what the
  links, the spread in speed, churn and crashes cost DiLoCo);

and their product is the headline efficiency against the datacenter ideal. The volunteers'
FLOP/s online come from the scenario drawn with the swarm run's seed (its document's
`setup.seed`, or --seed N for a document written before it recorded one: `crowdtrain simulate
--seed N`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from crowdtrain.sim.report import Curve, efficiency
from crowdtrain.sim.scenario import DesSetup, des_setup, load_scenario


def setup_of(swarm_doc: dict[str, Any], scenario: str | None, seed: int | None) -> DesSetup:
    """The scenario of SWARM_DOC (or SCENARIO, a name or TOML path) drawn with the swarm run's
    seed: the one its document records, else SEED (a mismatch is an error)."""
    loaded = load_scenario(scenario or swarm_doc["scenario"])
    recorded = swarm_doc.get("setup", {}).get("seed")
    if recorded is not None and seed is not None and seed != recorded:
        raise SystemExit(f"the swarm was run with seed {recorded}, not {seed}")
    seed = recorded if recorded is not None else seed
    if seed is not None:
        loaded = loaded.model_copy(update={"run": loaded.run.model_copy(update={"seed": seed})})
    return des_setup(loaded)


def headline(swarm_doc: dict[str, Any], setup: DesSetup, target: float) -> float | None:
    """Datacenter DDP against the volunteer swarm at TARGET, per FLOP online (None: not
    reached), from the swarm's document alone."""
    eff = {p.peer_id: p.flops * p.mfu for p in setup.population}
    swarm, ddp = Curve.from_report(swarm_doc, "swarm"), Curve.from_report(swarm_doc, "datacenter")
    return efficiency(swarm, ddp, target, eff=eff, online=setup.online).efficiency


def main(
    swarm_path: str,
    ideal_path: str,
    scenario: str | None = None,
    loss: str | None = None,
    seed: int | None = None,
) -> None:
    """`scenario` (a name or TOML path) defaults to the swarm document's scenario name; the
    target loss to the swarm document's; the seed to the swarm run's."""
    swarm_doc = json.loads(Path(swarm_path).read_text())
    ideal_doc = json.loads(Path(ideal_path).read_text())
    setup = setup_of(swarm_doc, scenario, seed)
    eff = {p.peer_id: p.flops * p.mfu for p in setup.population}
    target: float = swarm_doc["target_loss"] if loss is None else float(loss)
    swarm, ddp = Curve.from_report(swarm_doc, "swarm"), Curve.from_report(swarm_doc, "datacenter")
    diloco = Curve(
        "datacenter-diloco", *(ideal_doc["curves"]["swarm"][k] for k in ("times_s", "eval_loss"))
    )
    algorithmic = efficiency(diloco, ddp, target, eff=eff, online=None)
    systems = efficiency(swarm, diloco, target, eff=eff, online=setup.online)
    total = efficiency(swarm, ddp, target, eff=eff, online=setup.online)
    whose = (
        f"{swarm_doc['scenario']}'s final eval loss"
        if target == swarm_doc["target_loss"]
        else "given"
    )
    print(f"target loss {target:.4f} ({whose})")
    for name, e in (
        ("algorithmic (datacenter DDP vs datacenter DiLoCo)", algorithmic),
        ("systems (datacenter DiLoCo vs the volunteer swarm)", systems),
        ("headline (datacenter DDP vs the volunteer swarm)", total),
    ):
        value = "not reached" if e.efficiency is None else f"{e.efficiency:.3f}"
        print(f"{name}: {value}")
    if algorithmic.efficiency is not None and systems.efficiency is not None:
        print(f"product of the two: {algorithmic.efficiency * systems.efficiency:.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("swarm")
    ap.add_argument("ideal")
    ap.add_argument("scenario", nargs="?")
    ap.add_argument("loss", nargs="?")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    main(a.swarm, a.ideal, a.scenario, a.loss, a.seed)
