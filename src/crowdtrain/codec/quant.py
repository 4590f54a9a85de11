"""Dense codecs: fp32 (exact), fp16 and bf16 (rounding), int8 and int4 (blockwise absmax).

Error bounds (u = unit roundoff; all bounds are per element and hold for every finite input
below `MAX_ABS` that `encode` accepts):

- fp32 is the identity: error 0.
- bf16 rounds to nearest even: |err| <= 2^-8 |x| + 2^-134 (the second term covers subnormals).
- fp16 first divides the tensor by a per-tensor power of two `scale` chosen so that max|x|/scale
  lies in [2^14, 2^15). Dividing by a power of two is exact, so fp16 can never overflow (a plain
  cast would turn values above 65504 into Inf, and clamping would silently corrupt them), and
  small pseudo-gradients (typically 1e-6..1e-2, mostly below fp16's smallest normal 6.1e-5) keep
  fp16's full 11-bit precision instead of falling into its subnormals.
  |err| <= 2^-11 |x| + 2^-25 scale (+2^-149 for float32 subnormal products).
- int8 / int4 split the flattened tensor into blocks of `block_size` (the last block is padded
  with zeros for the computation; the padding is not sent) and store per block a float32
  scale = max|x| / 127 (int8) or / 7 (int4), rounded *up* to the next float32 so |x/scale| <= qmax,
  and q = round(x / scale). The scale is float32, not fp16, because fp16 scales underflow for
  small deltas (1e-6 / 127 is below fp16's range) and overflow for big ones.
  |err| <= scale/2 + 127.5 * 2^-24 scale (float32 rounding of q*scale) + 2^-150 (subnormals);
  `error_bound` reports scale * (1/2 + 2^-14) + 2^-149. int4 codes q + 8 (1..15) are packed two
  per byte, the element with the even index in the low nibble.

Blockwise absmax quantization follows Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization" (arXiv:2110.02861); DiLoCo-style pseudo-gradient quantization is studied in
Douillard et al. 2023 (arXiv:2311.08105) and SparseLoCo (Sarfi et al. 2025, arXiv:2508.15706).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from crowdtrain.codec.base import (
    Slot,
    all_finite,
    ceil_div,
    require,
    require_finite,
    value_range,
)
from crowdtrain.codec.buffers import CHUNK
from crowdtrain.config import CodecConfig

#: encode() refuses values whose magnitude exceeds this (about 1.3e30): no sane pseudo-gradient
#: reaches it, and it keeps every codec's decoded values finite (no rounding up to Inf).
MAX_ABS = 2.0**100


def _as_f32(bound: torch.Tensor) -> torch.Tensor:
    """A float64 bound as float32 (the slack built into each bound covers this rounding)."""
    return bound.to(torch.float32)


class _CastCodec:
    """Values cast to one floating dtype `wire` (slot "v"); decoded to new float32 tensors."""

    name: str
    wire: torch.dtype

    def params(self, spec: CodecConfig) -> dict[str, int]:
        return {}

    def slots(self, numel: int, spec: CodecConfig) -> tuple[Slot, ...]:
        return (Slot("v", self.wire, numel),)

    def encode(self, x: torch.Tensor, spec: CodecConfig) -> dict[str, torch.Tensor]:
        return {"v": x.to(self.wire, copy=True)}

    def check(
        self, parts: Mapping[str, torch.Tensor], numel: int, spec: CodecConfig, where: str
    ) -> None:
        require_finite(parts["v"], f"the values of {where}")

    def decode(
        self, parts: Mapping[str, torch.Tensor], numel: int, spec: CodecConfig
    ) -> torch.Tensor:
        return parts["v"].to(torch.float32, copy=True)  # never a view of the payload's bytes

    def decode_range(
        self,
        parts: Mapping[str, torch.Tensor],
        numel: int,
        spec: CodecConfig,
        start: int,
        stop: int,
    ) -> torch.Tensor:
        return parts["v"][start:stop].to(torch.float32, copy=True)


class Fp32Codec(_CastCodec):
    """The identity: float32 values as they are."""

    name = "fp32"
    wire = torch.float32

    def error_bound(self, x: torch.Tensor, spec: CodecConfig) -> torch.Tensor:
        return torch.zeros_like(x)


class Bf16Codec(_CastCodec):
    """bfloat16: float32's range, 8 significant bits, round to nearest even."""

    name = "bf16"
    wire = torch.bfloat16

    def error_bound(self, x: torch.Tensor, spec: CodecConfig) -> torch.Tensor:
        return _as_f32(x.double().abs() * (2.0**-8 * (1 + 2.0**-20)) + 2.0**-134)


