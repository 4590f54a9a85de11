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
from functools import partial
from math import sqrt

import torch

from crowdtrain.robust.buckets import Bucket, read_bucket
from crowdtrain.robust.fragments import (
    Fragment,
    for_each_fragment,
    gather,
    scatter,
    squared_distance,
)
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
    workers: int = 1,
) -> ClipOutcome:
    """Run ``iters`` centered-clipping iterations over the bucket inputs, updating ``v`` in place.

    ``v`` holds the starting centre (the previous aggregate) as contiguous float32 tensors and
    ends as the aggregate. When ``member_sq`` is given, the first pass adds each original
    contribution's squared distance to the starting centre into it. ``workers`` > 1 runs the
    fragments of each pass on that many threads (the result is the same bit for bit).
    """
    total_weight = sum(bucket.weight for bucket in buckets)
    outcome = ClipOutcome([], [], 0.0)
    for iteration in range(iters):
        track = member_sq if iteration == 0 else None
        pass1 = partial(_distances, sources, weights, buckets, v, track is not None)
        # Per-fragment sums added in fragment order: the same bits with any number of workers.
        sq = [0.0] * len(buckets)
        for fragment_sq, part in for_each_fragment(pass1, fragments, workers):
            sq = [a + b for a, b in zip(sq, fragment_sq, strict=True)]
            if track is not None:
                for member, value in part.items():
                    track[member] += value
        distances = [sqrt(s) for s in sq]
        scales, chosen = clip_scales(distances, tau)
        coefs = [b.weight * c / total_weight for b, c in zip(buckets, scales, strict=True)]
        pass2 = partial(_update, sources, weights, buckets, v, coefs)
        for_each_fragment(pass2, fragments, workers)
        outcome = ClipOutcome(distances, scales, chosen)
    return outcome


def _distances(
    sources: Sequence[DeltaSource],
    weights: Sequence[float],
    buckets: Sequence[Bucket],
    v: dict[str, torch.Tensor],
    track: bool,
    fragment: Fragment,
) -> tuple[list[float], dict[int, float]]:
    """Pass 1 on one fragment: each input's squared distance to ``v``, and (with ``track``)
    each member's, by member index."""
    centre = gather(v, fragment)
    members = [m for bucket in buckets for m in bucket.members]
    part = [0.0] * (max(members, default=-1) + 1) if track else None
    sq = []
    for bucket in buckets:
        x = read_bucket(sources, weights, bucket, fragment, centre=centre, member_sq=part)
        sq.append(squared_distance(x, centre))
    return sq, {} if part is None else {m: part[m] for m in members}


def _update(
    sources: Sequence[DeltaSource],
    weights: Sequence[float],
    buckets: Sequence[Bucket],
    v: dict[str, torch.Tensor],
    coefs: Sequence[float],
    fragment: Fragment,
) -> None:
    """Pass 2 on one fragment: v + Σ a_g (x_g − v) = (1 − Σ a_g) v + Σ a_g x_g, without an
    (x_g − v) buffer."""
    updated = gather(v, fragment).mul(1.0 - sum(coefs))
    for bucket, coef in zip(buckets, coefs, strict=True):
        if coef:
            updated.add_(read_bucket(sources, weights, bucket, fragment), alpha=coef)
    scatter(v, fragment, updated)
