"""Where the aggregator reads contributions from, one flat element range at a time.

A contribution (a DiLoCo pseudo-gradient, Douillard et al. 2023, arXiv:2311.08105) is a set of
named tensors with the model's parameter shapes. The aggregator never asks a source for a whole
contribution: it asks for elements ``[start, stop)`` of one parameter, flattened in row-major
order, so that a coordinator holding many contributions keeps only the fragment it is working on
in memory. ``DictSource`` serves tensors already in memory; ``SafetensorsFileSource`` reads lazily
from a safetensors file on disk and holds nothing between reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from math import prod
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors import SafetensorError, safe_open

__all__ = ["DeltaSource", "DictSource", "SafetensorsFileSource"]

# One index into a safetensors slice: an int or a slice per leading dimension.
_Index = tuple[int | slice, ...]


@runtime_checkable
class DeltaSource(Protocol):
    """Anything that can hand out flat element ranges of a contribution's parameters."""

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Return elements ``[start, stop)`` of parameter ``name``, flattened, as float32 1-D.

        The result may be a view of the source's own storage: callers must not modify it.
        """
        ...


def read_all(source: DeltaSource, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Every parameter of SOURCE as a float32 tensor of its shape (copies, safe to modify)."""
    out = {}
    for name, shape in shapes.items():
        out[name] = source.read(name, 0, prod(shape)).reshape(shape).clone()
    return out


def _check_range(name: str, start: int, stop: int, numel: int) -> None:
    if not 0 <= start <= stop <= numel:
        raise ValueError(
            f"element range [{start}, {stop}) is outside parameter '{name}', "
            f"which has {numel} elements"
        )


class DictSource:
    """A contribution held in memory as a mapping from parameter name to tensor.

    Contiguous tensors are served as views without copying; a non-contiguous tensor is copied
    once, when the source is built.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        self._flat = {name: t.detach().reshape(-1) for name, t in tensors.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every parameter this source holds."""
        return dict(self._shapes)

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        flat = self._flat.get(name)
        if flat is None:
            raise KeyError(f"this contribution has no parameter named '{name}'")
        _check_range(name, start, stop, flat.numel())
        return flat[start:stop].to(device="cpu", dtype=torch.float32)


def flat_range_indices(shape: tuple[int, ...], start: int, stop: int) -> list[_Index]:
    """Cover flat elements ``[start, stop)`` of a row-major ``shape`` with few exact indices.

    Each index is a tuple of ints and one trailing slice (as accepted by a safetensors slice);
    the indexed blocks, flattened and concatenated in order, are exactly the requested elements.
    At most ``2 * len(shape) - 1`` indices are returned, and none reads outside the range.
    """
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [(slice(start, stop),)]
    row = prod(shape[1:])
    first_row, first_offset = divmod(start, row)
    last_row, last_offset = divmod(stop, row)
    if first_row == last_row:
        inner = flat_range_indices(shape[1:], first_offset, last_offset)
        return [(first_row, *index) for index in inner]
    indices: list[_Index] = []
    if first_offset:
        inner = flat_range_indices(shape[1:], first_offset, row)
        indices.extend((first_row, *index) for index in inner)
        first_row += 1
    if last_row > first_row:
        indices.append((slice(first_row, last_row),))
    if last_offset:
        inner = flat_range_indices(shape[1:], 0, last_offset)
        indices.extend((last_row, *index) for index in inner)
    return indices


class SafetensorsFileSource:
    """A contribution stored in a safetensors file, read lazily range by range.

    Each ``read`` opens the file, copies out only the requested elements with
    ``safe_open(...).get_slice`` and closes it again, so no part of the file stays mapped
    into the process between reads. Stored float16/bfloat16/float64 values are converted
    to float32.
    """

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        try:
            with safe_open(str(self._path), framework="pt") as handle:
                self._shapes = {
                    name: tuple(int(d) for d in handle.get_slice(name).get_shape())
                    for name in handle.keys()  # noqa: SIM118 (a safetensors handle, not a dict)
                }
        except FileNotFoundError:
            raise ValueError(f"contribution file {self._path} does not exist") from None
        except (OSError, SafetensorError) as exc:
            raise ValueError(
                f"contribution file {self._path} is not a readable safetensors file ({exc})"
            ) from None

    @property
    def path(self) -> Path:
        """The file this source reads from."""
        return self._path

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor in the file."""
        return dict(self._shapes)

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        shape = self._shapes.get(name)
        if shape is None:
            raise KeyError(f"contribution file {self._path} has no tensor named '{name}'")
        _check_range(name, start, stop, prod(shape))
        if start == stop:
            return torch.empty(0, dtype=torch.float32)
        with safe_open(str(self._path), framework="pt") as handle:
            if not shape:
                whole: torch.Tensor = handle.get_tensor(name)
                return whole.reshape(-1).to(torch.float32)
            view = handle.get_slice(name)
            blocks: list[torch.Tensor] = [
                view[index].reshape(-1) for index in flat_range_indices(shape, start, stop)
            ]
        flat = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
        return flat.to(torch.float32)
