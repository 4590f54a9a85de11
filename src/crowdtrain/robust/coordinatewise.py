"""Coordinate-wise order statistics: the median and the trimmed mean.

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates" (ICML 2018): for every coordinate independently, take the median of the
inputs, or drop the ``b`` largest and ``b`` smallest values and average the rest. Both are
unweighted: every input counts once whatever its sample count, because a weight is a claim an
attacker could inflate. With an even number of inputs the median is the mean of the two middle
values.

The inputs of one fragment arrive as the rows of a ``(n_inputs, numel)`` tensor and are sorted
over column chunks of about ``numel / n_inputs`` columns (at least 64), so the sort's scratch
(a transposed copy, the sorted values and their int64 indices: 4 float32 copies of the chunk)
stays about ``4 × max(numel, 64 × n_inputs)`` float32 elements instead of growing with the
number of inputs times the fragment.
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
    return max(0, min(count, (n_inputs - 1) // 2))


def _sorted_column_chunks(
    rows: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Apply ``reduce`` to column chunks of ``rows``, each sorted and laid out one column a row.

    ``reduce`` gets a ``(columns, n_inputs)`` tensor whose rows are sorted ascending; sorting
    along the contiguous last dimension is several times faster than along dim 0.
    """
    n_inputs, numel = rows.shape
    if numel == 0:
        return torch.empty(0, dtype=torch.float32)
    chunk = min(numel, max(_MIN_CHUNK_COLUMNS, numel // max(n_inputs, 1)))
    out = torch.empty(numel, dtype=torch.float32)
    # Reused across chunks: fresh large buffers cost a page fault per 4 KiB on every chunk.
    block = torch.empty(chunk, n_inputs, dtype=torch.float32)
    values = torch.empty(chunk, n_inputs, dtype=torch.float32)
    indices = torch.empty(chunk, n_inputs, dtype=torch.int64)
    for first in range(0, numel, chunk):
        width = min(chunk, numel - first)
        block[:width].copy_(rows[:, first : first + width].t())
        torch.sort(block[:width], dim=1, out=(values[:width], indices[:width]))
        out[first : first + width] = reduce(values[:width])
    return out


def coordinate_median(rows: torch.Tensor) -> torch.Tensor:
    """Median of each column; with an even number of rows, the mean of the two middle values."""
    n_inputs = rows.shape[0]
    if n_inputs == 0:
        raise ValueError("the median needs at least one input")
    mid = n_inputs // 2

    def reduce(ordered: torch.Tensor) -> torch.Tensor:
        if n_inputs % 2:
            return ordered[:, mid]
        return ordered[:, mid - 1 : mid + 1].mean(dim=1)

    return _sorted_column_chunks(rows, reduce)


def coordinate_trimmed_mean(rows: torch.Tensor, trim: int) -> torch.Tensor:
    """Mean of each column after dropping its ``trim`` smallest and ``trim`` largest values."""
    n_inputs = rows.shape[0]
    if not 0 <= 2 * trim < n_inputs:
        raise ValueError(
            f"cannot trim {trim} values from each end of {n_inputs} inputs; "
            "lower aggregation.trim_fraction"
        )

    def reduce(ordered: torch.Tensor) -> torch.Tensor:
        return ordered[:, trim : n_inputs - trim].mean(dim=1)

    return _sorted_column_chunks(rows, reduce)
