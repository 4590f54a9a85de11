"""Encode a pseudo-gradient for upload, and decode (and fully validate) an uploaded payload.

`encode` compresses Δ = θ_r − θ_local (one float32 tensor per parameter) with the configured
codec. With a `residual` dict it applies error feedback (Seide et al. 2014; Lin et al. 2018,
"Deep Gradient Compression", arXiv:1712.01887; Peng et al. 2024, DeMo, arXiv:2411.19870; Sarfi
et al. 2025, SparseLoCo, arXiv:2508.15706): it compresses acc = ef_decay * residual + Δ and keeps
residual = acc − decoded(acc) for the next round, so what compression drops is sent later.

`decode` treats the payload as hostile: it first runs `validate` (crowdtrain.codec.validation),
which checks the size before parsing, the safetensors header length before reading it, every
declared name, dtype and length against what the expected shapes and codec parameters imply
before any tensor is built, the digest, and every value (no NaN/Inf, indices in range). Any
failure is one `PayloadError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import safetensors.torch
import torch

from crowdtrain.codec import wire
from crowdtrain.codec.base import value_range
from crowdtrain.codec.buffers import Payload, as_buffer
from crowdtrain.codec.quant import MAX_ABS
from crowdtrain.codec.registry import get_codec
from crowdtrain.codec.validation import Shapes, check_payload, payload_errors
from crowdtrain.codec.wire import PayloadHeader
from crowdtrain.config import CodecConfig


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A 1-D CPU tensor's raw (little-endian) bytes."""
    return t.contiguous().view(torch.uint8).numpy().data


def _accumulate(
    delta: Mapping[str, torch.Tensor],
    spec: CodecConfig,
    residual: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """acc = ef_decay * residual + delta per parameter, as checked CPU float32 tensors."""
    accs: dict[str, torch.Tensor] = {}
    for name in sorted(delta):
        t = delta[name]
        if not isinstance(name, str):
            raise ValueError(f"parameter names must be strings, not {type(name).__name__}")
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"delta[{name!r}] must be a floating-point tensor")
        acc = t.detach().to(device="cpu", dtype=torch.float32)
        if residual is not None and name in residual:
            r = residual[name]
            if r.shape != t.shape:
                raise ValueError(
                    f"residual[{name!r}] has shape {tuple(r.shape)} but delta[{name!r}] has "
                    f"shape {tuple(t.shape)}; reset the residual when the model changes"
                )
            r = r.detach().to(device="cpu", dtype=torch.float32)
            # 1.0 * r is r exactly: skip a pass over the model when the residual is not decayed.
            acc = (r if spec.ef_decay == 1.0 else spec.ef_decay * r) + acc
        low, high = value_range(acc)
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"delta[{name!r}] contains NaN or Inf; refusing to encode it")
        if max(-low, high) > MAX_ABS:
            raise ValueError(f"delta[{name!r}] has a value above {MAX_ABS:.3g} in magnitude")
        accs[name] = acc.contiguous()
    return accs


def encode(
    delta: Mapping[str, torch.Tensor],
    spec: CodecConfig,
    residual: dict[str, torch.Tensor] | None = None,
) -> bytes:
    """Compress a pseudo-gradient into one payload; the same input always gives the same bytes.

    With `residual` (error feedback; the sender keeps it), compress acc = ef_decay * residual +
    delta and set residual[name] (in place when it exists) to acc − decoded(acc). Raises
    ValueError for non-finite values, magnitudes above 2^100, or a residual of the wrong shape;
    the residual is left untouched then.
    """
    codec = get_codec(spec.name)
    accs = _accumulate(delta, spec, residual)
    tensors: dict[str, torch.Tensor] = {}
    decoded: dict[str, torch.Tensor] = {}
    for name, acc in accs.items():
        flat = acc.view(-1)
        parts = codec.encode(flat, spec)
        for suffix, part in parts.items():
            tensors[wire.tensor_name(name, suffix)] = part.contiguous()
        if residual is not None:
            decoded[name] = codec.decode(parts, flat.numel(), spec).view(acc.shape)
    shapes = {name: tuple(acc.shape) for name, acc in accs.items()}
    core = wire.metadata_core(codec.name, codec.params(spec), shapes)
    digest = wire.compute_digest(core, ((n, _bytes_of(tensors[n])) for n in sorted(tensors)))
    blob = safetensors.torch.save(
        tensors, metadata={wire.METADATA_KEY: wire.metadata_text(core, digest)}
    )
    if residual is not None:
        with torch.no_grad():
            for name, acc in accs.items():
                new = acc - decoded[name]
                old = residual.get(name)
                if old is not None:
                    old.copy_(new)
                else:
                    residual[name] = new
    return bytes(blob)


def max_payload_bytes(expected: Shapes, spec: CodecConfig) -> int:
    """Upper bound on len(encode(delta, spec)) for any delta with these shapes.

    The data size is exact (it depends only on shapes and codec parameters); the header bound
    is exact up to a few digits per tensor and the header's padding to 8 bytes.
    """
    codec = get_codec(spec.name)
    shapes = {name: tuple(int(d) for d in shape) for name, shape in expected.items()}
    layout = wire.layout(shapes, codec, spec)
    core = wire.metadata_core(codec.name, codec.params(spec), shapes)
    data = sum(slot.nbytes for slot in layout.values())
    return 8 + wire.header_size_bound(core, layout) + data


def error_bound(x: torch.Tensor, spec: CodecConfig) -> torch.Tensor:
    """Per-element bound on |decode(encode(x)) − x| (same shape as x, float32).

    fp32: 0; bf16: 2^-8|x| + 2^-134; fp16: about 2^-11|x| + 2^-25 * scale (per-tensor power
    of two); int8/int4: about scale/2 of the element's block. For topk2bit it is the element's
    chunk max|x|, which always holds but is loose: that codec relies on error feedback.
    See `crowdtrain.codec.quant` and `crowdtrain.codec.topk` for the exact expressions.
    """
    codec = get_codec(spec.name)
    flat = x.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
    return codec.error_bound(flat, spec).view(x.shape)


def read_header(payload: Payload, *, max_bytes: int | None = None) -> PayloadHeader:
    """Read and validate a payload's header without decoding its tensors.

    It checks the size limit, the header's length, JSON, format, version, codec, parameters and
    shapes; the tensors and the digest are checked only by `validate` and `decode`.
    """
    data = as_buffer(payload)
    wire.check_size(data, max_bytes)
    raw, _ = wire.split(data, wire.MAX_HEADER_BYTES)
    header, _, _ = wire.parse_metadata(raw)
    return header


def decode(
    payload: Payload, expected: Shapes, *, max_bytes: int | None = None
) -> dict[str, torch.Tensor]:
    """Decode a payload into float32 tensors with exactly the expected names and shapes.

    It runs `validate` first (see `crowdtrain.codec.validation` for the checks and their order),
    so it raises PayloadError (one sentence) exactly where `validate` does. The tensors are new:
    none shares memory with the payload.
    """
    data = as_buffer(payload)
    parsed = check_payload(data, expected, max_bytes)
    out: dict[str, torch.Tensor] = {}
    with payload_errors():
        for name, shape in sorted(parsed.header.shapes.items()):
            parts = parsed.parts(data, name)
            out[name] = parsed.codec.decode(parts, parsed.numel(name), parsed.spec).view(shape)
    return out
