"""Every aggregation rule against a plain whole-vector implementation written here.

The fragmented aggregator must give what the textbook formula gives on the whole flattened
model: the weighted mean, the coordinate-wise median and trimmed mean (Yin et al., ICML 2018),
bucketing (Karimireddy et al., ICLR 2022) and centered clipping (Karimireddy et al., ICML 2021).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from math import floor, prod

import pytest
import torch

from crowdtrain.config import AggregationConfig
from crowdtrain.robust import AggregateResult, DictSource, aggregate, global_norms

# 3819 elements: with fragment_numel=1024 fragments cut through 'w' and span several parameters.
SHAPES: dict[str, tuple[int, ...]] = {"w": (37, 61), "b": (61,), "e": (1500,), "s": ()}


def make_contributions(k: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {name: torch.randn(shape, generator=gen) * (1 + i % 3) for name, shape in SHAPES.items()}
        for i in range(k)
    ]


def make_weights(k: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed + 1)
    return [float(w) for w in torch.randint(1, 100, (k,), generator=gen)]


def flat(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[name].reshape(-1).float() for name in SHAPES])


def unflat(vector: torch.Tensor) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, shape in SHAPES.items():
        n = prod(shape)
        out[name] = vector[offset : offset + n].reshape(shape)
        offset += n
    return out


# --- whole-vector reference implementations -------------------------------------------------


def ref_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w[:, None] * x).sum(0) / w.sum()


def ref_buckets(
    x: torch.Tensor, w: torch.Tensor, size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    if size <= 1:
        return x, w, [[i] for i in range(len(w))]
    perm = torch.randperm(len(w), generator=torch.Generator().manual_seed(seed)).tolist()
    groups = [perm[i : i + size] for i in range(0, len(perm), size)]
    rows = torch.stack([ref_mean(x[g], w[g]) for g in groups])
    return rows, torch.stack([w[g].sum() for g in groups]), groups


def ref_median(x: torch.Tensor) -> torch.Tensor:
    s, k = x.sort(0).values, x.shape[0]
    return s[k // 2] if k % 2 else (s[k // 2 - 1] + s[k // 2]) / 2


def ref_trimmed(x: torch.Tensor, fraction: float) -> torch.Tensor:
    k = x.shape[0]
    b = floor(fraction * k + 1e-9)
    return x.sort(0).values[b : k - b].mean(0)


def ref_centered_clip(
    x: torch.Tensor, w: torch.Tensor, v: torch.Tensor, tau: float | None, iters: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    c = torch.ones(len(w))
    t = 0.0
    for _ in range(iters):
        d = (x - v).norm(dim=1)
        t = statistics.median(d.tolist()) if tau is None else tau
        c = torch.where(d <= t, torch.ones_like(d), t / d)
        v = v + ((w * c)[:, None] * (x - v)).sum(0) / w.sum()
    return v, c, t


# --- tests ------------------------------------------------------------------------------------


def run(
    method: str, k: int = 7, seed: int = 0, reference: bool = True, **cfg: object
) -> tuple[AggregateResult, torch.Tensor, torch.Tensor, torch.Tensor]:
    contributions = make_contributions(k, seed)
    weights = make_weights(k, seed)
    ref = make_contributions(1, seed + 100)[0] if reference else None
    config = AggregationConfig.model_validate({"method": method, "fragment_numel": 1024, **cfg})
    result = aggregate(
        [DictSource(c) for c in contributions],
        weights,
        SHAPES,
        config,
        reference=ref,
        seed=seed,
    )
    x = torch.stack([flat(c) for c in contributions])
    r = torch.zeros(x.shape[1]) if ref is None else flat(ref)
    return result, x, torch.tensor(weights), r


def check_distances(result: AggregateResult, x: torch.Tensor, r: torch.Tensor) -> None:
    expected = (x - r).norm(dim=1)
    assert torch.allclose(torch.tensor(result.distances), expected, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 7])
def test_mean_matches_weighted_mean(k: int) -> None:
    result, x, w, r = run("mean", k=k, bucket_size=3)
    assert set(result.delta) == set(SHAPES)
    assert all(result.delta[n].shape == SHAPES[n] for n in SHAPES)
    assert all(result.delta[n].dtype == torch.float32 for n in SHAPES)
    torch.testing.assert_close(flat(result.delta), ref_mean(x, w))
    assert result.scales == [1.0] * k and result.tau is None
    check_distances(result, x, r)


@pytest.mark.parametrize(("k", "bucket"), [(1, 1), (6, 1), (7, 1), (7, 2), (9, 3), (10, 4)])
def test_median_matches_reference(k: int, bucket: int) -> None:
    result, x, w, r = run("median", k=k, bucket_size=bucket, seed=k)
    rows, _, _ = ref_buckets(x, w, bucket, seed=k)
    torch.testing.assert_close(flat(result.delta), ref_median(rows))
    assert result.scales == [1.0] * k and result.tau is None
    check_distances(result, x, r)


@pytest.mark.parametrize(
    ("k", "bucket", "fraction"),
    [(7, 1, 0.2), (10, 1, 0.1), (10, 1, 0.49), (5, 1, 0.0), (9, 2, 0.3)],
)
def test_trimmed_mean_matches_reference(k: int, bucket: int, fraction: float) -> None:
    result, x, w, r = run("trimmed_mean", k=k, bucket_size=bucket, trim_fraction=fraction)
    rows, _, _ = ref_buckets(x, w, bucket, seed=0)
    torch.testing.assert_close(flat(result.delta), ref_trimmed(rows, fraction))
    check_distances(result, x, r)


@pytest.mark.parametrize(
    ("k", "bucket", "iters", "tau", "reference"),
    [
        (7, 1, 1, None, True),
        (7, 1, 3, None, False),
        (8, 2, 1, None, True),
        (8, 2, 4, 2.0, True),
        (9, 4, 2, 50.0, False),
        (5, 1, 2, 0.5, True),
    ],
)
def test_centered_clip_matches_reference(
    k: int, bucket: int, iters: int, tau: float | None, reference: bool
) -> None:
    result, x, w, r = run(
        "centered_clip",
        k=k,
        seed=k + iters,
        reference=reference,
        bucket_size=bucket,
        clip_iters=iters,
        clip_tau=tau,
    )
    rows, bw, groups = ref_buckets(x, w, bucket, seed=k + iters)
    v, c, t = ref_centered_clip(rows, bw, r, tau, iters)
    torch.testing.assert_close(flat(result.delta), v, rtol=1e-4, atol=1e-5)
    assert result.tau == pytest.approx(t, rel=1e-5)
    expected_scales = [0.0] * k
    for g, members in enumerate(groups):
        for m in members:
            expected_scales[m] = float(c[g])
    assert result.scales == pytest.approx(expected_scales, rel=1e-4)
    check_distances(result, x, r)
    if tau is None:
        assert min(result.scales) < 1.0  # adaptive τ = median distance clips about half


@pytest.mark.parametrize("fragment_numel", [1, 7, 61, 100_000])
@pytest.mark.parametrize("method", ["mean", "median", "trimmed_mean", "centered_clip"])
def test_fragment_size_does_not_change_the_result(method: str, fragment_numel: int) -> None:
    contributions = make_contributions(4, seed=3)
    sources = [DictSource(c) for c in contributions]
    weights = make_weights(4, seed=3)
    base = AggregationConfig.model_validate(dict(method=method, bucket_size=2, trim_fraction=0.25))
    # The config refuses fragments under 1024 elements; model_copy skips that check so tiny
    # fragments (even single elements) can be exercised here.
    tiny = base.model_copy(update={"fragment_numel": fragment_numel})
    expected = aggregate(sources, weights, SHAPES, base, seed=5)
    got = aggregate(sources, weights, SHAPES, tiny, seed=5)
    torch.testing.assert_close(flat(got.delta), flat(expected.delta), rtol=1e-5, atol=1e-6)
    assert got.distances == pytest.approx(expected.distances, rel=1e-5)
    assert got.scales == pytest.approx(expected.scales, rel=1e-5)


@pytest.mark.parametrize("method", ["mean", "centered_clip"])
def test_workers_do_not_change_a_single_bit(method: str) -> None:
    """Fragments in parallel on several threads: the aggregate, every distance and scale are
    identical to one thread's (per-fragment sums are added in fragment order); so are the
    aggregate and scales when the contributions' own distances are not measured."""
    contributions = make_contributions(7, seed=4)
    sources = [DictSource(c) for c in contributions]
    weights = make_weights(7, seed=4)
    cfg = AggregationConfig.model_validate(dict(method=method, bucket_size=2, clip_iters=2))
    cfg = cfg.model_copy(update={"fragment_numel": 100})  # 39 fragments
    reference = unflat(torch.randn(3819, generator=torch.Generator().manual_seed(9)))
    one = aggregate(sources, weights, SHAPES, cfg, reference=reference, seed=5)
    for workers in (2, 3):
        got = aggregate(sources, weights, SHAPES, cfg, reference=reference, seed=5, workers=workers)
        assert all(torch.equal(got.delta[k], one.delta[k]) for k in SHAPES)
        assert (got.distances, got.scales, got.tau) == (one.distances, one.scales, one.tau)
    bare = aggregate(sources, weights, SHAPES, cfg, reference=reference, seed=5, distances=False)
    assert all(torch.equal(bare.delta[k], one.delta[k]) for k in SHAPES)
    assert bare.distances == [] and (bare.scales, bare.tau) == (one.scales, one.tau)