def fp16_scale(x: torch.Tensor) -> float:
    """The power of two that maps max|x| into [2^14, 2^15) (1 for an all-zero tensor).

    The exponent is kept >= -126 so the scale is a normal float32; that loses nothing, since
    then every float32 x / scale is at least 2^-23 apart from zero or exactly representable.
    """
    if x.numel() == 0:
        return 1.0
    absmax = float(x.abs().max())
    if absmax == 0.0:
        return 1.0
    _, exponent = math.frexp(absmax)  # absmax = m * 2**exponent with m in [0.5, 1)
    return math.ldexp(1.0, max(exponent - 15, -126))


class Fp16Codec:
    """float16 of x / scale, with a per-tensor power-of-two scale (never overflows)."""

    name = "fp16"

    def params(self, spec: CodecConfig) -> dict[str, int]:
        return {}

    def slots(self, numel: int, spec: CodecConfig) -> tuple[Slot, ...]:
        return (Slot("v", torch.float16, numel), Slot("scale", torch.float32, 1))

    def encode(self, x: torch.Tensor, spec: CodecConfig) -> dict[str, torch.Tensor]:
        scale = fp16_scale(x)
        return {
            "v": (x * (1.0 / scale)).to(torch.float16),
            "scale": torch.tensor([scale], dtype=torch.float32),
        }

    def check(
        self, parts: Mapping[str, torch.Tensor], numel: int, spec: CodecConfig, where: str
    ) -> None:
        v, scale = parts["v"], parts["scale"]
        low, high = require_finite(v, f"the values of {where}")
        scale_low, _ = require_finite(scale, f"the scale of {where}")
        require(scale_low > 0, f"the scale of {where} is not positive")
        # Rounding is monotonic, so the largest |v| gives the largest decoded magnitude.
        peak = torch.tensor([max(-low, high)], dtype=torch.float32) * scale
        require(all_finite(peak), f"{where} decodes to NaN or Inf")

    def decode(
        self, parts: Mapping[str, torch.Tensor], numel: int, spec: CodecConfig
    ) -> torch.Tensor:
        return parts["v"].to(torch.float32).mul_(parts["scale"])

    def decode_range(
        self,
        parts: Mapping[str, torch.Tensor],
        numel: int,
        spec: CodecConfig,
        start: int,
        stop: int,
    ) -> torch.Tensor:
        return parts["v"][start:stop].to(torch.float32).mul_(parts["scale"])

    def error_bound(self, x: torch.Tensor, spec: CodecConfig) -> torch.Tensor:
        scale = fp16_scale(x)
        rounding = x.double().abs() * 2.0**-11 + scale * 2.0**-25
        return _as_f32(rounding * (1 + 2.0**-20) + 2.0**-149)


