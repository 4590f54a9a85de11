"""Seconds of the compressed weight broadcast's publish step (int8 encode of θ_{r+1} − θ_r with
the residual, then θ_{r+1} rebuilt as volunteers rebuild it) for a model of P parameters.

    .venv/bin/python bench/broadcast_publish.py [PARAMS] [REPEATS]

Prints the median and each repetition; run it at two commits, side by side, to compare.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from crowdtrain.config import BroadcastConfig
from crowdtrain.protocol.broadcast import Broadcast


def main() -> None:
    params = int(float(sys.argv[1])) if len(sys.argv) > 1 else 100_000_000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (params // 2,), "b": (params - params // 2,)}
    before = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    broadcast = Broadcast(BroadcastConfig(), shapes)
    times = []
    for _ in range(repeats):
        after = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in before.items()}
        t0 = time.perf_counter()
        broadcast.publish(before, after)
        times.append(time.perf_counter() - t0)
    print(
        f"params {params}: publish median {statistics.median(times):.3f} s "
        f"({', '.join(f'{t:.3f}' for t in times)})"
    )


if __name__ == "__main__":
    main()
