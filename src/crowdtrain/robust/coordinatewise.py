"""Coordinate-wise order statistics: the median and the trimmed mean.

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates" (ICML 2018): for every coordinate independently, take the median of the
inputs, or drop the ``b`` largest and ``b`` smallest values and average the rest. Both are
unweighted: every input counts once whatever its sample count, because a weight is a claim an
attacker could inflate.

The inputs of one fragment arrive as the rows of a ``(n_inputs, numel)`` tensor. Sorting runs
over column chunks so its scratch space (sorted values plus int64 indices) stays about
``3 × max(numel, 64 × n_inputs)`` elements instead of three copies of the whole fragment.
"""

from __future__ import annotations

from collections.abc import Callable
from math import floor

import torch

__all__ = ["coordinate_median", "coordinate_trimmed_mean", "trim_count"]

_MIN_CHUNK_COLUMNS = 64


def trim_count(trim_fraction: float, n_inputs: int) -> int:
    """How many inputs the trimmed mean drops from each end: floor(trim_fraction × n_inputs)."""
    count = floor(trim_fraction * n_inputs + 1e-9)
    return min(count, (n_inputs - 1) // 2)


def _by_sorted_chunks(
    rows: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    n_inputs, numel = rows.shape
    chunk = max(_MIN_CHUNK_COLUMNS, numel // max(n_inputs, 1))
    out = torch.empty(numel, dtype=rows.dtype)
    for first in range(0, numel, chunk):
        ordered = torch.sort(rows[:, first : first + chunk], dim=0).values
        out[first : first + chunk] = reduce(ordered)
    return out


def coordinate_median(rows: torch.Tensor) -> torch.Tensor:
    """Median of each column; with an even number of rows, the mean of the two middle values."""
    n_inputs = rows.shape[0]
    if n_inputs == 0:
        raise ValueError("the median needs at least one input")
    mid = n_inputs // 2

    def reduce(ordered: torch.Tensor) -> torch.Tensor:
        if n_inputs % 2:
            return ordered[mid]
        return (ordered[mid - 1] + ordered[mid]) / 2

    return _by_sorted_chunks(rows, reduce)


def coordinate_trimmed_mean(rows: torch.Tensor, trim: int) -> torch.Tensor:
    """Mean of each column after dropping its ``trim`` smallest and ``trim`` largest values."""
    n_inputs = rows.shape[0]
    if not 0 <= 2 * trim < n_inputs:
        raise ValueError(
            f"cannot trim {trim} values from each end of {n_inputs} inputs; "
            "lower aggregation.trim_fraction"
        )

    def reduce(ordered: torch.Tensor) -> torch.Tensor:
        return ordered[trim : n_inputs - trim].mean(dim=0)

    return _by_sorted_chunks(rows, reduce)