def block_scales(blocks: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-row float32 scale = max|row| / qmax, rounded up so that |x / scale| <= qmax."""
    absmax = torch.empty(blocks.shape[0], dtype=blocks.dtype)
    step = max(1, CHUNK // max(1, blocks.shape[1]))
    for start in range(0, blocks.shape[0], step):  # |x| a slice at a time, within the caches
        absmax[start : start + step] = blocks[start : start + step].abs().amax(dim=1)
    absmax = absmax.double()
    scale = (absmax / qmax).to(torch.float32)
    too_small = scale.double() * qmax < absmax  # exact: 24-bit scale times 7-bit qmax
    return torch.where(too_small, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)


class BlockwiseCodec:
    """Blockwise absmax integer quantization: int8 (q in [-127, 127]) or int4 ([-7, 7])."""

    def __init__(self, name: str, bits: int) -> None:
        self.name = name
        self.bits = bits
        self.qmax = 2 ** (bits - 1) - 1

    def params(self, spec: CodecConfig) -> dict[str, int]:
        return {"block_size": spec.block_size}

    def slots(self, numel: int, spec: CodecConfig) -> tuple[Slot, ...]:
        blocks = ceil_div(numel, spec.block_size)
        if self.bits == 8:
            q = Slot("q", torch.int8, numel)
        else:
            q = Slot("q", torch.uint8, ceil_div(numel, 2))
        return (q, Slot("scale", torch.float32, blocks))

    def _blocks(self, x: torch.Tensor, block_size: int) -> torch.Tensor:
        n = x.numel()
        count = ceil_div(n, block_size)
        if count * block_size == n:  # nothing to pad: a view, not a copy
            return x.reshape(count, block_size)
        return F.pad(x, (0, count * block_size - n)).view(count, block_size)

    def encode(self, x: torch.Tensor, spec: CodecConfig) -> dict[str, torch.Tensor]:
        n = x.numel()
        blocks = self._blocks(x, spec.block_size)
        scale = block_scales(blocks, self.qmax)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).double()
        # Rounded in float64 a slice of blocks at a time (the same values as all at once):
        # the float64 copies then stay in the CPU's caches instead of crossing memory.
        levels = torch.empty(blocks.shape, dtype=torch.int8)
        step = max(1, CHUNK // spec.block_size)
        for start in range(0, blocks.shape[0], step):
            part = blocks[start : start + step].double() / safe[start : start + step, None]
            levels[start : start + step] = torch.round(part).clamp_(-self.qmax, self.qmax)
        q = levels.flatten()[:n]
        if self.bits == 8:
            return {"q": q, "scale": scale}
        codes = (q + 8).to(torch.uint8)
        if n % 2:
            codes = torch.cat([codes, torch.full((1,), 8, dtype=torch.uint8)])
        packed = codes[0::2] | (codes[1::2] << 4)
        return {"q": packed, "scale": scale}

    def check(
        self, parts: Mapping[str, torch.Tensor], numel: int, spec: CodecConfig, where: str
    ) -> None:
        scale, q = parts["scale"], parts["q"]
        low, high = require_finite(scale, f"the scales of {where}")
        require(low >= 0, f"a scale of {where} is negative")
        if self.bits == 8:
            require(value_range(q)[0] > -128, f"{where} holds the int8 code -128")
        else:
            self._check_nibbles(q, numel, where)
        # |level| <= qmax and rounding is monotonic: if qmax * (largest scale) is finite, every
        # decoded value is. Only a hostile scale near float32's limit needs the full look.
        largest = torch.tensor([high], dtype=torch.float32)
        peak = largest * torch.tensor([float(self.qmax)], dtype=torch.float32)
        if not all_finite(peak):
            step = max(1, CHUNK // spec.block_size) * spec.block_size
            for start in range(0, numel, step):
                piece = self.decode_range(parts, numel, spec, start, min(numel, start + step))
                require(all_finite(piece), f"{where} decodes to NaN or Inf")

    @staticmethod
    def _check_nibbles(q: torch.Tensor, numel: int, where: str) -> None:
        """No int4 code may be 0 (level -8); the padding nibble of an odd count must be 8."""
        pairs = numel // 2
        for start in range(0, pairs, CHUNK):
            packed = q[start : min(pairs, start + CHUNK)]
            lowest = int(torch.minimum(packed & 0x0F, packed >> 4).min())
            require(lowest > 0, f"{where} holds the int4 code 0")
        if numel % 2:
            last = int(q[pairs])
            require(last & 0x0F > 0, f"{where} holds the int4 code 0")
            require(last >> 4 == 8, f"{where} has nonzero int4 padding")

    def _levels(self, q: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The integer levels of elements [start, stop) (int8; a view of q for int8 codes)."""
        if self.bits == 8:
            return q[start:stop]
        first = start // 2
        packed = q[first : ceil_div(stop, 2)]
        codes = torch.stack([packed & 0x0F, packed >> 4], dim=1).flatten()
        offset = start - 2 * first
        return codes[offset : offset + stop - start].to(torch.int8) - 8

    def decode(
        self, parts: Mapping[str, torch.Tensor], numel: int, spec: CodecConfig
    ) -> torch.Tensor:
        # Equal, bit for bit, to (padded levels viewed as blocks) * scale[:, None], trimmed.
        return self.decode_range(parts, numel, spec, 0, numel)

    def decode_range(
        self,
        parts: Mapping[str, torch.Tensor],
        numel: int,
        spec: CodecConfig,
        start: int,
        stop: int,
    ) -> torch.Tensor:
        """level * scale of its block, in three pieces: the partial block at the start, the
        whole blocks in the middle (one broadcast multiply), and the partial block at the end."""
        size, scale = spec.block_size, parts["scale"]
        out = self._levels(parts["q"], start, stop).to(torch.float32)  # exact; a new tensor
        head = min(stop, ceil_div(start, size) * size)  # end of the first partial block
        if head > start:
            out[: head - start].mul_(scale[start // size])
        middle = max(head, stop // size * size)  # end of the whole blocks
        if middle > head:
            first, count = head // size, (middle - head) // size
            whole = out[head - start : middle - start].view(count, size)
            whole.mul_(scale[first : first + count, None])
        if stop > middle:
            out[middle - start :].mul_(scale[middle // size])
        return out

    def error_bound(self, x: torch.Tensor, spec: CodecConfig) -> torch.Tensor:
        scale = block_scales(self._blocks(x, spec.block_size), self.qmax)
        bound = _as_f32(scale.double() * (0.5 + 2.0**-14) + 2.0**-149)
        return bound.repeat_interleave(spec.block_size)[: x.numel()]
