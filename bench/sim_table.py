"""Render docs/SIMULATIONS.md's results table from `crowdtrain simulate --json` documents.

    .venv/bin/python bench/sim_table.py bench/results/sim-*.json

One row per scenario: its method, the target loss, the virtual time each method needs to reach
it, the efficiency against the datacenter ideal (and ddp-wan's), and the swarm's utilization
and bytes per peer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from crowdtrain.sim.report import hms


def _time(seconds: float | None) -> str:
    return "—" if seconds is None else hms(seconds)


def _pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def row(doc: dict[str, Any]) -> list[str]:
    """One scenario's row of the table."""
    times = doc.get("time_to_target_s") or {}
    util = doc["utilization"]
    sent = doc["bytes_per_peer"]
    if "throughput" in doc:  # the analytic method: per round, no loss curve
        volume = f"{sent['per_round'] / 1e9:.2f} GB per round"
        target = "— (extrapolated)"
    else:
        volume = f"{sent['median'] / 1e9:.1f} GB"
        target = f"{doc['target_loss']:.4f}"
    return [
        doc["scenario"],
        target,
        _time(times.get("swarm")),
        _time(times.get("datacenter")),
        _time(times.get("ddp-wan")),
        _pct(doc["efficiency_vs_datacenter"]),
        _pct(doc["ddp_wan_efficiency"], 2),
        f"{util['median']:.3f}",
        volume,
    ]


def main(paths: list[str]) -> None:
    header = [
        "scenario",
        "target loss",
        "time: scenario",
        "time: datacenter",
        "time: ddp-wan",
        "efficiency",
        "ddp-wan efficiency",
        "utilization (median)",
        "bytes per peer",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for path in paths:
        doc = json.loads(Path(path).read_text())
        print("| " + " | ".join(row(doc)) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
