"""`TensorFile` streams the bytes `safetensors.torch.save` builds, for every stored dtype."""

from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from crowdtrain.store import DirBlobStore
from crowdtrain.tensorfile import CHUNK, TensorFile

DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.float16,
    torch.bfloat16,
    torch.int32,
    torch.float32,
    torch.float64,
    torch.int64,
]


@st.composite
def tensor_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    names = draw(st.lists(st.text("abcxyz._-0123", min_size=1, max_size=6), unique=True))
    out = {}
    for i, name in enumerate(names):
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        dtype = draw(st.sampled_from(DTYPES))
        g = torch.Generator().manual_seed(i)
        out[name] = (torch.randn(shape, generator=g) * 100).to(dtype)
    return out


@settings(max_examples=60, deadline=None)
@given(tensor_dicts())
def test_the_bytes_are_safetensors_own(tensors: dict[str, torch.Tensor]) -> None:
    file = TensorFile(tensors)
    data = file.to_bytes()
    assert data == save(tensors)
    assert file.size == len(data)
    back = load(data)
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(back[name], tensor)


def test_large_tensors_are_yielded_in_slices_of_their_own_memory(tmp_path: object) -> None:
    """A tensor of several chunks comes out in slices (no whole copy), and a blob store that
    hashes the stream stores the bytes `save` gives, under their sha256."""
    tensors = {"w": torch.arange(CHUNK // 2 + 3, dtype=torch.float32), "b": torch.ones(5)}
    file = TensorFile(tensors)
    chunks = list(file.chunks())
    assert len(chunks) == 1 + 3 + 1  # header, w in three slices, b
    assert all(len(c) <= CHUNK for c in chunks)
    blobs = DirBlobStore(tmp_path)  # type: ignore[arg-type]
    sha, size = blobs.put_stream(file.chunks(), max_bytes=file.size)
    expected = save(tensors)
    assert (sha, size) == (hashlib.sha256(expected).hexdigest(), len(expected))
    assert blobs.read(sha) == expected


def test_views_and_non_contiguous_tensors_are_written_as_their_values() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"t": base.t(), "s": base[1:, 2:]}
    assert TensorFile(tensors).to_bytes() == save({k: v.contiguous() for k, v in tensors.items()})


def test_an_unstored_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="complex"):
        TensorFile({"z": torch.zeros(2, dtype=torch.complex64)})
