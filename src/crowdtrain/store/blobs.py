"""The blob store interface: immutable byte strings addressed by their sha256.

Model weights, optimizer state, data shards and contribution payloads are all blobs. A blob's
id is the lowercase hex sha256 of its bytes, so a put is idempotent, a reader can verify what it
got, and two coordinator processes can share one store without coordinating writes.

`BlobStore` is what the coordinator codes against. `DirBlobStore` (a local directory) is the one
implementation today; an S3-compatible object store with presigned URLs is the planned second one
(the design document, "Scale-out path"), which is why reads are ranges yielded as byte chunks and
`local_path` may return None. No paper is implemented here.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from crowdtrain.store.errors import InvalidBlobId

_BLOB_ID = re.compile(r"[0-9a-f]{64}")


def is_blob_id(value: str) -> bool:
    """True when `value` is 64 lowercase hex characters, the only form a blob id takes."""
    return isinstance(value, str) and _BLOB_ID.fullmatch(value) is not None


def check_blob_id(value: str) -> str:
    """Return `value` if it is a blob id; raise `InvalidBlobId` (a `BlobNotFound` and a
    `ValueError`) otherwise, so ids such as ``../x`` never reach a path or an object key."""
    if not is_blob_id(value):
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise InvalidBlobId(
            f"{shown!r} is not a blob id; a blob id is 64 lowercase hex characters (a sha256)."
        )
    return value


@runtime_checkable
class BlobStore(Protocol):
    """Content-addressed storage of immutable byte strings (ids are sha256 hex digests).

    Contract shared by every implementation:

    - Writes are atomic and durable: once a put returns, the blob survives a crash, and a
      reader never sees a partial blob. A put of bytes that are already stored is a no-op.
    - `put_stream`/`put_async_stream` stop reading as soon as more than `max_bytes` arrived and
      raise `BlobTooLarge`; with `expected_sha` they raise `BlobMismatch` when the hash differs.
      Either way nothing is stored.
    - Unknown ids raise `BlobNotFound`; malformed ids raise `InvalidBlobId` (a subclass of both
      `BlobNotFound` and `ValueError`), except `has`, which answers False, and `delete`, which
      does nothing for an unknown id.
    """

    def put_bytes(self, data: bytes) -> str:
        """Store `data`; return its sha256 hex id."""
        ...

    def put_stream(
        self,
        chunks: Iterable[bytes | memoryview],
        *,
        max_bytes: int,
        expected_sha: str | None = None,
    ) -> tuple[str, int]:
        """Store the concatenation of `chunks`, hashing on the way; return (sha, size)."""
        ...

    async def put_async_stream(
        self, chunks: AsyncIterable[bytes], *, max_bytes: int, expected_sha: str | None = None
    ) -> tuple[str, int]:
        """`put_stream` for an async source such as a FastAPI ``request.stream()``."""
        ...

    def has(self, sha: str) -> bool:
        """Whether a blob with this id is stored."""
        ...

    def size(self, sha: str) -> int:
        """The blob's length in bytes."""
        ...

    def read(self, sha: str, *, max_bytes: int | None = None) -> bytes:
        """The whole blob; `BlobTooLarge` if it is longer than `max_bytes`."""
        ...

    def iter_range(
        self, sha: str, start: int = 0, stop: int | None = None, chunk: int = 1 << 16
    ) -> Iterator[bytes]:
        """Yield ``blob[start:stop]`` (Python slice semantics) in pieces of at most `chunk`
        bytes. A missing blob raises `BlobNotFound` at the call, not at the first `next`."""
        ...

    def local_path(self, sha: str) -> Path | None:
        """A path to the blob on this machine's file system, or None if the store is remote
        (then serve it with `iter_range`); `BlobNotFound` if it is not stored."""
        ...

    def delete(self, sha: str) -> None:
        """Remove the blob if it is stored."""
        ...
