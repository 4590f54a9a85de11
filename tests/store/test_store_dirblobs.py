"""DirBlobStore specifics: on-disk layout, temp files, durability recipe, crash leftovers."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from crowdtrain.store import BlobMismatch, BlobNotFound, BlobTooLarge, DirBlobStore, dirblobs


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def temp_files(root: Path) -> list[Path]:
    return sorted((root / dirblobs.TEMP_DIR).iterdir())


def test_layout_is_two_level_fanout(tmp_path: Path) -> None:
    store = DirBlobStore(tmp_path)
    blob_id = store.put_bytes(b"hello")
    path = tmp_path / blob_id[:2] / blob_id[2:]
    assert path.read_bytes() == b"hello"
    assert store.local_path(blob_id) == path
    with pytest.raises(BlobNotFound):
        store.local_path(sha(b"missing"))
    assert temp_files(tmp_path) == []


def test_failed_puts_leave_no_temp_file(tmp_path: Path) -> None:
    store = DirBlobStore(tmp_path)
    with pytest.raises(BlobTooLarge):
        store.put_stream([b"a" * 60, b"b" * 60], max_bytes=100)
    with pytest.raises(BlobMismatch):
        store.put_stream([b"abc"], max_bytes=100, expected_sha=sha(b"abd"))

    def broken() -> Iterator[bytes]:
        yield b"partial"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        store.put_stream(broken(), max_bytes=100)
    store.put_stream([b"kept"], max_bytes=100)
    store.put_stream([b"kept"], max_bytes=100)  # already stored: the temp file is dropped
    assert temp_files(tmp_path) == []
    stored = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert stored == [tmp_path / sha(b"kept")[:2] / sha(b"kept")[2:]]


def test_writes_fsync_file_and_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    store = DirBlobStore(tmp_path)
    store.put_bytes(b"durable")
    assert synced[0] == "file" and synced.count("dir") >= 1  # file first, then its directory
    synced.clear()
    store.put_bytes(b"durable")  # already stored: nothing to write
    assert synced == []
    DirBlobStore(tmp_path / "fast", fsync=False).put_bytes(b"durable")
    assert synced == []


def test_stray_temp_file_is_not_a_blob(tmp_path: Path) -> None:
    store = DirBlobStore(tmp_path)
    data = b"half-written weights"
    stray = tmp_path / dirblobs.TEMP_DIR / f"{dirblobs.TEMP_PREFIX}crash.part"
    stray.write_bytes(data)
    assert not store.has(sha(data))
    os.utime(stray, (1000.0, 1000.0))
    assert store.sweep_temp(older_than=3600.0, now=1000.0 + 60.0) == 0  # might still be uploading
    assert store.sweep_temp(older_than=3600.0, now=1000.0 + 7200.0) == 1
    assert temp_files(tmp_path) == []


CRASH_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from crowdtrain.store import DirBlobStore

    store = DirBlobStore(sys.argv[1])
    store.put_bytes(b"before the crash")
    print("committed", flush=True)

    def chunks():
        yield b"x" * 4096
        os.kill(os.getpid(), signal.SIGKILL)
        yield b"never"

    store.put_stream(chunks(), max_bytes=1 << 20)
    """
)


def test_crash_mid_upload_leaves_only_a_temp_file(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_WRITER, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.strip() == "committed"
    store = DirBlobStore(tmp_path)
    assert store.read(sha(b"before the crash")) == b"before the crash"
    assert not store.has(sha(b"x" * 4096)) and not store.has(sha(b"x" * 4096 + b"never"))
    assert len(temp_files(tmp_path)) == 1
    assert store.sweep_temp(older_than=0.0, now=float("inf")) == 1
