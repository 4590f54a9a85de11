"""Round trips: error bounds, top-k selection, error feedback, determinism, encode's refusals."""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crowdtrain import codec
from crowdtrain.config import CodecConfig

DENSE = ["fp32", "fp16", "bf16", "int8", "int4"]
FAST = settings(max_examples=60, deadline=None)


@st.composite
def delta_tensors(draw: st.DrawFn, max_numel: int = 1500) -> torch.Tensor:
    """A random float32 tensor: varied shapes (incl. scalars and 1 element) and magnitudes."""
    shape = tuple(draw(st.lists(st.integers(1, 37), min_size=0, max_size=3)))
    if math.prod(shape) > max_numel:
        shape = (max_numel // 3,)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    base = torch.randn(shape, generator=gen)
    exponent = draw(st.integers(-42, 29))
    kind = draw(st.sampled_from(["normal", "heavy", "sparse", "mixed", "constant"]))
    if kind == "heavy":
        base = base**3
    elif kind == "sparse":
        base = base * (torch.rand(shape, generator=gen) < 0.1)
    elif kind == "mixed":
        base = base * torch.pow(10.0, torch.randint(-15, 16, shape, generator=gen).float())
    elif kind == "constant":
        base = torch.full(shape, draw(st.sampled_from([0.0, 1.0, -3.5])))
    x = (base.double() * 10.0**exponent).clamp(-codec.MAX_ABS, codec.MAX_ABS)
    return x.to(torch.float32)


def roundtrip(x: torch.Tensor, spec: CodecConfig) -> torch.Tensor:
    payload = codec.encode({"x": x}, spec)
    return codec.decode(payload, {"x": tuple(x.shape)})["x"]


def assert_within_bound(x: torch.Tensor, spec: CodecConfig) -> None:
    y = roundtrip(x, spec)
    assert y.dtype == torch.float32 and y.shape == x.shape
    bound = codec.error_bound(x, spec)
    assert bound.shape == x.shape
    bad = (y - x).abs() > bound
    assert not bool(bad.any()), (x[bad][:5], y[bad][:5], bound[bad][:5])


@FAST
@given(
    x=delta_tensors(),
    name=st.sampled_from(DENSE),
    block=st.sampled_from([8, 9, 64, 100, 4096]),
)
def test_dense_codecs_stay_within_error_bound(x: torch.Tensor, name: str, block: int) -> None:
    assert_within_bound(x, CodecConfig(name=name, block_size=block))


@FAST
@given(
    x=hnp.arrays(
        np.float32,
        st.integers(1, 200),
        elements=st.floats(-(2.0**100), 2.0**100, width=32, allow_nan=False),
    ),
    name=st.sampled_from(DENSE),
)
def test_error_bound_holds_for_extreme_floats(x: np.ndarray, name: str) -> None:
    """Subnormals, signed zeros and values up to 2^100 all respect the bound."""
    assert_within_bound(torch.from_numpy(x.copy()), CodecConfig(name=name, block_size=16))


def test_fp32_is_exact_and_bounds_are_tight_enough() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(roundtrip(x, CodecConfig(name="fp32")), x)
    int8 = codec.error_bound(x, CodecConfig(name="int8", block_size=1000))
    assert float(int8.max()) <= float(x.abs().max()) / 127 * 0.51
    fp16 = codec.error_bound(x, CodecConfig(name="fp16"))
    assert bool((fp16 <= x.abs() * 2.0**-10 + 1e-8).all())


@pytest.mark.parametrize("magnitude", [1e-7, 1e6, 3e29])
def test_fp16_neither_overflows_nor_loses_small_values(magnitude: float) -> None:
    """Values above 65504 and below fp16's normal range keep ~11 bits of relative precision."""
    x = torch.randn(500, generator=torch.Generator().manual_seed(2)) * magnitude
    y = roundtrip(x, CodecConfig(name="fp16"))
    assert bool(torch.isfinite(y).all())
    big = x.abs() > magnitude * 1e-3
    assert bool(((y - x).abs()[big] <= x.abs()[big] * 2.0**-10).all())


TOPK_SPECS = st.builds(
    lambda chunk, frac: CodecConfig(
        name="topk2bit", chunk_size=chunk, topk=max(1, min(chunk, round(chunk * frac)))
    ),
    st.sampled_from([16, 17, 50, 64, 256]),
    st.floats(0.0, 1.0),
)


def chunk_rows(x: torch.Tensor, size: int) -> torch.Tensor:
    full = x.numel() // size
    return x.reshape(-1)[: full * size].view(full, size)


@FAST
@given(x=delta_tensors(max_numel=3000), spec=TOPK_SPECS)
def test_topk2bit_keeps_the_largest_entries_of_each_chunk(
    x: torch.Tensor, spec: CodecConfig
) -> None:
    payload = codec.encode({"x": x}, spec)
    y = codec.decode(payload, {"x": tuple(x.shape)})["x"]
    size, k = spec.chunk_size, spec.topk
    assert bool(((y != 0).sum() <= k * math.ceil(x.numel() / size)).item())
    assert bool(((chunk_rows(y, size) != 0).sum(dim=1) <= k).all())
    # The transmitted positions are the k largest |x| of every full chunk.
    idx = safetensors.torch.load(payload)["x::idx"].to(torch.int64)
    rows = chunk_rows(x, size).abs()
    if rows.numel():
        chosen = idx[: rows.shape[0] * k].view(-1, k)
        picked = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, chosen, True)
        low = torch.where(picked, rows, torch.full_like(rows, math.inf)).amin(dim=1)
        high = torch.where(picked, torch.full_like(rows, -1.0), rows).amax(dim=1)
        assert bool((low >= high).all())
    # Kept entries keep their sign; the documented bound (chunk max |x|) holds.
    assert bool((y * x >= 0).all())
    assert bool(((y - x).abs() <= codec.error_bound(x, spec)).all())


