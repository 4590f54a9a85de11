"""Cut a model into fixed-size fragments so aggregation memory does not grow with the model.

The model's parameters, flattened in order, are laid end to end and cut into fragments of at
most ``fragment_numel`` elements; a fragment may span the tail of one parameter and the head of
the next, so many small parameters (biases, norms) share one fragment. The aggregator works on
one fragment of every contribution at a time, which bounds its working memory by
``O(contributions × fragment_numel)`` instead of ``O(contributions × model size)`` (the
streaming layout used for large-model aggregation, e.g. DiLoCo, Douillard et al. 2023,
arXiv:2311.08105).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from crowdtrain.robust.sources import DeltaSource

__all__ = [
    "Fragment",
    "Piece",
    "for_each_fragment",
    "gather",
    "plan_fragments",
    "read_fragment",
    "scatter",
    "squared_distance",
]


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, stop)`` of parameter ``name``, placed at ``offset`` in a fragment."""

    name: str
    start: int
    stop: int
    offset: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Fragment:
    """A run of at most ``fragment_numel`` consecutive model elements, as parameter pieces."""

    pieces: tuple[Piece, ...]
    numel: int


def plan_fragments(shapes: Mapping[str, tuple[int, ...]], fragment_numel: int) -> list[Fragment]:
    """Cut the parameters of ``shapes`` (in mapping order) into fragments of ≤ fragment_numel."""
    if fragment_numel < 1:
        raise ValueError(f"fragment_numel must be at least 1, got {fragment_numel}")
    fragments: list[Fragment] = []
    pieces: list[Piece] = []
    filled = 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        start = 0
        while start < numel:
            take = min(numel - start, fragment_numel - filled)
            pieces.append(Piece(name, start, start + take, filled))
            filled += take
            start += take
            if filled == fragment_numel:
                fragments.append(Fragment(tuple(pieces), filled))
                pieces, filled = [], 0
    if pieces:
        fragments.append(Fragment(tuple(pieces), filled))
    return fragments


T = TypeVar("T")


def for_each_fragment(
    fn: Callable[[Fragment], T], fragments: Sequence[Fragment], workers: int = 1
) -> list[T]:
    """``fn`` of every fragment, in fragment order, on ``workers`` threads (torch's kernels
    release the GIL, so fragments decode and add in parallel). ``fn`` may write its own
    fragment's elements of shared tensors: fragments never overlap. Peak memory grows by the
    buffers of ``workers`` fragments at once."""
    if workers <= 1 or len(fragments) <= 1:
        return [fn(fragment) for fragment in fragments]
    with ThreadPoolExecutor(min(workers, len(fragments)), "crowdtrain-fragment") as pool:
        return list(pool.map(fn, fragments))


def read_fragment(source: DeltaSource, fragment: Fragment, label: str) -> torch.Tensor:
    """Read one fragment of a source as a float32 1-D tensor; the result must not be modified.

    Raises ValueError naming ``label`` (e.g. "contribution 3") when the source lacks a piece,
    returns the wrong number of elements, or returns any non-finite value.
    """
    if len(fragment.pieces) == 1:
        return _read_piece(source, fragment.pieces[0], label)
    out = torch.empty(fragment.numel, dtype=torch.float32)
    for piece in fragment.pieces:
        out[piece.offset : piece.offset + piece.numel] = _read_piece(source, piece, label)
    return out


def _read_piece(source: DeltaSource, piece: Piece, label: str) -> torch.Tensor:
    try:
        values = source.read(piece.name, piece.start, piece.stop)
    except (KeyError, ValueError) as exc:
        detail = exc.args[0] if exc.args else type(exc).__name__
        raise ValueError(f"{label} does not match the model: {detail}") from None
    if values.dim() != 1 or values.numel() != piece.numel:
        raise ValueError(
            f"{label} returned {values.numel()} elements for '{piece.name}'"
            f"[{piece.start}:{piece.stop}] instead of {piece.numel}; its shapes do not match"
            " the model"
        )
    if values.dtype != torch.float32:
        values = values.to(torch.float32)
    if not _all_finite(values):
        raise ValueError(f"{label} has non-finite values (NaN or infinity) in '{piece.name}'")
    return values


def _all_finite(values: torch.Tensor) -> bool:
    """True when no value is NaN or infinite (aminmax propagates NaN; far faster than isfinite)."""
    if values.numel() == 0:
        return True
    low, high = torch.aminmax(values)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def gather(tensors: Mapping[str, torch.Tensor], fragment: Fragment) -> torch.Tensor:
    """The fragment's elements of contiguous float32 ``tensors`` (a view when it is one piece)."""
    if len(fragment.pieces) == 1:
        piece = fragment.pieces[0]
        return tensors[piece.name].view(-1)[piece.start : piece.stop]
    return torch.cat([tensors[p.name].view(-1)[p.start : p.stop] for p in fragment.pieces])


def scatter(tensors: Mapping[str, torch.Tensor], fragment: Fragment, values: torch.Tensor) -> None:
    """Write a fragment's values back into contiguous ``tensors`` in place."""
    for piece in fragment.pieces:
        flat = tensors[piece.name].view(-1)
        flat[piece.start : piece.stop] = values[piece.offset : piece.offset + piece.numel]


def squared_distance(x: torch.Tensor, centre: torch.Tensor | None) -> float:
    """‖x − centre‖² of two fragments as a Python float (``centre=None`` means zeros)."""
    diff = x if centre is None else x - centre
    return float(torch.linalg.vector_norm(diff)) ** 2