def test_reference_is_not_modified_and_output_is_fresh() -> None:
    contributions = make_contributions(3, seed=1)
    ref = make_contributions(1, seed=2)[0]
    before = {n: t.clone() for n, t in ref.items()}
    cfg = AggregationConfig.model_validate(dict(method="centered_clip", fragment_numel=1024))
    result = aggregate(
        [DictSource(c) for c in contributions], [1, 2, 3], SHAPES, cfg, reference=ref
    )
    for name in SHAPES:
        assert torch.equal(ref[name], before[name])
        assert result.delta[name].data_ptr() != ref[name].data_ptr()


def test_global_norms_match_whole_vector_norms() -> None:
    contributions = make_contributions(5, seed=4)
    ref = make_contributions(1, seed=9)[0]
    x = torch.stack([flat(c) for c in contributions])
    sources = [DictSource(c) for c in contributions]
    got = global_norms(sources, SHAPES, fragment_numel=100)
    assert got == pytest.approx(x.norm(dim=1).tolist(), rel=1e-5)
    got_ref = global_norms(sources, SHAPES, fragment_numel=1000, reference=ref)
    assert got_ref == pytest.approx((x - flat(ref)).norm(dim=1).tolist(), rel=1e-5)


def test_bucketing_depends_on_seed_only() -> None:
    first, x, w, _ = run("median", k=9, bucket_size=2, seed=0)
    again, _, _, _ = run("median", k=9, bucket_size=2, seed=0)
    assert torch.equal(flat(first.delta), flat(again.delta))
    rows, _, _ = ref_buckets(x, w, 2, seed=1)
    other = aggregate(
        [DictSource(unflat(row)) for row in x],
        w.tolist(),
        SHAPES,
        AggregationConfig.model_validate(dict(method="median", bucket_size=2)),
        seed=1,
    )
    torch.testing.assert_close(flat(other.delta), ref_median(rows))
    assert not torch.equal(flat(other.delta), flat(first.delta))


