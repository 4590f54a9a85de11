"""`DirBlobStore`: the blob store as a local directory, with atomic and durable writes.

A blob with id ``abcd…`` lives at ``root/ab/cd…`` (two-level fan-out keeps directories small).
Every write goes to a fresh temp file under ``root/tmp/`` (same file system), is flushed and
fsynced, renamed into place with `os.replace`, and then the directory entry is fsynced. So a crash
leaves either the whole blob or nothing under its id; what it can leave behind is a stray temp
file, which is never visible as a blob and which `sweep_temp` removes. No paper is implemented
here; the durability recipe is the usual POSIX one (write, fsync file, rename, fsync directory).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import AsyncIterable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from crowdtrain.faults import crash_point
from crowdtrain.store.blobs import check_blob_id, is_blob_id
from crowdtrain.store.errors import BlobMismatch, BlobNotFound, BlobTooLarge, StoreError

TEMP_DIR = "tmp"
TEMP_PREFIX = "put-"


def fsync_dir(path: Path) -> None:
    """Make the directory entries of `path` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Incoming:
    """One blob being received: a temp file plus the running sha256 and size."""

    def __init__(self, temp_dir: Path, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be zero or more, not {max_bytes}.")
        fd, name = tempfile.mkstemp(dir=temp_dir, prefix=TEMP_PREFIX, suffix=".part")
        self.path = Path(name)
        self.file: BinaryIO = os.fdopen(fd, "wb")
        self.hash = hashlib.sha256()
        self.size = 0
        self.max_bytes = max_bytes

    def write(self, chunk: bytes | memoryview) -> None:
        n = len(chunk)
        if self.size + n > self.max_bytes:
            raise BlobTooLarge(
                f"The upload is larger than the limit of {self.max_bytes} bytes; "
                "send a smaller payload."
            )
        self.hash.update(chunk)
        self.file.write(chunk)
        self.size += n

    def discard(self) -> None:
        """Remove the temp file, even when closing it fails: a write that failed for want of
        space leaves buffered bytes that `close` cannot flush (ENOSPC again), and a temp file
        left behind would keep holding the space of a full disk."""
        try:
            self.file.close()
        except OSError:
            pass
        finally:
            self.path.unlink(missing_ok=True)


class DirBlobStore:
    """A `BlobStore` in a local directory. Safe to share between threads and processes.

    `fsync=False` skips the fsync calls (writes stay atomic but not crash-durable); use it only
    for throwaway stores in tests and simulations.
    """

    def __init__(self, root: str | Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self._fsync = fsync
        self._temp_dir = self.root / TEMP_DIR
        self._temp_dir.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"DirBlobStore({str(self.root)!r})"

    # --- paths ---------------------------------------------------------------------------------

    def _path(self, sha: str) -> Path:
        check_blob_id(sha)
        return self.root / sha[:2] / sha[2:]

    def _existing(self, sha: str) -> Path:
        path = self._path(sha)
        if not path.is_file():
            raise BlobNotFound(f"No blob {sha} is stored.")
        return path

    # --- writes --------------------------------------------------------------------------------

    def _commit(self, incoming: _Incoming, expected_sha: str | None) -> tuple[str, int]:
        """Make the received temp file the blob it hashes to (or discard it); return (sha, size)."""
        try:
            sha = incoming.hash.hexdigest()
            if expected_sha is not None and sha != expected_sha:
                raise BlobMismatch(
                    f"The uploaded bytes hash to {sha}, not to the expected {expected_sha}."
                )
            final = self.root / sha[:2] / sha[2:]
            if final.is_file():
                incoming.discard()
                return sha, incoming.size
            incoming.file.flush()
            if self._fsync:
                os.fsync(incoming.file.fileno())
            incoming.file.close()
            self._ensure_fanout(final.parent)
            crash_point("blob.before_rename")
            os.replace(incoming.path, final)
            crash_point("blob.after_rename")
            if self._fsync:
                fsync_dir(final.parent)
            return sha, incoming.size
        except BaseException:
            incoming.discard()
            raise

    def _ensure_fanout(self, directory: Path) -> None:
        if directory.is_dir():
            return
        directory.mkdir(exist_ok=True)
        if self._fsync:
            fsync_dir(self.root)

    def _start(self, max_bytes: int, expected_sha: str | None) -> _Incoming:
        if expected_sha is not None:
            check_blob_id(expected_sha)
        return _Incoming(self._temp_dir, max_bytes)

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if self.has(sha):
            return sha
        incoming = self._start(len(data), None)
        try:
            incoming.write(data)
        except BaseException:
            incoming.discard()
            raise
        return self._commit(incoming, sha)[0]

    def put_stream(
        self,
        chunks: Iterable[bytes | memoryview],
        *,
        max_bytes: int,
        expected_sha: str | None = None,
    ) -> tuple[str, int]:
        incoming = self._start(max_bytes, expected_sha)
        try:
            for chunk in chunks:
                incoming.write(chunk)
        except BaseException:
            incoming.discard()
            raise
        return self._commit(incoming, expected_sha)

    async def put_async_stream(
        self, chunks: AsyncIterable[bytes], *, max_bytes: int, expected_sha: str | None = None
    ) -> tuple[str, int]:
        # Chunk writes are small and stay on the event loop; the fsyncs and the rename go to a
        # thread. If the caller is cancelled during that step the thread still finishes it.
        incoming = self._start(max_bytes, expected_sha)
        try:
            async for chunk in chunks:
                incoming.write(chunk)
        except BaseException:
            incoming.discard()
            raise
        crash_point("blob.received")
        return await asyncio.to_thread(self._commit, incoming, expected_sha)

    def delete(self, sha: str) -> None:
        path = self._path(sha)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        if self._fsync:
            fsync_dir(path.parent)

    def sweep_temp(self, older_than: float, now: float) -> int:
        """Remove temp files left by crashed writes whose mtime is before ``now - older_than``;
        return how many were removed. Pass an age well above the longest upload, since another
        process sharing the directory may be writing one."""
        removed = 0
        for entry in self._temp_dir.iterdir():
            if not entry.name.startswith(TEMP_PREFIX):
                continue
            try:
                if entry.stat().st_mtime < now - older_than:
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    # --- reads ---------------------------------------------------------------------------------

    def has(self, sha: str) -> bool:
        return is_blob_id(sha) and self._path(sha).is_file()

    def size(self, sha: str) -> int:
        try:
            return self._path(sha).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(f"No blob {sha} is stored.") from None

    def read(self, sha: str, *, max_bytes: int | None = None) -> bytes:
        path = self._path(sha)
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                if max_bytes is not None and size > max_bytes:
                    raise BlobTooLarge(
                        f"Blob {sha} has {size} bytes, more than the limit of {max_bytes}."
                    )
                return f.read()
        except FileNotFoundError:
            raise BlobNotFound(f"No blob {sha} is stored.") from None

    def iter_range(
        self, sha: str, start: int = 0, stop: int | None = None, chunk: int = 1 << 16
    ) -> Iterator[bytes]:
        if chunk <= 0:
            raise ValueError(f"chunk must be positive, not {chunk}.")
        begin, end, _ = slice(start, stop).indices(self.size(sha))
        return _read_range(self._path(sha), sha, begin, end, chunk)

    def local_path(self, sha: str) -> Path:
        return self._existing(sha)


def _read_range(path: Path, sha: str, begin: int, end: int, chunk: int) -> Iterator[bytes]:
    """Yield bytes [begin, end) of the file at `path`; the file is open only while iterating."""
    if end <= begin:
        return
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise BlobNotFound(f"Blob {sha} was deleted while it was being read.") from None
    with f:
        f.seek(begin)
        remaining = end - begin
        while remaining > 0:
            data = f.read(min(chunk, remaining))
            if not data:
                raise StoreError(f"Blob {sha} is shorter than its recorded size; it is damaged.")
            remaining -= len(data)
            yield data
