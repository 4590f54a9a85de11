"""What every per-tensor codec provides, and the checks they share.

A codec turns one flat float32 tensor into a few named 1-D *wire tensors* (values, scales,
indices, ...) and back: `check` validates the wire tensors once, then `decode` rebuilds the whole
tensor or `decode_range` any element range of it, reading only the wire data that range needs.
Its `slots` give the exact dtype and length of each wire tensor from the parameter's element
count and the codec parameters alone, so the decoder can check a payload's sizes against the
bytes before it allocates anything, and the server can bound upload sizes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from crowdtrain.codec.errors import PayloadError
from crowdtrain.config import CodecConfig

#: safetensors' name for each dtype a wire tensor may have.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.uint16: "U16",
    torch.int32: "I32",
}


@dataclass(frozen=True)
class Slot:
    """One wire tensor of a parameter: its name suffix, dtype and length (it is always 1-D)."""

    suffix: str
    dtype: torch.dtype
    length: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.length * self.dtype.itemsize

    @property
    def dtype_name(self) -> str:
        """The dtype as safetensors writes it (e.g. "F32")."""
        return SAFETENSORS_DTYPES[self.dtype]


class TensorCodec(Protocol):
    """A lossless or lossy codec for one flat float32 tensor."""

    @property
    def name(self) -> str:
        """The codec's name in `CodecConfig.name` and in the payload header."""
        ...

    def params(self, spec: CodecConfig) -> dict[str, int]:
        """The codec parameters the decoder needs, as written in the payload header."""
        ...

    def slots(self, numel: int, spec: CodecConfig) -> tuple[Slot, ...]:
        """The wire tensors for a parameter of `numel` elements."""
        ...

    def encode(self, x: torch.Tensor, spec: CodecConfig) -> dict[str, torch.Tensor]:
        """Compress a flat, finite float32 tensor into wire tensors keyed by slot suffix."""
        ...

    def check(
        self, parts: Mapping[str, torch.Tensor], numel: int, spec: CodecConfig, where: str
    ) -> None:
        """Raise PayloadError (naming `where`) if the wire tensors hold a value that `encode`
        never writes or that would decode to NaN/Inf. `parts` have the slots' dtypes and
        lengths; temporary memory stays O(CHUNK), not O(numel)."""
        ...

    def decode(
        self, parts: Mapping[str, torch.Tensor], numel: int, spec: CodecConfig
    ) -> torch.Tensor:
        """Rebuild the flat float32 tensor (a new one) from checked wire tensors."""
        ...

    def decode_range(
        self,
        parts: Mapping[str, torch.Tensor],
        numel: int,
        spec: CodecConfig,
        start: int,
        stop: int,
    ) -> torch.Tensor:
        """Elements [start, stop) of `decode(parts, numel, spec)`, bit for bit, as a new tensor,
        computed from only the wire data those elements depend on (0 <= start <= stop <= numel)."""
        ...

    def error_bound(self, x: torch.Tensor, spec: CodecConfig) -> torch.Tensor:
        """Per-element bound on |decode(encode(x)) - x| for a flat, finite float32 tensor."""
        ...


def require(ok: bool, message: str) -> None:
    """Raise PayloadError(message) unless `ok`."""
    if not ok:
        raise PayloadError(message)


def value_range(t: torch.Tensor, empty: float = 0.0) -> tuple[float, float]:
    """(min, max) of a tensor in one pass; NaN if it holds a NaN; (empty, empty) if empty."""
    if t.numel() == 0:
        return empty, empty
    low, high = torch.aminmax(t)
    return float(low), float(high)


def all_finite(t: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN and no infinity (aminmax propagates NaN; it is cheaper
    than isfinite().all() because it allocates no mask)."""
    low, high = value_range(t)
    return math.isfinite(low) and math.isfinite(high)


def require_finite(t: torch.Tensor, what: str) -> tuple[float, float]:
    """Raise PayloadError if `t` holds a NaN or an infinity; else return its (min, max)."""
    low, high = value_range(t)
    require(math.isfinite(low) and math.isfinite(high), f"{what} contains NaN or Inf")
    return low, high


def ceil_div(a: int, b: int) -> int:
    """Integer ceiling of a / b for a >= 0, b > 0."""
    return -(-a // b)