# --- validation -------------------------------------------------------------------------------

CFG = AggregationConfig.model_validate(dict(method="mean"))


def one() -> list[DictSource]:
    return [DictSource(make_contributions(1, seed=0)[0])]


def test_rejects_no_contributions() -> None:
    with pytest.raises(ValueError, match="at least one contribution"):
        aggregate([], [], SHAPES, CFG)


def test_rejects_weight_count_mismatch() -> None:
    with pytest.raises(ValueError, match="2 weights for 1 contributions"):
        aggregate(one(), [1.0, 2.0], SHAPES, CFG)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_rejects_bad_weights(bad: float) -> None:
    with pytest.raises(ValueError, match="weight of contribution 0"):
        aggregate(one(), [bad], SHAPES, CFG)


def test_rejects_reference_with_wrong_shape() -> None:
    ref = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    ref["w"] = torch.zeros(61, 37)
    with pytest.raises(ValueError, match="reference aggregate's 'w' has shape"):
        aggregate(one(), [1.0], SHAPES, CFG, reference=ref)
    del ref["w"]
    with pytest.raises(ValueError, match="no parameter named 'w'"):
        aggregate(one(), [1.0], SHAPES, CFG, reference=ref)


def test_rejects_contribution_with_wrong_shape() -> None:
    short = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    short["e"] = torch.zeros(1499)
    with pytest.raises(ValueError, match="contribution 1"):
        aggregate([*one(), DictSource(short)], [1.0, 1.0], SHAPES, CFG)


@pytest.mark.parametrize("method", ["mean", "median", "trimmed_mean", "centered_clip"])
def test_rejects_non_finite_values(method: str) -> None:
    poisoned = make_contributions(1, seed=1)[0]
    poisoned["e"][7] = float("nan")
    cfg = AggregationConfig.model_validate(dict(method=method))
    with pytest.raises(ValueError, match=r"contribution 1 has non-finite values .* 'e'"):
        aggregate([*one(), DictSource(poisoned)], [1.0, 1.0], SHAPES, cfg)
