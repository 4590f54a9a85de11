"""Centered clipping around the previous aggregate, computed fragment by fragment.

Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust Optimization" (ICML 2021):
start from ``v`` = the previous round's aggregate and repeat

    c_i = min(1, τ / ‖x_i − v‖),     v ← v + Σ_i w_i c_i (x_i − v) / Σ_i w_i

where ‖·‖ is the GLOBAL L2 norm over all parameters. Inputs far from the previous aggregate are
pulled onto a ball of radius τ around it, so a few arbitrarily bad inputs move ``v`` by at most
about τ × their share of the weight. Weights are sample counts here (the paper uses uniform
weights). When ``tau`` is None it is chosen adaptively in every iteration as the median of the
current distances ‖x_i − v‖, so about half of the inputs are clipped.

Because the norm is global, each iteration takes two passes over the fragments: pass 1 adds up
every input's squared distance fragment by fragment, pass 2 applies the clipped update fragment
by fragment. Inputs are streamed one at a time, so besides ``v`` itself (model size) the working
memory is a handful of fragment-sized buffers, whatever the number of inputs. Inputs may be
bucket means (Karimireddy, He and Jaggi, ICLR 2022; see ``buckets``), built on the fly.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from math import sqrt

import torch

from crowdtrain.robust.buckets import Bucket, read_bucket
from crowdtrain.robust.fragments import Fragment, gather, scatter, squared_distance
from crowdtrain.robust.sources import DeltaSource

__all__ = ["ClipOutcome", "centered_clip", "clip_scales"]


@dataclass(frozen=True)
class ClipOutcome:
    """What the last clipping iteration did: each input's distance to ``v``, scale, and τ."""

    distances: list[float]
    scales: list[float]
    tau: float


def clip_scales(distances: Sequence[float], tau: float | None) -> tuple[list[float], float]:
    """c_i = min(1, τ / d_i) (1 when d_i = 0), with τ = median(d) when ``tau`` is None."""
    chosen = float(statistics.median(distances)) if tau is None else float(tau)
    scales = [1.0 if d <= chosen else chosen / d for d in distances]
    return scales, chosen


def centered_clip(
    sources: Sequence[DeltaSource],
    weights: Sequence[float],
    buckets: Sequence[Bucket],
    fragments: Sequence[Fragment],
    v: dict[str, torch.Tensor],
    *,
    tau: float | None,
    iters: int,
    member_sq: list[float] | None = None,
) -> ClipOutcome:
    """Run ``iters`` centered-clipping iterations over the bucket inputs, updating ``v`` in place.

    ``v`` holds the starting centre (the previous aggregate) as contiguous float32 tensors and
    ends as the aggregate. When ``member_sq`` is given, the first pass adds each original
    contribution's squared distance to the starting centre into it.
    """
    total_weight = sum(bucket.weight for bucket in buckets)
    outcome = ClipOutcome([], [], 0.0)
    for iteration in range(iters):
        sq = [0.0] * len(buckets)
        track = member_sq if iteration == 0 else None
        for fragment in fragments:
            centre = gather(v, fragment)
            for index, bucket in enumerate(buckets):
                x = read_bucket(sources, weights, bucket, fragment, centre=centre, member_sq=track)
                sq[index] += squared_distance(x, centre)
        distances = [sqrt(s) for s in sq]
        scales, chosen = clip_scales(distances, tau)
        coefs = [b.weight * c / total_weight for b, c in zip(buckets, scales, strict=True)]
        keep = 1.0 - sum(coefs)
        for fragment in fragments:
            # v + Σ a_g (x_g − v) = (1 − Σ a_g) v + Σ a_g x_g, without an (x_g − v) buffer.
            updated = gather(v, fragment).mul(keep)
            for bucket, coef in zip(buckets, coefs, strict=True):
                if coef:
                    updated.add_(read_bucket(sources, weights, bucket, fragment), alpha=coef)
            scatter(v, fragment, updated)
        outcome = ClipOutcome(distances, scales, chosen)
    return outcome
