"""Zero-copy access to a payload's bytes: the accepted buffer types and typed tensor views.

A payload may be `bytes`, a `bytearray`, a `memoryview` or a read-only `mmap.mmap` (a blob file
mapped by the coordinator). `validate` and `PayloadSource` read it through `typed_view`, which
wraps a byte range as a 1-D tensor without copying it (`torch.frombuffer`), so checking or
decoding a fragment never duplicates the whole payload. A view is copied only when its address
is not a multiple of its element size, which no payload written by `encode` (safetensors aligns
the data to 8 bytes) ever needs. The caller must not change the buffer while it is in use.
"""

from __future__ import annotations

import mmap
import warnings

import torch

from crowdtrain.codec.errors import PayloadError

#: Elements (or bytes) per piece when a check or decode walks a tensor in pieces, which bounds
#: its temporary memory to a few times this much, whatever the parameter's size.
CHUNK = 1 << 20

_READ_ONLY_WARNING = "The given buffer is not writable"

#: What `validate`, `decode` and `PayloadSource` accept as a payload.
Payload = bytes | bytearray | memoryview | mmap.mmap


def as_buffer(payload: object) -> memoryview:
    """The payload as a flat memoryview of unsigned bytes, without copying it."""
    if not isinstance(payload, bytes | bytearray | memoryview | mmap.mmap):
        raise PayloadError(f"a payload must be bytes, not {type(payload).__name__}")
    try:
        view = memoryview(payload)
    except ValueError as exc:  # a closed mmap, a released memoryview
        raise PayloadError(f"the payload buffer cannot be read ({exc})") from None
    if not view.c_contiguous:
        raise PayloadError("the payload buffer cannot be read (it is not contiguous)")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def typed_view(buf: memoryview, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Bytes [start, stop) of `buf` as a 1-D tensor of `dtype` that shares their memory.

    The tensor must only be read (the buffer may be read-only). It is a copy only when the
    bytes are misaligned for `dtype`. stop - start must be a multiple of the element size.
    """
    if start == stop:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():
        # torch warns (once) that it cannot mark a tensor read-only; we never write to it.
        warnings.filterwarnings("ignore", message=_READ_ONLY_WARNING, category=UserWarning)
        raw = torch.frombuffer(buf[start:stop], dtype=torch.uint8)
    if raw.data_ptr() % dtype.itemsize:
        raw = raw.clone()
    return raw.view(dtype)
