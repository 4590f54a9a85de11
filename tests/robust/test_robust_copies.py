"""Copy and replay detection: sampled fingerprints and the adaptive cosine threshold."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from crowdtrain.config import DefenceConfig
from crowdtrain.robust import DictSource, SafetensorsFileSource
from crowdtrain.robust.copies import (
    MAX_ADAPTIVE_THRESHOLD,
    copy_threshold,
    detect_copies,
    fingerprint,
)

CFG = DefenceConfig(copy_min_cos=0.95, copy_ratio=0.1)  # the behaviour at fixed settings
MIN_COS, RATIO = CFG.copy_min_cos, CFG.copy_ratio
DIM = 4096  # fingerprint length for the detect_copies tests


def detect(
    current: list[torch.Tensor], earlier: list[torch.Tensor] | None = None
) -> list[str | None]:
    return detect_copies(current, earlier or [], min_cos=MIN_COS, ratio=RATIO)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=gen(seed))


def honest_round(count: int, cosine: float, seed: int, dim: int = DIM) -> list[torch.Tensor]:
    """Honest-like deltas: a shared component plus independent parts, pairwise cosine ≈ cosine."""
    shared = randn(dim, seed)
    return [
        math.sqrt(cosine) * shared + math.sqrt(1 - cosine) * randn(dim, seed + 1 + i)
        for i in range(count)
    ]


def noisy_copy(x: torch.Tensor, relative: float, seed: int) -> torch.Tensor:
    noise = randn(x.numel(), seed)
    return x + noise * (relative * float(x.norm()) / float(noise.norm()))


def cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=0))


# ---------------------------------------------------------------- detect_copies


def test_exact_copy_later_in_the_round_is_flagged_and_the_first_is_not() -> None:
    a, b = randn(DIM, 0), randn(DIM, 1)
    reasons = detect([a, b, a.clone()])
    assert reasons[:2] == [None, None]
    assert reasons[2] == "a near-copy of contribution #0 submitted earlier in this round"


@pytest.mark.parametrize("scale", [0.9, 1.1, 1e-3, 1e3])
def test_rescaled_copy_is_flagged(scale: float) -> None:
    round_ = [randn(DIM, i) for i in range(4)]
    reasons = detect([*round_, round_[1] * scale])
    assert reasons[:4] == [None] * 4
    assert reasons[4] is not None and "contribution #1 submitted earlier" in reasons[4]


@pytest.mark.parametrize("cosine", [0.6, 0.7, 0.8])
def test_copies_with_one_percent_noise_are_flagged_among_honest_deltas(cosine: float) -> None:
    round_ = honest_round(8, cosine, seed=10)
    copies = [noisy_copy(round_[3], 0.01, 100), noisy_copy(round_[5] * 1.1, 0.01, 101)]
    reasons = detect([*round_, *copies])
    assert reasons[:8] == [None] * 8
    assert reasons[8] is not None and "#3 " in reasons[8]
    assert reasons[9] is not None and "#5 " in reasons[9]


def test_the_copy_named_is_the_closest_match() -> None:
    a = randn(DIM, 0)
    near = noisy_copy(a, 0.05, 1)
    nearer = noisy_copy(a, 0.001, 2)
    honest = [randn(DIM, 10 + i) for i in range(3)]
    reasons = detect([*honest, near, nearer, a])
    assert reasons[:4] == [None] * 4
    assert "#3 " in str(reasons[4])
    assert "#4 " in str(reasons[5])  # a is closer to `nearer` than to `near`


def test_order_decides_which_one_is_flagged() -> None:
    a, b = randn(DIM, 0), randn(DIM, 1)
    for first, second in [(a, 2 * a), (2 * a, a)]:
        reasons = detect([first, second, b])
        assert reasons[0] is None and reasons[2] is None
        assert "#0 " in str(reasons[1])


def test_several_copies_of_one_update_are_all_flagged_but_the_first() -> None:
    a = randn(DIM, 0)
    honest = [randn(DIM, i) for i in range(1, 4)]
    reasons = detect([honest[0], a, honest[1], a * 0.9, a * 1.1, honest[2], noisy_copy(a, 0.01, 9)])
    flagged = [i for i, r in enumerate(reasons) if r is not None]
    assert flagged == [3, 4, 6]


def test_stale_replay_of_an_earlier_round_is_flagged() -> None:
    old_round = honest_round(5, 0.7, seed=20)
    new_round = honest_round(5, 0.7, seed=40)
    replay = old_round[2].clone()
    current = [*new_round[:2], replay, *new_round[2:]]
    reasons = detect(current, earlier=old_round)
    assert reasons[2] == "a near-copy of a contribution accepted in an earlier round (a replay)"
    assert [i for i, r in enumerate(reasons) if r is not None] == [2]


def test_replay_is_flagged_even_when_it_is_first_or_alone() -> None:
    old = randn(DIM, 3)
    assert "(a replay)" in str(detect([old * 0.5], earlier=[old])[0])
    assert "(a replay)" in str(detect([old, randn(DIM, 4)], earlier=[randn(DIM, 5), old])[0])


def test_independent_random_vectors_are_not_flagged() -> None:
    round_ = [randn(DIM, i) for i in range(16)]
    earlier = [randn(DIM, 100 + i) for i in range(16)]
    assert detect(round_, earlier) == [None] * 16


@pytest.mark.parametrize("cosine", [0.6, 0.7, 0.8])
def test_honest_like_deltas_are_not_flagged(cosine: float) -> None:
    round_ = honest_round(16, cosine, seed=int(cosine * 100))
    earlier = honest_round(16, cosine, seed=int(cosine * 100) + 50)
    threshold = copy_threshold(round_, min_cos=MIN_COS, ratio=RATIO)
    assert threshold == pytest.approx(max(MIN_COS, 1 - RATIO * (1 - cosine)), abs=0.01)
    assert detect(round_, earlier) == [None] * 16


def test_adaptive_threshold_when_honest_deltas_are_very_similar() -> None:
    round_ = honest_round(12, 0.95, seed=7)
    pairwise = [cos(x, y) for i, x in enumerate(round_) for y in round_[i + 1 :]]
    assert max(pairwise) > MIN_COS  # a fixed threshold of min_cos would flag honest peers
    threshold = copy_threshold(round_, min_cos=MIN_COS, ratio=RATIO)
    assert threshold == pytest.approx(0.995, abs=0.001)
    assert detect(round_) == [None] * 12
    # A copy with 1% noise (cosine ≈ 0.99995) is still caught.
    reasons = detect([*round_, noisy_copy(round_[4], 0.01, 99)])
    assert reasons[:12] == [None] * 12
    assert reasons[12] is not None and "#4 " in reasons[12] and "0.995" not in reasons[12]


def test_threshold_is_min_cos_with_fewer_than_three_usable_fingerprints() -> None:
    a = randn(DIM, 0)
    close = noisy_copy(a, 0.25, 1)  # cosine ≈ 0.97: above min_cos, below any adaptive limit
    assert copy_threshold([a, close], min_cos=MIN_COS, ratio=RATIO) == MIN_COS
    assert detect([a, close])[1] is not None
    zero = torch.zeros(DIM)
    assert copy_threshold([a, close, zero], min_cos=MIN_COS, ratio=RATIO) == MIN_COS
    assert copy_threshold([], min_cos=MIN_COS, ratio=RATIO) == MIN_COS


def test_threshold_follows_the_median_and_min_cos() -> None:
    round_ = honest_round(9, 0.9, seed=3)
    m = 0.9
    assert copy_threshold(round_, min_cos=0.5, ratio=0.5) == pytest.approx(
        1 - 0.5 * (1 - m), abs=0.01
    )
    assert copy_threshold(round_, min_cos=0.99, ratio=0.5) == 0.99
    assert copy_threshold(round_, min_cos=0.5, ratio=0.0) == MAX_ADAPTIVE_THRESHOLD


def test_a_majority_of_noisy_copies_cannot_lift_the_threshold_above_the_cap() -> None:
    # Seven Sybils submit noisy copies of one update: the median cosine of the round is ≈ 1,
    # but the adaptive threshold stops at MAX_ADAPTIVE_THRESHOLD, so the copies are caught.
    a = randn(DIM, 0)
    sybils = [noisy_copy(a, 0.02, 10 + i) for i in range(7)]
    round_ = [randn(DIM, 1), *sybils, randn(DIM, 2)]
    assert copy_threshold(round_, min_cos=MIN_COS, ratio=RATIO) == MAX_ADAPTIVE_THRESHOLD
    reasons = detect(round_)
    assert [i for i, r in enumerate(reasons) if r is not None] == [2, 3, 4, 5, 6, 7]


def test_min_cos_of_one_still_catches_exact_and_rescaled_copies() -> None:
    a = randn(DIM, 0)
    reasons = detect_copies([a, a * 0.9, a * 1.1, randn(DIM, 1)], [], min_cos=1.0, ratio=RATIO)
    assert [r is not None for r in reasons] == [False, True, True, False]


def test_zero_and_non_finite_fingerprints_are_never_flagged_or_matched() -> None:
    a = randn(DIM, 0)
    zero = torch.zeros(DIM)
    nan = torch.full((DIM,), math.nan)
    assert detect([zero, zero.clone(), a]) == [None, None, None]
    assert detect([a, zero, nan, nan.clone()], earlier=[zero, nan]) == [None] * 4
    reasons = detect([a, zero, a.clone()], earlier=[zero])
    assert reasons[:2] == [None, None] and "#0 " in str(reasons[2])


def test_nothing_to_compare() -> None:
    assert detect([]) == []
    assert detect([randn(DIM, 0)]) == [None]


def test_mismatched_or_bad_fingerprints_are_rejected() -> None:
    with pytest.raises(ValueError, match="this round's fingerprint 1 has shape"):
        detect([randn(DIM, 0), randn(DIM + 1, 1)])
    with pytest.raises(ValueError, match="earlier fingerprint 0 has shape"):
        detect([randn(DIM, 0)], earlier=[randn(DIM - 1, 1)])
    with pytest.raises(ValueError, match="1-D"):
        detect([torch.zeros(2, DIM // 2)])


@pytest.mark.parametrize(("min_cos", "ratio"), [(0.0, 0.1), (1.5, 0.1), (0.9, -0.1), (0.9, 2.0)])
def test_bad_limits_are_rejected(min_cos: float, ratio: float) -> None:
    with pytest.raises(ValueError, match="copy detection limits"):
        detect_copies([randn(8, 0)], [], min_cos=min_cos, ratio=ratio)


# ---------------------------------------------------------------- fingerprint

SHAPES: dict[str, tuple[int, ...]] = {
    "emb": (50, 32),
    "w": (32, 32),
    "bias": (32,),
    "scale": (),
    "empty": (0, 4),
    "head": (32, 50),
}
KEY = 0x5EC12E7


def model(seed: int, shapes: dict[str, tuple[int, ...]] = SHAPES) -> dict[str, torch.Tensor]:
    g = gen(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


class CountingSource:
    """A DictSource that records every range it is asked for."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.inner = DictSource(tensors)
        self.reads: list[tuple[str, int, int]] = []

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        self.reads.append((name, start, stop))
        return self.inner.read(name, start, stop)