@FAST
@given(
    x=delta_tensors(),
    seed=st.integers(0, 2**31),
    r_scale=st.sampled_from([0.0, 1e-6, 1.0, 1e4]),
    name=st.sampled_from([*DENSE, "topk2bit"]),
    decay=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
)
def test_error_feedback_keeps_what_was_not_sent(
    x: torch.Tensor, seed: int, r_scale: float, name: str, decay: float
) -> None:
    """decoded + new residual == ef_decay * old residual + delta, for every codec."""
    x = x.clamp(-1e20, 1e20)
    r = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * r_scale
    spec = CodecConfig(name=name, chunk_size=16, topk=3, block_size=8, ef_decay=decay)
    residual = {"x": r.clone()}
    kept = residual["x"]
    acc = decay * r + x
    payload = codec.encode({"x": x}, spec, residual=residual)
    y = codec.decode(payload, {"x": tuple(x.shape)})["x"]
    assert residual["x"] is kept  # updated in place
    scale = float(acc.abs().max()) if acc.numel() else 0.0
    assert torch.allclose(y + residual["x"], acc, rtol=0, atol=scale * 1e-6 + 1e-30)


def test_error_feedback_sets_missing_residuals() -> None:
    residual: dict[str, torch.Tensor] = {}
    x = torch.randn(3, 70)
    codec.encode({"x": x}, CodecConfig(name="topk2bit", chunk_size=32, topk=4), residual)
    assert residual["x"].shape == x.shape and bool(residual["x"].abs().sum() > 0)


