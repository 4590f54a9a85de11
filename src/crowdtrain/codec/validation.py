"""Validate a payload completely without decoding it, and locate its wire tensors.

The coordinator must reject a bad upload with a reason but should not pay for an fp32 copy of
the model to do so (the design's trust model: every byte a volunteer sends is validated before
it can touch the model). `validate` runs every check on a payload, in this order, directly on
its bytes; `decode` and `PayloadSource` call it, so there is one implementation of the checks:

1. the size limit, before anything is parsed;
2. the safetensors framing and header, our JSON header, the parameter names and shapes, and
   every tensor entry's name, dtype, length and offsets (header bytes only);
3. the BLAKE2b digest over the data (read in place, nothing copied);
4. each codec's value checks (`TensorCodec.check`): no NaN/Inf in float tensors, no code the
   encoder never writes, indices inside their chunk and ascending, nothing that decodes to Inf.

Temporary memory is O(`buffers.CHUNK`): the wire tensors are views of the payload's bytes and
the checks walk them in pieces (a tensor stored misaligned, which `encode` never writes, is
copied: O(that tensor)). `Parsed` records where each wire tensor lies, so that
`PayloadSource` can decode any fragment later (SparseLoCo-style sparse and blockwise int8
payloads, Sarfi et al. 2025, arXiv:2508.15706; Dettmers et al. 2022, arXiv:2110.02861).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from crowdtrain.codec import wire
from crowdtrain.codec.base import Slot, TensorCodec, require
from crowdtrain.codec.buffers import Payload, as_buffer, typed_view
from crowdtrain.codec.errors import PayloadError
from crowdtrain.codec.registry import get_codec
from crowdtrain.codec.wire import PayloadHeader
from crowdtrain.config import CodecConfig

Shapes = Mapping[str, tuple[int, ...]]

_SAFETY_NET = (RuntimeError, ValueError, TypeError, IndexError, KeyError, OverflowError)


@dataclass(frozen=True)
class Parsed:
    """A payload whose header and tensor table have been checked: where everything lies."""

    header: PayloadHeader
    core: dict[str, Any]
    codec: TensorCodec
    spec: CodecConfig
    layout: dict[str, Slot]
    #: byte span of each wire tensor, absolute (from the start of the payload)
    spans: dict[str, tuple[int, int]]

    def numel(self, name: str) -> int:
        """The element count of parameter `name`."""
        return math.prod(self.header.shapes[name])

    def parts(self, buf: memoryview, name: str) -> dict[str, torch.Tensor]:
        """Parameter `name`'s wire tensors by slot suffix, as views of `buf` (read them only)."""
        out: dict[str, torch.Tensor] = {}
        for slot in self.codec.slots(self.numel(name), self.spec):
            start, stop = self.spans[wire.tensor_name(name, slot.suffix)]
            out[slot.suffix] = typed_view(buf, start, stop, slot.dtype)
        return out


@contextmanager
def payload_errors() -> Iterator[None]:
    """Turn any unexpected exception into PayloadError, so callers see one error type."""
    try:
        yield
    except PayloadError:
        raise
    except _SAFETY_NET as exc:
        # A safety net: every known problem has its own check; this keeps the contract.
        raise PayloadError(f"payload could not be decoded ({type(exc).__name__})") from exc


def check_shapes(header: PayloadHeader, expected: Shapes) -> None:
    """The payload's parameters must be exactly the expected names with the expected shapes."""
    missing = sorted(set(expected) - set(header.shapes))
    require(not missing, f"payload lacks the parameter {missing[0] if missing else ''!r}")
    extra = sorted(set(header.shapes) - set(expected))
    require(not extra, f"payload has the unexpected parameter {extra[0] if extra else ''!r}")
    for name, shape in expected.items():
        got = header.shapes[name]
        want = tuple(int(d) for d in shape)
        require(
            got == want, f"parameter {name!r} has shape {list(got)} where {list(want)} was expected"
        )


def parse(buf: memoryview, expected: Shapes) -> Parsed:
    """Step 2 of the module docstring: everything that the header bytes alone can show."""
    raw, data_start = wire.split(buf, wire.header_allowance(expected))
    header, core, _ = wire.parse_metadata(raw)
    check_shapes(header, expected)
    spec = header.spec
    codec = get_codec(spec.name)
    layout = wire.layout(header.shapes, codec, spec)
    spans = wire.check_entries(raw, layout, len(buf) - data_start)
    absolute = {name: (data_start + a, data_start + b) for name, (a, b) in spans.items()}
    return Parsed(header, core, codec, spec, layout, absolute)


def check_data(buf: memoryview, parsed: Parsed) -> None:
    """Steps 3 and 4 of the module docstring: the digest, then every parameter's values."""
    spans = parsed.spans
    tensors = ((name, buf[slice(*spans[name])]) for name in sorted(spans))
    actual = wire.compute_digest(parsed.core, tensors)
    require(
        actual == parsed.header.digest,
        "payload digest does not match its contents (corrupted upload)",
    )
    for name in sorted(parsed.header.shapes):
        parts = parsed.parts(buf, name)
        parsed.codec.check(parts, parsed.numel(name), parsed.spec, f"parameter {name!r}")


def check_payload(buf: memoryview, expected: Shapes, max_bytes: int | None) -> Parsed:
    """All the checks, in order, on a payload already turned into a buffer."""
    wire.check_size(buf, max_bytes)
    with payload_errors():
        parsed = parse(buf, expected)
        check_data(buf, parsed)
    return parsed


def validate(payload: Payload, expected: Shapes, *, max_bytes: int | None = None) -> PayloadHeader:
    """Check a payload as thoroughly as `decode` does, without decoding it; return its header.

    `payload` is bytes, a bytearray, a memoryview or a read-only mmap; it is read in place,
    never copied. Raises PayloadError (one sentence) exactly where `decode` would; a payload
    that passes decodes without error. The returned header (its digest included) can be
    handed to `PayloadSource(..., validated=header)` to skip the data checks later.
    """
    return check_payload(as_buffer(payload), expected, max_bytes).header