def test_fingerprint_shape_dtype_and_determinism() -> None:
    source = DictSource(model(0))
    fp = fingerprint(source, SHAPES, key=KEY, blocks=20, block_len=8)
    assert fp.dtype == torch.float32 and fp.shape == (160,)
    assert torch.equal(fp, fingerprint(source, SHAPES, key=KEY, blocks=20, block_len=8))
    assert not torch.equal(fp, fingerprint(source, SHAPES, key=KEY + 1, blocks=20, block_len=8))


def test_positions_do_not_depend_on_the_source() -> None:
    first, second = CountingSource(model(1)), CountingSource(model(2))
    fp1 = fingerprint(first, SHAPES, key=KEY, blocks=30, block_len=8)
    fp2 = fingerprint(second, SHAPES, key=KEY, blocks=30, block_len=8)
    assert first.reads == second.reads
    assert not torch.equal(fp1, fp2)
    # The fingerprint is exactly the values read, block by block, zero-padded.
    expected = torch.zeros(30 * 8)
    for run, (name, start, stop) in enumerate(second.reads):
        expected[run * 8 : run * 8 + stop - start] = model(2)[name].reshape(-1)[start:stop]
    assert torch.equal(fp2, expected)


def test_fingerprint_reads_only_small_ranges_inside_one_parameter() -> None:
    source = CountingSource(model(3))
    fingerprint(source, SHAPES, key=KEY, blocks=200, block_len=8)
    assert len(source.reads) == 200
    sizes = {name: math.prod(shape) for name, shape in SHAPES.items()}
    for name, start, stop in source.reads:
        assert 0 <= start < stop <= sizes[name]
        assert stop - start == min(8, sizes[name])  # a full run, or a whole small parameter
    assert "empty" not in {name for name, _, _ in source.reads}
    assert {name for name, _, _ in source.reads} >= {"emb", "w", "bias", "head"}


