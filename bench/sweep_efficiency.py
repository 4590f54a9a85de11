"""Efficiency of simulated DiLoCo variants against ONE data-parallel reference, at given losses.

Usage: .venv/bin/python bench/sweep_efficiency.py REF.json TARGET[,TARGET...] VARIANT.json ...

Every document is a `crowdtrain simulate --json` output of a scenario without churn (the
datacenter-diloco sweeps), whose efficiency is then T_datacenter / T_swarm to each target.
The data-parallel curve is REF's, for every variant: a variant that changes the inner
learning rate also trains its own reference at that rate (`[report] ddp_lr` defaults to it),
which would compare it with a weaker data-parallel run. Prints one line per variant: its
final loss and its efficiency at each target ("—" where it never reaches it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from crowdtrain.sim.report import Curve, time_to_target


def main(ref_path: str, targets: str, *paths: str) -> None:
    losses = [float(t) for t in targets.split(",")]
    reference = Curve.from_report(json.loads(Path(ref_path).read_text()), "datacenter")
    for path in (ref_path, *paths):
        doc = json.loads(Path(path).read_text())
        swarm = Curve.from_report(doc, "swarm")
        cells = []
        for loss in losses:
            t_dc, t_swarm = time_to_target(reference, loss), time_to_target(swarm, loss)
            ok = t_dc is not None and t_swarm
            cells.append(f"{t_dc / t_swarm:.3f}" if ok else "—")  # type: ignore[operator]
        print(
            f"{Path(path).stem}: final {swarm.eval_loss[-1]:.4f}; efficiency at "
            + ", ".join(f"{t}: {c}" for t, c in zip(losses, cells, strict=True))
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
