"""Properties every aggregation rule must keep, checked with hypothesis on small random models."""

from __future__ import annotations

from math import prod

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crowdtrain.config import AggregationConfig
from crowdtrain.robust import DictSource, aggregate
from crowdtrain.robust.fragments import plan_fragments

METHODS = ["mean", "median", "trimmed_mean", "centered_clip"]

shapes_st = st.dictionaries(
    st.sampled_from(["a", "b", "c", "d"]),
    st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple),
    min_size=1,
    max_size=4,
)


def config(method: str, fragment_numel: int, **extra: object) -> AggregationConfig:
    cfg = AggregationConfig.model_validate({"method": method, **extra})
    # Tiny fragments (below the config's 1024 floor) so small models are really cut up.
    return cfg.model_copy(update={"fragment_numel": fragment_numel})


def random_model(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) * 3 for name, shape in shapes.items()}


def flat(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> torch.Tensor:
    return torch.cat([tensors[name].reshape(-1) for name in shapes])


@settings(max_examples=40, deadline=None)
@given(
    shapes=shapes_st,
    fragment_numel=st.integers(1, 40),
    data=st.data(),
)
def test_fragments_tile_the_model(
    shapes: dict[str, tuple[int, ...]], fragment_numel: int, data: st.DataObject
) -> None:
    fragments = plan_fragments(shapes, fragment_numel)
    seen = {name: torch.zeros(prod(shape), dtype=torch.int32) for name, shape in shapes.items()}
    for fragment in fragments:
        assert 0 < fragment.numel <= fragment_numel
        assert sum(p.numel for p in fragment.pieces) == fragment.numel
        for piece in fragment.pieces:
            seen[piece.name][piece.start : piece.stop] += 1
    assert all(bool((count == 1).all()) for count in seen.values())
    assert all(f.numel == fragment_numel for f in fragments[:-1])


@settings(max_examples=40, deadline=None)
@given(
    method=st.sampled_from(METHODS),
    shapes=shapes_st,
    k=st.integers(1, 6),
    bucket=st.integers(1, 3),
    fragment_numel=st.integers(1, 40),
    seed=st.integers(0, 1000),
    weights_seed=st.integers(0, 1000),
)
def test_identical_contributions_aggregate_to_themselves(
    method: str,
    shapes: dict[str, tuple[int, ...]],
    k: int,
    bucket: int,
    fragment_numel: int,
    seed: int,
    weights_seed: int,
) -> None:
    x = random_model(shapes, seed)
    weights = torch.randint(1, 50, (k,), generator=torch.Generator().manual_seed(weights_seed))
    cfg = config(method, fragment_numel, bucket_size=bucket, trim_fraction=0.2)
    result = aggregate([DictSource(x)] * k, weights.tolist(), shapes, cfg, seed=seed)
    torch.testing.assert_close(flat(result.delta, shapes), flat(x, shapes), rtol=1e-5, atol=1e-5)
    # Bucket means of equal values round slightly, so adaptive τ may clip by ~1e-7.
    assert result.scales == pytest.approx([1.0] * k, rel=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    method=st.sampled_from(["mean", "median", "trimmed_mean"]),
    shapes=shapes_st,
    k=st.integers(1, 7),
    fragment_numel=st.integers(1, 40),
    seed=st.integers(0, 1000),
    perm_seed=st.integers(0, 1000),
)
def test_aggregates_are_permutation_invariant(
    method: str,
    shapes: dict[str, tuple[int, ...]],
    k: int,
    fragment_numel: int,
    seed: int,
    perm_seed: int,
) -> None:
    contributions = [random_model(shapes, seed + i) for i in range(k)]
    weights = [float(1 + (seed + 7 * i) % 13) for i in range(k)]
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(perm_seed)).tolist()
    cfg = config(method, fragment_numel, bucket_size=1, trim_fraction=0.3)
    a = aggregate([DictSource(c) for c in contributions], weights, shapes, cfg)
    b = aggregate(
        [DictSource(contributions[i]) for i in perm], [weights[i] for i in perm], shapes, cfg
    )
    if method == "mean":  # summation order changes the rounding only
        torch.testing.assert_close(flat(a.delta, shapes), flat(b.delta, shapes))
    else:  # order statistics sort the same values whatever the order they came in
        assert torch.equal(flat(a.delta, shapes), flat(b.delta, shapes))
    assert [a.distances[i] for i in perm] == b.distances


@settings(max_examples=40, deadline=None)
@given(
    shapes=shapes_st,
    k=st.integers(1, 7),
    bucket=st.integers(1, 3),
    iters=st.integers(1, 3),
    fragment_numel=st.integers(1, 40),
    seed=st.integers(0, 1000),
    with_reference=st.booleans(),
)
def test_centered_clip_with_infinite_tau_is_the_weighted_mean(
    shapes: dict[str, tuple[int, ...]],
    k: int,
    bucket: int,
    iters: int,
    fragment_numel: int,
    seed: int,
    with_reference: bool,
) -> None:
    contributions = [random_model(shapes, seed + i) for i in range(k)]
    weights = [float(1 + (seed + 5 * i) % 11) for i in range(k)]
    reference = random_model(shapes, seed + 999) if with_reference else None
    sources = [DictSource(c) for c in contributions]
    clip = config(
        "centered_clip", fragment_numel, bucket_size=bucket, clip_iters=iters, clip_tau=1e30
    )
    result = aggregate(sources, weights, shapes, clip, reference=reference, seed=seed)
    mean = aggregate(sources, weights, shapes, config("mean", fragment_numel))
    torch.testing.assert_close(
        flat(result.delta, shapes), flat(mean.delta, shapes), rtol=1e-5, atol=1e-5
    )
    assert result.scales == [1.0] * k
    assert result.tau == 1e30