def test_parameters_are_chosen_in_proportion_to_their_size() -> None:
    shapes: dict[str, tuple[int, ...]] = {"big": (9000,), "small": (1000,)}
    source = CountingSource(model(4, shapes))
    fingerprint(source, shapes, key=KEY, blocks=4000, block_len=1)
    share = sum(name == "small" for name, _, _ in source.reads) / 4000
    assert share == pytest.approx(0.1, abs=0.02)
    starts = torch.tensor([start for name, start, _ in source.reads if name == "big"])
    assert int(starts.min()) < 500 and int(starts.max()) > 8500  # offsets cover the parameter


def test_parameters_smaller_than_a_block_give_their_whole_tensor_padded() -> None:
    shapes: dict[str, tuple[int, ...]] = {"a": (3,), "b": (2, 2), "s": ()}
    tensors = model(5, shapes)
    fp = fingerprint(DictSource(tensors), shapes, key=KEY, blocks=12, block_len=8)
    padded = [torch.cat([t.reshape(-1), torch.zeros(8 - t.numel())]) for t in tensors.values()]
    for run in fp.view(12, 8):
        assert any(torch.equal(run, p) for p in padded)


def test_fingerprint_from_a_safetensors_file_matches_memory(tmp_path: Path) -> None:
    tensors = {name: t for name, t in model(6).items() if t.numel()}
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    path = tmp_path / "delta.safetensors"
    save_file(tensors, str(path))
    from_file = fingerprint(SafetensorsFileSource(path), shapes, key=KEY, blocks=16, block_len=8)
    assert torch.equal(
        from_file, fingerprint(DictSource(tensors), shapes, key=KEY, blocks=16, block_len=8)
    )


