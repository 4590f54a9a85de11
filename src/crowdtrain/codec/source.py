"""A contribution served straight from its payload bytes, decoded one fragment at a time.

The aggregator reads each contribution fragment by fragment (`crowdtrain.robust.DeltaSource`:
`read(name, start, stop)` gives flat elements [start, stop) of one parameter as float32), so it
never needs a contribution's full fp32 copy. `PayloadSource` decodes exactly the asked range from
the compressed wire tensors (a DiLoCo pseudo-gradient, Douillard et al. 2023, arXiv:2311.08105,
compressed blockwise, Dettmers et al. 2022, arXiv:2110.02861, or chunk-wise top-k, SparseLoCo,
Sarfi et al. 2025, arXiv:2508.15706): for int8/int4 the blocks the range touches, for topk2bit
the chunks it touches, for fp32/fp16/bf16 the range itself. Every value is bit for bit the one
`decode` gives. The payload is validated once, when the source is built (or was validated
before: pass the header `validate` returned), and `from_file` maps a blob file read-only so that
many contributions can be open at once without holding their bytes in Python memory.
"""

from __future__ import annotations

import contextlib
import mmap
import operator
import os
from collections.abc import Mapping
from types import TracebackType

import torch

from crowdtrain.codec import validation as checks
from crowdtrain.codec import wire
from crowdtrain.codec.base import require
from crowdtrain.codec.buffers import Payload, as_buffer
from crowdtrain.codec.wire import PayloadHeader


class PayloadSource:
    """Parameters of one payload, decoded lazily: a `DeltaSource` over compressed bytes.

    Without `validated`, building it runs `validate` (every check; PayloadError if the payload
    is bad). With `validated` (the header an earlier `validate` of these bytes returned), only
    the header is checked again, and the payload must carry the same digest. The buffer must
    not change while the source is open. `read` returns new tensors, never views of the
    payload, so they stay valid after `close`.
    """

    def __init__(
        self,
        payload: Payload,
        expected: Mapping[str, tuple[int, ...]],
        *,
        validated: PayloadHeader | None = None,
        max_bytes: int | None = None,
    ) -> None:
        buf = as_buffer(payload)
        try:
            if validated is None:
                parsed = checks.check_payload(buf, expected, max_bytes)
            else:
                wire.check_size(buf, max_bytes)
                with checks.payload_errors():
                    parsed = checks.parse(buf, expected)
                require(
                    parsed.header == validated,
                    "payload is not the one that was validated (its header or digest differs)",
                )
            with checks.payload_errors():
                self._parts = {name: parsed.parts(buf, name) for name in parsed.header.shapes}
        except BaseException:
            _release(buf)
            raise
        self._buf: memoryview | None = buf
        self._parsed = parsed
        self._mapped: mmap.mmap | None = None

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        expected: Mapping[str, tuple[int, ...]],
        *,
        validated: PayloadHeader | None = None,
        max_bytes: int | None = None,
    ) -> PayloadSource:
        """A source over a payload file, mapped read-only (close it, or use `with`).

        OSError if the file cannot be opened; PayloadError if its contents are bad.
        """
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:  # an empty file cannot be mapped; it is simply a too-short payload
                return cls(b"", expected, validated=validated, max_bytes=max_bytes)
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            source = cls(mapped, expected, validated=validated, max_bytes=max_bytes)
        except BaseException:
            _close_map(mapped)
            raise
        source._mapped = mapped
        return source

    @property
    def header(self) -> PayloadHeader:
        """The payload's header: codec, parameters, shapes and digest."""
        return self._parsed.header

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every parameter in the payload."""
        return dict(self._parsed.header.shapes)

    @property
    def closed(self) -> bool:
        """Whether `close` has been called."""
        return self._buf is None

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of parameter `name`, flattened, as a new float32 1-D tensor.

        KeyError for an unknown name; ValueError for a range outside the parameter or a closed
        source.
        """
        if self._buf is None:
            raise ValueError("this payload source is closed; open the payload again to read it")
        parts = self._parts.get(name)
        if parts is None:
            raise KeyError(f"this payload has no parameter named {name!r}")
        start, stop = operator.index(start), operator.index(stop)
        numel = self._parsed.numel(name)
        if not 0 <= start <= stop <= numel:
            raise ValueError(
                f"element range [{start}, {stop}) is outside parameter {name!r}, "
                f"which has {numel} elements"
            )
        with checks.payload_errors():
            return self._parsed.codec.decode_range(parts, numel, self._parsed.spec, start, stop)

    def close(self) -> None:
        """Release the payload's bytes (and unmap the file); reading afterwards is an error."""
        if self._buf is None:
            return
        self._parts = {}
        _release(self._buf)
        self._buf = None
        if self._mapped is not None:
            _close_map(self._mapped)
            self._mapped = None

    def __enter__(self) -> PayloadSource:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _release(buf: memoryview) -> None:
    """Release our view of the payload (a view someone else exported from it keeps it alive)."""
    with contextlib.suppress(BufferError):
        buf.release()


def _close_map(mapped: mmap.mmap) -> None:
    """Unmap now, or, while some view of it is still alive (say, held by a traceback), as soon
    as the last one goes: the mmap object unmaps itself when it is freed."""
    with contextlib.suppress(BufferError):
        mapped.close()
