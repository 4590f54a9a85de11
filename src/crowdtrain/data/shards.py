"""Content-addressed shard storage: `DIR/shards/<sha256>.bin`, read back as uint8 arrays.

A shard's id is the sha256 of its bytes, so any copy (packed locally or downloaded from the
coordinator) can be checked against the manifest before a single byte is trained on, the way
Git and IPFS address objects by content. Shards are raw bytes: the byte-level vocabulary of 256
tokens needs no tokenizer on the volunteer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from crowdtrain.data.atomic import atomic_write_bytes
from crowdtrain.data.manifest import SHARDS_DIR, DataError, is_shard_id

Shard = npt.NDArray[np.uint8]


def shard_id(data: bytes | bytearray | memoryview) -> str:
    """The id of a shard: sha256 hex of its bytes."""
    return hashlib.sha256(data).hexdigest()


class ShardStore:
    """The shards of one packed corpus directory (`DIR/shards/<sha256>.bin`)."""

    def __init__(self, data_dir: str | Path) -> None:
        self.root = Path(data_dir)
        self.dir = self.root / SHARDS_DIR

    def path(self, sha: str) -> Path:
        """Where shard SHA lives; SHA must be a well-formed id (this also blocks path tricks)."""
        if not is_shard_id(sha):
            raise DataError(f"{sha!r} is not a shard id (64 lowercase hex digits)")
        return self.dir / f"{sha}.bin"

    def has(self, sha: str, size: int | None = None) -> bool:
        """Whether shard SHA is present (and, if SIZE is given, has that many bytes)."""
        try:
            st = self.path(sha).stat()
        except OSError:
            return False
        return size is None or st.st_size == size

    def put(self, data: bytes | bytearray | memoryview, expected: str | None = None) -> str:
        """Store DATA atomically under its sha256 and return the id.

        With EXPECTED (e.g. a downloaded shard), raise DataError if the bytes do not hash to it.
        A shard already present with the right content is not rewritten.
        """
        sha = shard_id(data)
        if expected is not None and sha != expected:
            raise DataError(f"shard {expected} has wrong content (its bytes hash to {sha})")
        if not data:
            raise DataError("a shard cannot be empty")
        path = self.path(sha)
        if self.has(sha, len(data)) and shard_id(path.read_bytes()) == sha:
            return sha
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
        except OSError as exc:
            raise DataError(f"cannot write shard to {self.dir}: {exc.strerror}") from None
        return sha

    def load(self, sha: str, verify: bool = True) -> Shard:
        """Shard SHA as a read-only 1-D uint8 array.

        With VERIFY, the bytes are read into memory and their sha256 checked (DataError on
        mismatch); without it, the file is memory-mapped and trusted.
        """
        path = self.path(sha)
        try:
            if verify:
                data = path.read_bytes()
            elif path.stat().st_size == 0:
                data = b""
            else:
                return np.memmap(path, dtype=np.uint8, mode="r")
        except FileNotFoundError:
            raise DataError(f"shard {sha} is missing from {self.dir}") from None
        except OSError as exc:
            raise DataError(f"cannot read shard {path}: {exc.strerror}") from None
        if not data:
            raise DataError(f"shard file {path} is empty")
        if verify and shard_id(data) != sha:
            raise DataError(f"shard file {path} is corrupt (its bytes do not hash to its name)")
        return np.frombuffer(data, dtype=np.uint8)

    def load_many(self, shas: Iterable[str], verify: bool = True) -> dict[str, Shard]:
        """Several shards by id, as a mapping ready for `BatchSampler`."""
        return {sha: self.load(sha, verify=verify) for sha in dict.fromkeys(shas)}
