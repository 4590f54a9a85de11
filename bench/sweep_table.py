"""Turn `bench/diloco_sweep.py` output into a markdown table: eval loss ÷ data-parallel loss.

Usage: .venv/bin/python bench/sweep_table.py bench/results/outer-sweep-quick.txt
Rows are (workers, H); columns are the outer (lr, momentum) settings in the order they first
appear; each cell is the DiLoCo eval loss divided by the data-parallel reference's loss on the
same number of workers (the `{"ddp": true, "workers": N}` lines; the loss itself where there
is none), with the best cell of each row in bold. Several files are read as one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[Path]) -> None:
    ddp: dict[int, float] = {}
    cells: dict[tuple[int, int], dict[tuple[float, float], float]] = {}
    columns: list[tuple[float, float]] = []
    for line in (line for path in paths for line in path.read_text().splitlines()):
        head, _, rest = line.rpartition("} ")
        variant = json.loads(head + "}")
        loss = float(rest.split()[0])
        workers = int(variant.get("workers", 4))
        if variant.get("ddp"):
            ddp[workers] = loss
            continue
        outer = variant["set"]["outer"]
        column = (float(outer["lr"]), float(outer["momentum"]))
        if column not in columns:
            columns.append(column)
        cells.setdefault((workers, int(variant["H"])), {})[column] = loss
    print("| workers | H | " + " | ".join(f"lr {lr}, μ {m}" for lr, m in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for (workers, h), row in sorted(cells.items()):
        best = min(row.values())
        shown = []
        for column in columns:
            if column not in row:
                shown.append("")
                continue
            # Without a reference for this worker count, the eval loss itself.
            ratio = f"{row[column] / ddp[workers]:.3f}" if workers in ddp else f"{row[column]}"
            shown.append(f"**{ratio}**" if row[column] == best else ratio)
        print(f"| {workers} | {h} | " + " | ".join(shown) + " |")
    print()
    print("data-parallel reference: " + ", ".join(f"{w} workers {ddp[w]:.4f}" for w in sorted(ddp)))


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