@pytest.mark.parametrize("name", ["topk2bit", "int4"])
def test_error_feedback_tracks_a_constant_delta(name: str) -> None:
    """Over many rounds the decoded sum follows the input sum; the residual stays bounded."""
    gen = torch.Generator().manual_seed(3)
    delta = {"w": torch.randn(40, 64, generator=gen) * 1e-3, "b": torch.randn(13, generator=gen)}
    shapes = {k: tuple(v.shape) for k, v in delta.items()}
    spec = CodecConfig(name=name, chunk_size=64, topk=4, block_size=64)
    residual: dict[str, torch.Tensor] = {}
    total = {k: torch.zeros_like(v) for k, v in delta.items()}
    norms = []
    rounds = 200
    for _ in range(rounds):
        decoded = codec.decode(codec.encode(delta, spec, residual), shapes)
        for k in total:
            total[k] += decoded[k]
        norms.append(max(float(residual[k].norm() / delta[k].norm()) for k in delta))
    for k, d in delta.items():
        gap = float((total[k] - rounds * d).norm() / (rounds * d.norm()))
        assert gap < 0.05, (k, gap)
        # With constant input and decay 1, the sum misses exactly the final residual.
        assert torch.allclose(total[k] + residual[k], rounds * d, rtol=1e-4, atol=1e-6)
    assert max(norms[rounds // 2 :]) <= 1.5 * max(norms[: rounds // 2]) + 1e-6


@pytest.mark.parametrize("name", [*DENSE, "topk2bit"])
def test_encoding_is_deterministic(name: str) -> None:
    gen = torch.Generator().manual_seed(4)
    delta = {"b.weight": torch.randn(30, 20, generator=gen), "a": torch.randn(7, generator=gen)}
    spec = CodecConfig(name=name, chunk_size=64, topk=8)
    first = codec.encode(delta, spec)
    assert codec.encode(dict(reversed(list(delta.items()))), spec) == first
    assert codec.encode({k: v.clone() for k, v in delta.items()}, spec) == first


def test_read_header_describes_the_payload() -> None:
    spec = CodecConfig(name="topk2bit", chunk_size=128, topk=5)
    payload = codec.encode({"w": torch.ones(3, 4), "s": torch.tensor(1.0)}, spec)
    header = codec.read_header(payload)
    assert header.codec == "topk2bit" and header.version == codec.FORMAT_VERSION
    assert dict(header.shapes) == {"w": (3, 4), "s": ()}
    assert dict(header.params) == {"chunk_size": 128, "topk": 5}
    assert header.spec.chunk_size == 128 and header.spec.topk == 5


def test_empty_and_zero_size_parameters_round_trip() -> None:
    for name in [*DENSE, "topk2bit"]:
        spec = CodecConfig(name=name)
        assert codec.decode(codec.encode({}, spec), {}) == {}
        out = codec.decode(codec.encode({"e": torch.zeros(0, 5)}, spec), {"e": (0, 5)})
        assert out["e"].shape == (0, 5)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (math.nan, "NaN or Inf"),
        (math.inf, "NaN or Inf"),
        (-math.inf, "NaN or Inf"),
        (1e31, "above"),
    ],
)
def test_encode_refuses_non_finite_or_huge_values(value: float, message: str) -> None:
    x = torch.zeros(10)
    x[3] = value
    with pytest.raises(ValueError, match=message):
        codec.encode({"x": x}, CodecConfig(name="fp32"))


def test_encode_refuses_bad_inputs_and_leaves_residual_alone() -> None:
    spec = CodecConfig(name="topk2bit", chunk_size=16, topk=2)
    with pytest.raises(ValueError, match="floating-point"):
        codec.encode({"x": torch.arange(4)}, spec)
    residual = {"x": torch.ones(4), "y": torch.ones(3)}
    with pytest.raises(ValueError, match="shape"):
        codec.encode({"x": torch.ones(4), "y": torch.ones(2)}, spec, residual)
    bad_residual = {"x": torch.ones(4)}
    with pytest.raises(ValueError, match="NaN"):
        codec.encode({"x": torch.ones(4), "z": torch.tensor([math.nan])}, spec, bad_residual)
    assert torch.equal(bad_residual["x"], torch.ones(4)) and set(bad_residual) == {"x"}


def test_finite_check_finds_nan_and_inf_at_any_position() -> None:
    """The decoder's finiteness check (aminmax) sees a bad value in every vector lane."""
    from crowdtrain.codec.base import all_finite

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n in (1, 2, 7, 8, 15, 16, 17, 31, 33, 64, 65, 130):
            assert all_finite(torch.zeros(n, dtype=dtype))
            for bad in (math.nan, math.inf, -math.inf):
                for position in range(n):
                    x = torch.zeros(n, dtype=dtype)
                    x[position] = bad
                    assert not all_finite(x), (dtype, n, bad, position)
