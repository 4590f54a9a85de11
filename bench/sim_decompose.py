"""Split a swarm's efficiency into what DiLoCo costs and what the volunteers' world costs.

    .venv/bin/python bench/sim_decompose.py bench/results/sim-consumer-1b.json \\
        bench/results/sim-datacenter-diloco.json [SCENARIO.toml [TARGET_LOSS]]

The first document is a volunteer scenario, the second the same DiLoCo rounds on the
datacenter's hardware (identical machines of the volunteers' mean speed, so the same total
compute; unlimited links; no churn). At the volunteer scenario's target loss (or TARGET_LOSS,
to compare variants at one loss every one of them reaches):

* algorithmic efficiency = datacenter DDP against datacenter DiLoCo (DiLoCo's cost per token,
  with no slow link, straggler or churn);
* systems efficiency = datacenter DiLoCo against the volunteer swarm, per FLOP online (what the
  links, the spread in speed, churn and crashes cost DiLoCo);

and their product is the headline efficiency against the datacenter ideal.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from crowdtrain.sim.report import Curve, efficiency
from crowdtrain.sim.scenario import des_setup, load_scenario


def main(
    swarm_path: str, ideal_path: str, scenario: str | None = None, loss: str | None = None
) -> None:
    """`scenario` (a name or TOML path) defaults to the swarm document's scenario name; the
    target loss to the swarm document's."""
    swarm_doc = json.loads(Path(swarm_path).read_text())
    ideal_doc = json.loads(Path(ideal_path).read_text())
    setup = des_setup(load_scenario(scenario or swarm_doc["scenario"]))
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
    main(*sys.argv[1:5])
