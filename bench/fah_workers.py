"""How many aggregation threads does the folding-at-home preset's coordinator need?

Usage: .venv/bin/python bench/fah_workers.py [WORKERS ...]   (default 4 8 16 32 64 128 256)

Runs the preset's analytic study (`sim.analytic`: about 3,300 peers online, 1B parameters)
with `[coordinator] workers` set to each value, the close charged by the cost model
(`sim.coordinator_cost`), and prints the close's seconds, the expected contributions and the
length of a round, and the systems efficiency (the fraction of the online compute that lands
in accepted contributions). A close of 0 s is the first line, for reference.
"""

from __future__ import annotations

import sys

from crowdtrain.sim.scenario import load_scenario
from crowdtrain.sim.study import run_study


def main(workers: list[int]) -> None:
    base = load_scenario("folding-at-home")
    settings = [("free close", base.coordinator.model_copy(update={"close_s": 0.0}))]
    settings += [
        (f"{w} threads", base.coordinator.model_copy(update={"workers": w})) for w in workers
    ]
    for label, coordinator in settings:
        scenario = base.model_copy(update={"coordinator": coordinator})
        report = run_study(scenario).report
        t = report["throughput"]
        print(
            f"{label}: close {report['setup']['coordinator_close_s']:.0f} s, "
            f"{t['contributors_per_round']:.0f} contributions per round of "
            f"{t['round_s']:.0f} s, efficiency {report['efficiency_vs_datacenter']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [4, 8, 16, 32, 64, 128, 256])
