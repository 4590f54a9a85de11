"""Robust aggregation alone: seconds for K int8 contributions by worker threads and fragment size.

Usage: .venv/bin/python bench/aggregate_workers.py [K] [PARAMS]

Centered clipping with bucketing (the default rule), one torch thread per worker, payloads
decoded from memory (`codec.PayloadSource`), without measuring each contribution's own
distance (as the protocol aggregates). In the same run, the floor: one pass that adds every
payload's int8 bytes into an fp32 accumulator. Prints one line per setting: seconds (best of
3), ns per parameter·contribution, and the ratio to the floor.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from functools import partial

import torch

from crowdtrain import codec
from crowdtrain.codec.source import PayloadSource
from crowdtrain.config import AggregationConfig, CodecConfig
from crowdtrain.robust import aggregate


def run(
    sources: list[PayloadSource],
    k: int,
    shapes: Mapping[str, tuple[int, ...]],
    cfg: AggregationConfig,
    reference: Mapping[str, torch.Tensor],
    workers: int,
) -> None:
    weights = [1.0] * k
    aggregate(sources, weights, shapes, cfg, reference=reference, workers=workers, distances=False)


def best(fn: object, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return min(times)


def main(k: int = 32, params: int = 10_660_000) -> None:
    torch.set_num_threads(1)
    shapes = {"a": (params // 2,), "b": (params - params // 2,)}
    gen = torch.Generator().manual_seed(0)
    spec = CodecConfig(name="int8")
    payloads = [
        codec.encode({n: torch.randn(s, generator=gen) * 1e-3 for n, s in shapes.items()}, spec)
        for _ in range(k)
    ]
    sources = [PayloadSource(p, shapes) for p in payloads]
    reference = {n: torch.randn(s, generator=gen) * 1e-3 for n, s in shapes.items()}
    acc = torch.zeros(1 << 20)

    def floor() -> None:
        for p in payloads:
            data = torch.frombuffer(bytearray(p), dtype=torch.int8)
            for start in range(0, min(params, data.numel()), 1 << 20):
                chunk = data[start : min(params, start + (1 << 20))]
                acc[: chunk.numel()].add_(chunk)

    floor_s = best(floor)
    print(f"floor: {floor_s:.3f} s ({floor_s / (k * params) * 1e9:.2f} ns per element)")
    for fragment in (1 << 20, 1 << 18, 1 << 16):
        cfg = AggregationConfig(fragment_numel=fragment)
        for workers in (1, 2):
            s = best(partial(run, sources, k, shapes, cfg, reference, workers))
            print(
                f"fragment {fragment:>8}, workers {workers}: {s:.3f} s, "
                f"{s / (k * params) * 1e9:.2f} ns per parameter·contribution, "
                f"{s / floor_s:.1f}× the floor",
                flush=True,
            )


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