def test_fingerprint_errors() -> None:
    source = DictSource(model(0))
    with pytest.raises(ValueError, match="blocks >= 1"):
        fingerprint(source, SHAPES, key=KEY, blocks=0, block_len=8)
    with pytest.raises(ValueError, match="no parameter elements"):
        fingerprint(source, {"empty": (0,)}, key=KEY, blocks=4, block_len=8)
    with pytest.raises(ValueError, match="does not match the model"):
        fingerprint(source, {"missing": (100,)}, key=KEY, blocks=4, block_len=8)
    with pytest.raises(ValueError, match="does not match the model"):
        fingerprint(source, {"emb": (5000,)}, key=KEY, blocks=4, block_len=8)


def test_huge_keys_are_accepted() -> None:
    source = DictSource(model(0))
    fp = fingerprint(source, SHAPES, key=2**200 + 5, blocks=4, block_len=8)
    assert torch.equal(fp, fingerprint(source, SHAPES, key=5, blocks=4, block_len=8))


# A model of ~0.9M elements with parameters of different scales, as real deltas have.
BIG_SHAPES: dict[str, tuple[int, ...]] = {
    "emb": (256, 512),
    "attn": (512, 512),
    "mlp": (512, 768),
    "bias": (512,),
    "norm": (512,),
}
BIG_SCALES = {"emb": 1.0, "attn": 0.3, "mlp": 0.5, "bias": 3.0, "norm": 0.1}


def big_pair(cosine: float, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = gen(seed)
    x, y = {}, {}
    for name, shape in BIG_SHAPES.items():
        s, n = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        x[name] = BIG_SCALES[name] * s
        y[name] = BIG_SCALES[name] * (cosine * s + math.sqrt(1 - cosine**2) * n)
    return x, y


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[name].reshape(-1) for name in BIG_SHAPES])


@pytest.mark.parametrize("target", [-0.5, 0.0, 0.3, 0.6, 0.9, 0.99])
def test_fingerprint_cosine_tracks_the_true_cosine(target: float) -> None:
    x, y = big_pair(target, seed=int(100 * (target + 1)))
    true = cos(flat(x), flat(y))
    blocks, block_len = CFG.fingerprint_blocks, CFG.fingerprint_block_len
    assert blocks * block_len == 16384
    for key in (KEY, KEY + 1, 12345):
        fx = fingerprint(DictSource(x), BIG_SHAPES, key=key, blocks=blocks, block_len=block_len)
        fy = fingerprint(DictSource(y), BIG_SHAPES, key=key, blocks=blocks, block_len=block_len)
        assert cos(fx, fy) == pytest.approx(true, abs=0.05)


def test_fingerprints_of_real_sources_catch_a_copy_and_a_replay() -> None:
    shapes: dict[str, tuple[int, ...]] = {"a": (64, 64), "b": (64,), "c": (128, 32)}
    shared = model(50, shapes)

    def honest(seed: int) -> dict[str, torch.Tensor]:
        own = model(seed, shapes)
        return {k: 0.8 * shared[k] + 0.6 * own[k] for k in shapes}

    def fp(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return fingerprint(DictSource(tensors), shapes, key=KEY, blocks=64, block_len=16)

    old = [honest(60 + i) for i in range(4)]
    new = [honest(70 + i) for i in range(4)]
    copied = {k: 1.05 * v for k, v in new[1].items()}
    reasons = detect_copies(
        [fp(t) for t in [*new, copied, old[2]]],
        [fp(t) for t in old],
        min_cos=MIN_COS,
        ratio=RATIO,
    )
    assert reasons[:4] == [None] * 4
    assert "#1 " in str(reasons[4])
    assert "(a replay)" in str(reasons[5])
