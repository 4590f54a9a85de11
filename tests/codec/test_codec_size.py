"""Payload sizes: max_payload_bytes always bounds encode(), and the compression ratios."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crowdtrain import codec
from crowdtrain.config import CodecConfig

ALL = ["fp32", "fp16", "bf16", "int8", "int4", "topk2bit"]

NAMES = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=0, max_size=12)
SHAPES = st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple)


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.dictionaries(NAMES, SHAPES, max_size=5),
    name=st.sampled_from(ALL),
    block=st.sampled_from([8, 13, 64]),
    chunk=st.sampled_from([16, 100, 70000]),
    topk_fraction=st.floats(0.0, 1.0),
)
def test_max_payload_bytes_bounds_encode(
    shapes: dict[str, tuple[int, ...]], name: str, block: int, chunk: int, topk_fraction: float
) -> None:
    """Any names (unicode, quotes, empty), shapes (incl. 0 and scalars) and parameters."""
    topk = max(1, round(chunk * topk_fraction))
    spec = CodecConfig(name=name, block_size=block, chunk_size=chunk, topk=topk)
    gen = torch.Generator().manual_seed(0)
    delta = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    payload = codec.encode(delta, spec)
    bound = codec.max_payload_bytes(shapes, spec)
    tensors = len(shapes) * 3
    assert len(payload) <= bound <= len(payload) + 8 + 12 * tensors
    assert codec.decode(payload, shapes, max_bytes=bound).keys() == shapes.keys()


def test_bound_is_exact_in_data_and_independent_of_values() -> None:
    shapes = {"w": (300, 70), "b": (70,)}
    spec = CodecConfig(name="topk2bit", chunk_size=256, topk=9)
    sizes = {
        len(codec.encode({k: torch.full(s, v) for k, s in shapes.items()}, spec))
        for v in (0.0, 1.0, -1e-20)
    }
    sizes.add(len(codec.encode({k: torch.randn(s) for k, s in shapes.items()}, spec)))
    assert len(sizes) == 1


def ratio(name: str, **params: int) -> float:
    shape = (1024, 1024)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 1e-3
    payload = codec.encode({"w": x}, CodecConfig(name=name, **params))
    assert len(payload) <= codec.max_payload_bytes({"w": shape}, CodecConfig(name=name, **params))
    return 4 * math.prod(shape) / len(payload)


@pytest.mark.parametrize(
    ("name", "params", "low", "high"),
    [
        ("fp32", {}, 0.99, 1.0),
        ("fp16", {}, 1.99, 2.0),
        ("bf16", {}, 1.99, 2.0),
        # int8, 64-element blocks, float32 scales: 4 / (1 + 4/64) = 3.76
        ("int8", {"block_size": 64}, 3.7, 4.0),
        ("int8", {"block_size": 4096}, 3.98, 4.0),
        # int4: 8 / (1 + 8/64) = 7.1
        ("int4", {"block_size": 64}, 7.0, 8.0),
        ("int4", {"block_size": 4096}, 7.9, 8.0),
        # topk2bit 64 of 4096: per chunk 64 * (2 + 1/4) + 8 bytes vs 16384 bytes = 108x
        ("topk2bit", {"chunk_size": 4096, "topk": 64}, 100.0, 110.0),
    ],
)
def test_compression_ratios(name: str, params: dict[str, int], low: float, high: float) -> None:
    assert low <= ratio(name, **params) <= high
