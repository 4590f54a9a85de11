"""Named tensors in the safetensors format, streamed: the bytes θ and the round state are
stored and published in, produced without building them in memory.

`safetensors.torch.save` returns one ``bytes`` object: a 1B-parameter θ becomes a 4 GB copy
that is then hashed and written, three passes over the memory where two are needed.
`TensorFile` yields the same bytes as slices of the tensors' own memory, so a blob store can
hash and write them as they go (`BlobStore.put_stream`). The layout is safetensors' own
(https://huggingface.co/docs/safetensors, "Format"): an 8-byte little-endian header length, a
compact JSON header padded with spaces to a multiple of 8, then the tensors' raw
little-endian bytes back to back, ordered as `safetensors.torch.save` orders them (dtype
descending in safetensors' own dtype order, then name), so equal tensors give the bytes — and
the sha256 — that `save` gives (`tests/test_tensorfile.py` checks it against `save`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping

import torch

#: safetensors' dtype names, in the order of its ``Dtype`` enum (lowest first); `save` writes
#: tensors of a later dtype first. Only the dtypes this project stores are listed.
_DTYPES: tuple[tuple[torch.dtype, str], ...] = (
    (torch.bool, "BOOL"),
    (torch.uint8, "U8"),
    (torch.int8, "I8"),
    (torch.int16, "I16"),
    (torch.float16, "F16"),
    (torch.bfloat16, "BF16"),
    (torch.int32, "I32"),
    (torch.float32, "F32"),
    (torch.float64, "F64"),
    (torch.int64, "I64"),
)
_RANK = {dtype: (rank, name) for rank, (dtype, name) in enumerate(_DTYPES)}
#: The most bytes one yielded slice holds: large enough that per-slice overhead is nothing,
#: small enough that a slice hashed and then written is still in the CPU's caches.
CHUNK = 1 << 22


class TensorFile:
    """The safetensors serialization of `tensors` (CPU copies are made only for tensors that
    are not contiguous CPU tensors already): ``size`` bytes, yielded by `chunks`."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if tensor.dtype not in _RANK:
                raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, not a stored one")
        order = sorted(tensors, key=lambda n: (-_RANK[tensors[n].dtype][0], n))
        self._tensors = [tensors[n].detach().to("cpu").contiguous() for n in order]
        header: dict[str, object] = {}
        offset = 0
        for name, tensor in zip(order, self._tensors, strict=True):
            size = tensor.numel() * tensor.element_size()
            header[name] = {
                "dtype": _RANK[tensor.dtype][1],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._head = struct.pack("<Q", len(text)) + text
        self.size = len(self._head) + offset

    def chunks(self) -> Iterator[bytes | memoryview]:
        """The file's bytes in order: the header, then slices of each tensor's memory."""
        yield self._head
        for tensor in self._tensors:
            if tensor.numel() == 0:
                continue
            raw = memoryview(tensor.reshape(-1).view(torch.uint8).numpy().data)
            for start in range(0, len(raw), CHUNK):
                yield raw[start : start + CHUNK]

    def to_bytes(self) -> bytes:
        """The whole file as one ``bytes`` (for small tensors and tests)."""
        return b"".join(self.chunks())
