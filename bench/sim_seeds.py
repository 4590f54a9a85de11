"""Runs of one discrete-event scenario at several seeds and commits, as one markdown table.

    .venv/bin/python bench/sim_seeds.py SCENARIO TARGETS LABEL=SWARM.json[@SEED] [...]

SCENARIO is the preset (or TOML) the runs drew their peers from; TARGETS a comma-separated
list of eval losses. For each run: its seed (the one its document records, else @SEED), the
contributions aggregated, the final eval loss and the virtual time it took, and the headline
efficiency (datacenter DDP against the swarm, per FLOP online, `bench/sim_decompose.py`) at
each target; then, per label, the mean of each column over its runs.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from sim_decompose import headline, setup_of


def main(scenario: str, targets: str, *runs: str) -> None:
    losses = [float(t) for t in targets.split(",")]
    by_label: dict[str, list[list[float]]] = defaultdict(list)
    head = "| run | seed | contributions | final loss | virtual time (h) | "
    print(head + " | ".join(f"headline at {t:.4f}" for t in losses) + " |")
    print("|---" * (5 + len(losses)) + "|")
    for spec in runs:
        label, _, rest = spec.partition("=")
        path, _, seed_text = rest.partition("@")
        doc = json.loads(Path(path).read_text())
        setup = setup_of(doc, scenario, int(seed_text) if seed_text else None)
        sim = doc["simulation"]
        contributions = sum(r["contributions"] for r in sim["rounds"])
        hours = sim["virtual_time_s"] / 3600
        effs = [headline(doc, setup, t) for t in losses]
        row = [contributions, sim["final_eval_loss"], hours, *(e or 0.0 for e in effs)]
        by_label[label].append(row)
        cells = [f"{e:.3f}" if e is not None else "not reached" for e in effs]
        print(
            f"| {label} | {setup.run.seed} | {contributions} | {sim['final_eval_loss']:.4f} | "
            f"{hours:.2f} | " + " | ".join(cells) + " |"
        )
    for label, rows in by_label.items():
        means = [statistics.fmean(col) for col in zip(*rows, strict=True)]
        cells = [f"{m:.3f}" for m in means[3:]]
        print(
            f"| **{label}, mean of {len(rows)}** | | {means[0]:.1f} | {means[1]:.4f} | "
            f"{means[2]:.2f} | " + " | ".join(cells) + " |"
        )


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
