"""Bucketing: average random groups of contributions before a robust rule sees them.

Karimireddy, He and Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing"
(ICLR 2022): shuffle the K contributions, split them into buckets of ``bucket_size`` and hand the
robust aggregator the bucket means instead of the raw contributions. Averaging shrinks the spread
that honest-but-heterogeneous volunteers (different data, different speeds) show, so a robust
rule no longer mistakes them for attackers, while a minority of attackers still only poisons a
minority of buckets.

Here a bucket's mean is sample-weighted and the bucket's weight is its members' total weight.
Bucket means are never stored for the whole model: ``read_bucket`` builds one fragment of one
bucket on the fly from its members' fragments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from crowdtrain.robust.fragments import Fragment, read_fragment, squared_distance
from crowdtrain.robust.sources import DeltaSource

__all__ = ["Bucket", "make_buckets", "read_bucket"]


@dataclass(frozen=True)
class Bucket:
    """Contributions averaged into one input of the robust rule, and their total weight."""

    members: tuple[int, ...]
    weight: float


def make_buckets(weights: Sequence[float], bucket_size: int, seed: int) -> list[Bucket]:
    """Shuffle contribution indices with a generator seeded by ``seed`` and group them.

    With ``bucket_size <= 1`` every contribution is its own bucket, in order. Otherwise the
    last bucket holds the remainder when ``bucket_size`` does not divide the count.
    """
    count = len(weights)
    if bucket_size <= 1:
        return [Bucket((i,), float(weights[i])) for i in range(count)]
    generator = torch.Generator().manual_seed(seed)
    order = [int(i) for i in torch.randperm(count, generator=generator).tolist()]
    buckets = []
    for first in range(0, count, bucket_size):
        members = tuple(order[first : first + bucket_size])
        buckets.append(Bucket(members, float(sum(weights[i] for i in members))))
    return buckets


def read_bucket(
    sources: Sequence[DeltaSource],
    weights: Sequence[float],
    bucket: Bucket,
    fragment: Fragment,
    *,
    centre: torch.Tensor | None = None,
    member_sq: list[float] | None = None,
) -> torch.Tensor:
    """One fragment of a bucket's sample-weighted mean; the result must not be modified.

    When ``member_sq`` is given, each member's squared distance to ``centre`` (zeros when
    None) on this fragment is added to ``member_sq[member]`` on the way.
    """
    if len(bucket.members) == 1:
        (member,) = bucket.members
        x = read_fragment(sources[member], fragment, f"contribution {member}")
        if member_sq is not None:
            member_sq[member] += squared_distance(x, centre)
        return x
    total = torch.zeros(fragment.numel, dtype=torch.float32)
    for member in bucket.members:
        x = read_fragment(sources[member], fragment, f"contribution {member}")
        if member_sq is not None:
            member_sq[member] += squared_distance(x, centre)
        total.add_(x, alpha=weights[member] / bucket.weight)
    return total
