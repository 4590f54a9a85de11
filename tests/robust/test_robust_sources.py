"""DictSource and SafetensorsFileSource hand out the same flat element ranges."""

from __future__ import annotations

from math import prod
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from crowdtrain.config import AggregationConfig
from crowdtrain.robust import (
    DeltaSource,
    DictSource,
    SafetensorsFileSource,
    aggregate,
    global_norms,
)
from crowdtrain.robust.fragments import plan_fragments, read_fragment
from crowdtrain.robust.sources import flat_range_indices

TENSORS = {
    "cube": torch.randn(5, 7, 11, generator=torch.Generator().manual_seed(0)),
    "matrix": torch.randn(40, 30, generator=torch.Generator().manual_seed(1)),
    "vector": torch.randn(999, generator=torch.Generator().manual_seed(2)),
    "scalar": torch.tensor(3.5),
    "half": torch.randn(3, 300, generator=torch.Generator().manual_seed(3)).half(),
    "bf16": torch.randn(17, 13, generator=torch.Generator().manual_seed(4)).bfloat16(),
}
SHAPES = {name: tuple(t.shape) for name, t in TENSORS.items()}


@pytest.fixture(scope="module")
def file_source(tmp_path_factory: pytest.TempPathFactory) -> SafetensorsFileSource:
    path = tmp_path_factory.mktemp("robust_sources") / "delta.safetensors"
    save_file(TENSORS, str(path))
    return SafetensorsFileSource(path)


def test_both_sources_satisfy_the_protocol(file_source: SafetensorsFileSource) -> None:
    assert isinstance(file_source, DeltaSource)
    assert isinstance(DictSource(TENSORS), DeltaSource)
    assert file_source.shapes == SHAPES
    assert DictSource(TENSORS).shapes == SHAPES


def test_every_range_of_every_tensor_matches(file_source: SafetensorsFileSource) -> None:
    memory = DictSource(TENSORS)
    for name, shape in SHAPES.items():
        numel = prod(shape)
        cuts = sorted({0, 1, numel // 3, numel // 2, numel - 1, numel} & set(range(numel + 1)))
        for start in cuts:
            for stop in [c for c in cuts if c >= start]:
                got = file_source.read(name, start, stop)
                want = memory.read(name, start, stop)
                assert got.dtype == want.dtype == torch.float32
                assert got.shape == (stop - start,)
                assert torch.equal(got, want), (name, start, stop)
                assert torch.equal(want, TENSORS[name].reshape(-1)[start:stop].float())


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_ranges_match(file_source: SafetensorsFileSource, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(SHAPES)))
    numel = prod(SHAPES[name])
    start = data.draw(st.integers(0, numel))
    stop = data.draw(st.integers(start, numel))
    expected = TENSORS[name].reshape(-1)[start:stop].float()
    assert torch.equal(file_source.read(name, start, stop), expected)


@settings(max_examples=200, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple),
    data=st.data(),
)
def test_flat_range_indices_cover_exactly_the_range(
    shape: tuple[int, ...], data: st.DataObject
) -> None:
    numel = prod(shape)
    start = data.draw(st.integers(0, numel))
    stop = data.draw(st.integers(start, numel))
    grid = torch.arange(numel).reshape(shape)
    indices = flat_range_indices(shape, start, stop)
    assert len(indices) <= max(1, 2 * len(shape) - 1)
    pieces = [grid[index].reshape(-1) for index in indices]
    got = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
    assert torch.equal(got, torch.arange(start, stop))


def test_fragments_read_identically(file_source: SafetensorsFileSource) -> None:
    memory = DictSource(TENSORS)
    for fragment in plan_fragments(SHAPES, 257):
        assert torch.equal(
            read_fragment(file_source, fragment, "file"), read_fragment(memory, fragment, "dict")
        )


def test_aggregates_from_files_equal_aggregates_from_memory(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(7)
    contributions = [
        {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}
        for _ in range(5)
    ]
    files = []
    for i, contribution in enumerate(contributions):
        save_file(contribution, str(tmp_path / f"c{i}.safetensors"))
        files.append(SafetensorsFileSource(tmp_path / f"c{i}.safetensors"))
    memory = [DictSource(c) for c in contributions]
    for method in ["mean", "median", "trimmed_mean", "centered_clip"]:
        cfg = AggregationConfig.model_validate(
            dict(method=method, fragment_numel=1024, trim_fraction=0.2)
        )
        a = aggregate(files, [1, 2, 3, 4, 5], SHAPES, cfg, seed=3)
        b = aggregate(memory, [1, 2, 3, 4, 5], SHAPES, cfg, seed=3)
        for name in SHAPES:
            assert torch.equal(a.delta[name], b.delta[name])
        assert a.distances == b.distances
    assert global_norms(files, SHAPES, 100) == global_norms(memory, SHAPES, 100)


def test_dict_source_serves_non_contiguous_tensors() -> None:
    t = torch.arange(12.0).reshape(3, 4).t()
    assert torch.equal(DictSource({"t": t}).read("t", 2, 9), t.reshape(-1)[2:9])


def test_dict_source_converts_dtype() -> None:
    got = DictSource({"h": torch.ones(4, dtype=torch.float16)}).read("h", 0, 4)
    assert got.dtype == torch.float32


def test_unknown_name_and_bad_range_are_refused(file_source: SafetensorsFileSource) -> None:
    for source in (file_source, DictSource(TENSORS)):
        with pytest.raises(KeyError, match=r"no .*named 'nope'"):
            source.read("nope", 0, 1)
        with pytest.raises(ValueError, match="outside parameter 'vector'"):
            source.read("vector", 0, 1000)
        with pytest.raises(ValueError, match="outside parameter 'vector'"):
            source.read("vector", 5, 4)


def test_missing_or_corrupt_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        SafetensorsFileSource(tmp_path / "absent.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        SafetensorsFileSource(bad)
