"""Pack a text corpus into fixed-size, content-addressed shards and a data manifest.

The files of a source (see `sources.py`) are read as bytes, in a fixed order, and concatenated
with a NUL byte between consecutive files into one byte stream (byte-level tokens, vocabulary
256). The stream is cut into shards of exactly `shard_bytes` bytes; the last shard holds the
remainder and is kept however short, so no text is dropped (the sampler skips shards too short
for a window). Each shard is stored as `shards/<sha256>.bin`; a shard whose bytes repeat an
earlier one is stored and listed once. A deterministic, evenly spaced subset of about
`val_fraction` of the shards (at least one when there are two or more) is held out for
validation; no shard is in both splits.

Packing is streamed (one file and at most one shard in memory) and deterministic: the same
source and parameters give byte-identical shards and manifest, so anyone can re-pack a corpus
and check it against the hash a run pins. The data-parallel sharding follows DiLoCo
(Douillard et al. 2023, arXiv:2311.08105).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from crowdtrain.config import DataConfig
from crowdtrain.data.atomic import atomic_write_bytes, fsync_dir
from crowdtrain.data.manifest import (
    MANIFEST_NAME,
    DataError,
    DataManifest,
    ShardRef,
    load_manifest,
)
from crowdtrain.data.shards import ShardStore
from crowdtrain.data.sources import list_files, read_text

log = logging.getLogger(__name__)

SEPARATOR = b"\x00"
"""Between two files in the packed stream (text files never contain NUL)."""

Progress = Callable[[int, int], None]
"""Called as progress(bytes_read, bytes_total) over the matched files while packing."""


def val_indices(n_shards: int, val_fraction: float) -> list[int]:
    """Which of N_SHARDS shards (by stream position) are held out for validation.

    About VAL_FRACTION of them, at least one when there are two or more (and with a positive
    fraction), never all; evenly spaced so that validation covers the whole corpus.
    """
    if n_shards < 2 or val_fraction <= 0.0:
        return []
    n_val = min(n_shards - 1, max(1, math.floor(n_shards * val_fraction + 0.5)))
    return [(2 * j + 1) * n_shards // (2 * n_val) for j in range(n_val)]


def _check_params(shard_bytes: int, val_fraction: float) -> None:
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise DataError(f"shard_bytes must be a positive integer, not {shard_bytes!r}")
    if not (isinstance(val_fraction, int | float) and 0.0 <= val_fraction < 1.0):
        raise DataError(f"val_fraction must be from 0 up to (not including) 1, not {val_fraction}")


def pack_source(
    source: str | Path,
    out_dir: str | Path,
    *,
    include: Sequence[str] = ("*.py",),
    shard_bytes: int = 1 << 20,
    val_fraction: float = 0.02,
    progress: Progress | None = None,
) -> DataManifest:
    """Pack SOURCE (a file, a directory or "stdlib") into OUT_DIR and return its manifest.

    Writes `OUT_DIR/shards/<sha256>.bin` and then `OUT_DIR/manifest.json`, each atomically.
    Files that are unreadable, not UTF-8 or contain NUL bytes are skipped, as are empty ones.
    Raises DataError (one sentence) for a missing source, no matching files, an unwritable
    OUT_DIR, or a corpus with no usable text.
    """
    _check_params(shard_bytes, val_fraction)
    include = tuple(include)
    files = list_files(source, include)
    out = Path(out_dir)
    store = ShardStore(out)
    try:
        store.dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create data directory {out}: {exc.strerror}") from None

    refs: dict[str, ShardRef] = {}

    def emit(chunk: bytes) -> None:
        sha = store.put(chunk)
        refs.setdefault(sha, ShardRef(sha, len(chunk)))

    total_in = sum(f.size for f in files)
    done_in = used = skipped = 0
    buf = bytearray()
    for f in files:
        data = read_text(f.path)
        done_in += f.size
        if data is None:
            skipped += 1
        elif data:
            if used:
                buf += SEPARATOR
            buf += data
            used += 1
            while len(buf) >= shard_bytes:
                emit(bytes(buf[:shard_bytes]))
                del buf[:shard_bytes]
        if progress is not None:
            progress(done_in, total_in)
    if buf:
        emit(bytes(buf))
    if not refs:
        raise DataError(
            f"data source {str(source)!r} has no usable text: each of the {len(files)} matching "
            "files is empty, unreadable, not UTF-8 or contains NUL bytes"
        )
    if skipped:
        log.info(
            "skipped %d of %d files (unreadable, not UTF-8 or with NUL bytes)", skipped, len(files)
        )

    shards = list(refs.values())
    held_out = set(val_indices(len(shards), val_fraction))
    manifest = DataManifest(
        source=str(source),
        include=include,
        shard_bytes=shard_bytes,
        val_fraction=float(val_fraction),
        train=tuple(s for i, s in enumerate(shards) if i not in held_out),
        val=tuple(s for i, s in enumerate(shards) if i in held_out),
        total_bytes=sum(s.bytes for s in shards),
        files=used,
    )
    try:
        fsync_dir(store.dir)
        atomic_write_bytes(out / MANIFEST_NAME, manifest.to_bytes())
        fsync_dir(out)
    except OSError as exc:
        raise DataError(f"cannot write the data manifest in {out}: {exc.strerror}") from None
    return manifest


def ensure_packed(
    source: str | Path,
    out_dir: str | Path,
    *,
    include: Sequence[str] = ("*.py",),
    shard_bytes: int = 1 << 20,
    val_fraction: float = 0.02,
    progress: Progress | None = None,
) -> DataManifest:
    """The manifest in OUT_DIR if it was packed from SOURCE with these parameters, else pack.

    An existing manifest is reused when it is valid, its source and parameters match, and every
    shard it lists is present with the right size (contents are checked when loaded). A change
    to the files of a source directory is not detected: delete OUT_DIR to re-pack.
    """
    _check_params(shard_bytes, val_fraction)
    try:
        old = load_manifest(Path(out_dir) / MANIFEST_NAME)
    except DataError:
        old = None
    if old is not None:
        store = ShardStore(out_dir)
        if (
            old.source == str(source)
            and old.include == tuple(include)
            and old.shard_bytes == shard_bytes
            and old.val_fraction == float(val_fraction)
            and all(store.has(s.sha256, s.bytes) for s in old.shards)
        ):
            return old
    return pack_source(
        source,
        out_dir,
        include=include,
        shard_bytes=shard_bytes,
        val_fraction=val_fraction,
        progress=progress,
    )


def ensure_packed_for(data: DataConfig) -> DataManifest:
    """`ensure_packed` with the source, directory and parameters of a run's data config."""
    return ensure_packed(
        data.source,
        data.dir,
        include=data.include,
        shard_bytes=data.shard_bytes,
        val_fraction=data.val_fraction,
    )
