"""Aggregate K pseudo-gradients into one, robustly and in bounded memory.

The coordinator's aggregation step in DiLoCo (Douillard et al. 2023, arXiv:2311.08105): the
contributions of one round, weighted by the samples each volunteer processed, become the one
pseudo-gradient the outer optimizer applies. The rules (``AggregationConfig.method``):

- ``mean``: the sample-weighted mean.
- ``median`` / ``trimmed_mean``: coordinate-wise order statistics, unweighted (Yin et al.,
  ICML 2018; see ``coordinatewise``).
- ``centered_clip``: centered clipping around the previous aggregate (Karimireddy, He and Jaggi,
  ICML 2021; see ``centered_clip``).

``bucket_size > 1`` first averages random buckets of contributions (Karimireddy, He and Jaggi,
ICLR 2022; see ``buckets``) for every rule except ``mean``, which bucketing would not change.

Every rule runs fragment by fragment (see ``fragments``), reading contributions through
``DeltaSource`` so that they may stay on disk; memory never grows with contributions × model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import isfinite, sqrt

import torch

from crowdtrain.config import AggregationConfig
from crowdtrain.robust.buckets import Bucket, make_buckets, read_bucket
from crowdtrain.robust.centered_clip import centered_clip
from crowdtrain.robust.coordinatewise import (
    coordinate_median,
    coordinate_trimmed_mean,
    trim_count,
)
from crowdtrain.robust.fragments import (
    Fragment,
    for_each_fragment,
    gather,
    plan_fragments,
    read_fragment,
    scatter,
    squared_distance,
)
from crowdtrain.robust.sources import DeltaSource

__all__ = ["AggregateResult", "aggregate", "global_norms"]


@dataclass
class AggregateResult:
    """The aggregate and what the aggregator saw of each contribution.

    ``distances[i]``: L2 distance of contribution i to the reference (zeros when none) over
    the whole model. ``scales[i]``: the clipping factor applied to contribution i (for
    bucketed centered clipping, that of its bucket in the last iteration; 1.0 for rules that
    do not clip). ``tau``: the clipping radius of the last iteration (None when not clipping).
    """

    delta: dict[str, torch.Tensor]
    distances: list[float]
    scales: list[float]
    tau: float | None


def aggregate(
    sources: Sequence[DeltaSource],
    weights: Sequence[float],
    shapes: Mapping[str, tuple[int, ...]],
    cfg: AggregationConfig,
    *,
    reference: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    workers: int = 1,
    distances: bool = True,
) -> AggregateResult:
    """Aggregate contributions ``sources`` (weights = samples processed) with ``cfg.method``.

    ``shapes`` names every parameter and its shape, in the order fragments are cut.
    ``reference`` is the previous round's aggregate: the centre of centered clipping and the
    point ``distances`` are measured from (zeros when None). ``seed`` drives the bucket shuffle.
    ``workers`` > 1 runs ``mean`` and ``centered_clip`` on that many threads, fragments in
    parallel, with the same result bit for bit (``fragments.for_each_fragment``).
    ``distances=False`` skips measuring each contribution's distance (``distances`` is then
    empty), which saves two of the passes over each contribution's elements.

    Memory bound. Let F = ``cfg.fragment_numel``, P = the model's element count and G = the
    number of robust-rule inputs (K contributions, or ceil(K / bucket_size) buckets). Nothing
    of size K × P is ever allocated. Beyond what the sources and the caller's reference already
    occupy, peak extra memory is P × 4 bytes (the float32 output; a float32 CPU copy of the
    reference is made only if it is not one already) plus, live at once:

    - ``mean`` and ``centered_clip``: at most 5 × F × 4 bytes (a read buffer, a bucket or
      update accumulator, a distance temporary, the centre's fragment), independent of K,
      because contributions are streamed one fragment at a time;
    - ``median`` and ``trimmed_mean``: (G + 5) × F × 4 bytes (the G input rows of one
      fragment, a read buffer and a bucket accumulator while filling them, then 4 × F of sort
      scratch and the fragment's result; the scratch grows to 4 × 64 × G elements only when
      G > F / 64).

    A source may add its own transient copy of a read (``SafetensorsFileSource`` does), and
    the memory allocator may keep a few freed fragment-sized buffers, so measured peak RSS can
    exceed these figures by a few × F × 4 bytes; ``tests/robust/test_robust_memory.py``
    measures it for K = 32 and a 10.4M-parameter model.

    Sources are read once per fragment per pass: once for ``mean``, ``median`` and
    ``trimmed_mean``, 2 × ``clip_iters`` times for ``centered_clip``.

    Raises ValueError, in one sentence, when there is no contribution, weights and sources
    differ in number, a weight is not a finite positive number, the reference or a
    contribution does not match ``shapes``, or a contribution holds a non-finite value.
    """
    weight_list = _check_inputs(sources, weights, shapes, reference)
    fragments = plan_fragments(shapes, cfg.fragment_numel)
    ref = None if reference is None else _as_float32(reference, shapes)
    member_sq: list[float] | None = [0.0] * len(sources) if distances else None
    scales = [1.0] * len(sources)
    tau: float | None = None

    if cfg.method == "mean":
        delta = _zeros(shapes)
        _weighted_mean(sources, weight_list, fragments, delta, ref, member_sq, workers)
    elif cfg.method == "centered_clip":
        buckets = make_buckets(weight_list, cfg.bucket_size, seed)
        delta = _zeros(shapes) if ref is None else {n: t.clone() for n, t in ref.items()}
        outcome = centered_clip(
            sources,
            weight_list,
            buckets,
            fragments,
            delta,
            tau=cfg.clip_tau,
            iters=cfg.clip_iters,
            member_sq=member_sq,
            workers=workers,
        )
        tau = outcome.tau
        for bucket, scale in zip(buckets, outcome.scales, strict=True):
            for member in bucket.members:
                scales[member] = scale
    else:
        buckets = make_buckets(weight_list, cfg.bucket_size, seed)
        delta = _zeros(shapes)
        _order_statistic(cfg, sources, weight_list, buckets, fragments, delta, ref, member_sq)

    return AggregateResult(delta, [sqrt(s) for s in member_sq or []], scales, tau)


def global_norms(
    sources: Sequence[DeltaSource],
    shapes: Mapping[str, tuple[int, ...]],
    fragment_numel: int,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> list[float]:
    """‖x_i − reference‖ over the whole model for every source, read fragment by fragment."""
    ref = None if reference is None else _as_float32(reference, shapes)
    sq = [0.0] * len(sources)
    for fragment in plan_fragments(shapes, fragment_numel):
        centre = None if ref is None else gather(ref, fragment)
        for index, source in enumerate(sources):
            x = read_fragment(source, fragment, f"contribution {index}")
            sq[index] += squared_distance(x, centre)
    return [sqrt(s) for s in sq]


def _weighted_mean(
    sources: Sequence[DeltaSource],
    weights: list[float],
    fragments: Sequence[Fragment],
    out: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor] | None,
    member_sq: list[float] | None,
    workers: int,
) -> None:
    total = sum(weights)

    def mean_of(fragment: Fragment) -> list[float]:
        centre = None if ref is None else gather(ref, fragment)
        acc = torch.zeros(fragment.numel, dtype=torch.float32)
        sq = []
        for index, source in enumerate(sources):
            x = read_fragment(source, fragment, f"contribution {index}")
            if member_sq is not None:
                sq.append(squared_distance(x, centre))
            acc.add_(x, alpha=weights[index] / total)
        scatter(out, fragment, acc)
        return sq

    for sq in for_each_fragment(mean_of, fragments, workers):  # summed in fragment order
        if member_sq is not None:
            member_sq[:] = [a + b for a, b in zip(member_sq, sq, strict=True)]


def _order_statistic(
    cfg: AggregationConfig,
    sources: Sequence[DeltaSource],
    weights: list[float],
    buckets: Sequence[Bucket],
    fragments: Sequence[Fragment],
    out: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor] | None,
    member_sq: list[float] | None,
) -> None:
    """Coordinate-wise median or trimmed mean of the bucket inputs, fragment by fragment."""
    trim = trim_count(cfg.trim_fraction, len(buckets))
    widest = max((fragment.numel for fragment in fragments), default=0)
    stack = torch.empty(len(buckets), widest, dtype=torch.float32)  # reused for every fragment
    for fragment in fragments:
        rows = stack[:, : fragment.numel]
        _fill_inputs(rows, sources, weights, buckets, fragment, ref, member_sq)
        if cfg.method == "median":
            values = coordinate_median(rows)
        else:
            values = coordinate_trimmed_mean(rows, trim)
        scatter(out, fragment, values)


def _fill_inputs(
    rows: torch.Tensor,
    sources: Sequence[DeltaSource],
    weights: list[float],
    buckets: Sequence[Bucket],
    fragment: Fragment,
    ref: dict[str, torch.Tensor] | None,
    member_sq: list[float] | None,
) -> None:
    """Write each bucket's fragment into its row of ``rows``, tallying member distances."""
    centre = None if ref is None else gather(ref, fragment)
    for index, bucket in enumerate(buckets):
        rows[index] = read_bucket(
            sources, weights, bucket, fragment, centre=centre, member_sq=member_sq
        )


def _zeros(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {name: torch.zeros(shape, dtype=torch.float32) for name, shape in shapes.items()}


def _as_float32(
    reference: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """The reference's tensors as contiguous float32 CPU tensors (no copy when they are)."""
    return {
        name: reference[name].detach().to(device="cpu", dtype=torch.float32).contiguous()
        for name in shapes
    }


def _check_inputs(
    sources: Sequence[DeltaSource],
    weights: Sequence[float],
    shapes: Mapping[str, tuple[int, ...]],
    reference: Mapping[str, torch.Tensor] | None,
) -> list[float]:
    if len(sources) == 0:
        raise ValueError("there is nothing to aggregate: at least one contribution is needed")
    if len(weights) != len(sources):
        raise ValueError(
            f"got {len(weights)} weights for {len(sources)} contributions; "
            "give exactly one weight (samples processed) per contribution"
        )
    weight_list = [float(w) for w in weights]
    for index, weight in enumerate(weight_list):
        if not (isfinite(weight) and weight > 0):
            raise ValueError(
                f"the weight of contribution {index} is {weight}; "
                "weights must be finite numbers greater than zero"
            )
    for name, shape in shapes.items():
        if any(int(d) < 0 for d in shape):
            raise ValueError(f"parameter '{name}' has an invalid shape {tuple(shape)}")
    if reference is not None:
        for name, shape in shapes.items():
            if name not in reference:
                raise ValueError(f"the reference aggregate has no parameter named '{name}'")
            got = tuple(reference[name].shape)
            if got != tuple(shape):
                raise ValueError(
                    f"the reference aggregate's '{name}' has shape {got}, "
                    f"but the model's is {tuple(shape)}"
                )
    return weight_list
