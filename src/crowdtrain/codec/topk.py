"""topk2bit: per-chunk top-k sparsification with 2-bit values, meant for error feedback.

The flattened tensor is cut into chunks of `chunk_size` elements (the last chunk may be shorter).
In every full chunk the `topk` largest-magnitude entries are kept (in a short last chunk of L
elements, min(topk, L)); all the others are dropped. This is the chunk-wise Top-k of SparseLoCo
(Sarfi et al. 2025, "Communication Efficient LLM Pre-training with SparseLoCo",
arXiv:2508.15706), whose chunking comes from DeMo (Peng et al. 2024, arXiv:2411.19870).

Wire tensors per parameter:

- `idx`: the kept positions inside their chunk, ascending within each chunk, as uint16 when
  chunk_size <= 65536 (else int32);
- `code`: one 2-bit code per kept entry, four per byte (first entry in the lowest bits):
  bit 1 is the sign, bit 0 selects the chunk's high (1) or low (0) magnitude level;
- `levels`: float32 [low, high] per chunk.

The quantizer is sign + one magnitude bit: within a chunk, the ceil(k/2) kept entries of largest
magnitude form the high group and the rest the low group; each level is the mean magnitude of
its group (the mean minimises the squared error for that split). An entry decodes to
sign * level. Our quantizer is a simple, deterministic choice in the spirit of SparseLoCo's
2-bit values; the paper's exact quantizer may differ.

Error: this codec is meant to be used with error feedback (the sender keeps the residual
acc - decoded and adds it to the next delta; Seide et al. 2014, Lin et al. 2018 "Deep Gradient
Compression", arXiv:1712.01887; DeMo; SparseLoCo), so no small per-element bound exists.
`error_bound` reports the chunk's max|x| for every element of the chunk, which always holds:
a dropped entry loses |x| <= max|x|, and a kept entry decodes to a level of its own sign with
magnitude in [0, max|x|].
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from crowdtrain.codec.base import Slot, ceil_div, require, require_finite, value_range
from crowdtrain.codec.buffers import CHUNK
from crowdtrain.config import CodecConfig

_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def _geometry(numel: int, spec: CodecConfig) -> tuple[int, int, int]:
    """(full chunks, length of the short last chunk or 0, entries kept in that last chunk)."""
    full, tail = divmod(numel, spec.chunk_size)
    return full, tail, min(spec.topk, tail)


def _index_dtype(spec: CodecConfig) -> torch.dtype:
    return torch.uint16 if spec.chunk_size <= 65536 else torch.int32


def _select(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: ascending indices of the k largest |values|, and the values there."""
    idx = rows.abs().topk(k, dim=1, sorted=False).indices.sort(dim=1).values
    return idx, rows.gather(1, idx)


