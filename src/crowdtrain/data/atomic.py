"""Atomic file writes: a reader sees the old file or the whole new one, never a torn write.

The write goes to a temporary file in the same directory, is flushed and fsync'ed, and then
renamed over the target with `os.replace` (atomic on POSIX and Windows). Used for data shards
and manifests so that a crash mid-pack never leaves a half-written shard under its hash name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes | bytearray | memoryview) -> None:
    """Write DATA to PATH atomically (temp file + flush + fsync + os.replace).

    The file is created by `tempfile.mkstemp`, so it is readable by its owner only (0600).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def fsync_dir(path: Path) -> None:
    """Make renames inside directory PATH durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