def _quantize(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of kept values: 2-bit codes (sign << 1 | high) and float32 [low, high] levels."""
    k = values.shape[1]
    high_count = (k + 1) // 2
    mags = values.abs()
    order = mags.argsort(dim=1, descending=True, stable=True)
    high = torch.zeros_like(mags, dtype=torch.bool).scatter_(1, order[:, :high_count], True)
    mags64 = mags.double()
    high_level = (mags64 * high).sum(dim=1) / high_count
    low_level = (mags64 * ~high).sum(dim=1) / max(k - high_count, 1)
    levels = torch.stack([low_level, high_level], dim=1).to(torch.float32)
    codes = ((values < 0).to(torch.uint8) << 1) | high.to(torch.uint8)
    return codes, levels


class TopK2BitCodec:
    """Chunk-wise top-k with sign + 1-bit magnitude values (see the module docstring)."""

    name = "topk2bit"

    def params(self, spec: CodecConfig) -> dict[str, int]:
        return {"chunk_size": spec.chunk_size, "topk": spec.topk}

    def slots(self, numel: int, spec: CodecConfig) -> tuple[Slot, ...]:
        full, tail, tail_k = _geometry(numel, spec)
        kept = full * spec.topk + tail_k
        chunks = full + (1 if tail else 0)
        return (
            Slot("idx", _index_dtype(spec), kept),
            Slot("code", torch.uint8, ceil_div(kept, 4)),
            Slot("levels", torch.float32, 2 * chunks),
        )

    def encode(self, x: torch.Tensor, spec: CodecConfig) -> dict[str, torch.Tensor]:
        full, tail, tail_k = _geometry(x.numel(), spec)
        size = spec.chunk_size
        groups = []
        if full:
            groups.append(_select(x[: full * size].view(full, size), spec.topk))
        if tail:
            groups.append(_select(x[full * size :].view(1, tail), tail_k))
        quantized = [_quantize(values) for _, values in groups]
        idx = torch.cat([i.flatten() for i, _ in groups] or [torch.zeros(0, dtype=torch.int64)])
        codes = torch.cat(
            [c.flatten() for c, _ in quantized] or [torch.zeros(0, dtype=torch.uint8)]
        )
        levels = torch.cat([lv.flatten() for _, lv in quantized] or [torch.zeros(0)])
        codes = F.pad(codes, (0, ceil_div(codes.numel(), 4) * 4 - codes.numel())).view(-1, 4)
        packed = codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)
        return {"idx": idx.to(_index_dtype(spec)), "code": packed, "levels": levels}

    def check(
        self, parts: Mapping[str, torch.Tensor], numel: int, spec: CodecConfig, where: str
    ) -> None:
        full, tail, tail_k = _geometry(numel, spec)
        k = spec.topk
        low, _ = require_finite(parts["levels"], f"the levels of {where}")
        require(low >= 0, f"a level of {where} is negative")
        kept = full * k + tail_k
        if kept % 4:  # the unused codes of the last byte must be 0
            unused = int(parts["code"][-1]) >> (2 * (kept % 4))
            require(unused == 0, f"{where} has nonzero padding bits")
        idx = parts["idx"]
        if idx.dtype != torch.uint16:
            require(value_range(idx)[0] >= 0, f"{where} has a negative index")
        if full:
            self._check_rows(idx[: full * k], k, spec.chunk_size, where)
        if tail:
            self._check_rows(idx[full * k :], tail_k, tail, where)

    @staticmethod
    def _check_rows(flat: torch.Tensor, k: int, length: int, where: str) -> None:
        """Rows of k indices must lie inside their chunk of `length` elements and be strictly
        ascending (so all distinct); checked a piece of rows at a time, all rows for the first
        rule before the second."""
        step = max(1, CHUNK // k) * k
        pieces = range(0, flat.numel(), step)
        for start in pieces:
            piece = flat[start : start + step].to(torch.int32)
            require(value_range(piece)[1] < length, f"{where} has an index outside its chunk")
        for start in pieces:
            rows = flat[start : start + step].to(torch.int32).view(-1, k)
            ascending = bool((rows[:, 1:] > rows[:, :-1]).all())
            require(ascending, f"{where} has indices that are not strictly ascending in a chunk")

    def decode(
        self, parts: Mapping[str, torch.Tensor], numel: int, spec: CodecConfig
    ) -> torch.Tensor:
        full, tail, tail_k = _geometry(numel, spec)
        size, k = spec.chunk_size, spec.topk
        kept = full * k + tail_k
        codes = ((parts["code"][:, None] >> _SHIFTS) & 3).flatten()[:kept]
        idx = parts["idx"].to(torch.int64)
        positions = []
        rows = []
        if full:
            offsets = torch.arange(full, dtype=torch.int64)[:, None] * size
            positions.append((idx[: full * k].view(full, k) + offsets).flatten())
            rows.append(torch.arange(full, dtype=torch.int64).repeat_interleave(k))
        if tail:
            positions.append(idx[full * k :] + full * size)
            rows.append(torch.full((tail_k,), full, dtype=torch.int64))
        out = torch.zeros(numel, dtype=torch.float32)
        if positions:
            level_table = parts["levels"].view(-1, 2)
            mags = level_table[torch.cat(rows), (codes & 1).to(torch.int64)]
            values = torch.where((codes & 2).bool(), -mags, mags)
            out[torch.cat(positions)] = values
        return out

    def decode_range(
        self,
        parts: Mapping[str, torch.Tensor],
        numel: int,
        spec: CodecConfig,
        start: int,
        stop: int,
    ) -> torch.Tensor:
        """Decode only the kept entries of the chunks that [start, stop) touches, then keep the
        ones that fall inside the range (kept entries are stored chunk after chunk)."""
        full, _, tail_k = _geometry(numel, spec)
        size, k = spec.chunk_size, spec.topk
        out = torch.zeros(stop - start, dtype=torch.float32)
        first, last = start // size, ceil_div(stop, size)  # chunks [first, last)
        begin = first * k  # the tail chunk's entries also start at full * k
        end = min(last, full) * k + (tail_k if last > full else 0)
        if end <= begin:
            return out
        packed = parts["code"][begin // 4 : ceil_div(end, 4)]
        codes = ((packed[:, None] >> _SHIFTS) & 3).flatten()
        codes = codes[begin % 4 : begin % 4 + end - begin]
        entries = torch.arange(begin, end, dtype=torch.int64)
        rows = entries // k  # an entry of the tail chunk has entry // k == full too
        positions = parts["idx"][begin:end].to(torch.int64) + rows * size - start
        level_table = parts["levels"].view(-1, 2)
        mags = level_table[rows, (codes & 1).to(torch.int64)]
        values = torch.where((codes & 2).bool(), -mags, mags)
        inside = (positions >= 0) & (positions < stop - start)
        out[positions[inside]] = values[inside]
        return out

    def error_bound(self, x: torch.Tensor, spec: CodecConfig) -> torch.Tensor:
        size = spec.chunk_size
        chunks = ceil_div(x.numel(), size)
        rows = F.pad(x, (0, chunks * size - x.numel())).view(chunks, size)
        return rows.abs().amax(dim=1).repeat_interleave(size)[: x.numel()]
