"""The data manifest: which content-addressed shards make up a packed corpus, and its hash.

A packed corpus is a directory holding `manifest.json` and `shards/<sha256>.bin`. The manifest
lists the training and validation shards by the sha256 of their bytes, so the run manifest can
pin the exact data by one hash (`DataManifest.hash()`, sha256 of canonical JSON), and a volunteer
can check every shard it downloads. Content addressing as in Git and IPFS; the split into
fixed-size shards follows the data-parallel setup of DiLoCo (Douillard et al. 2023,
arXiv:2311.08105), where each worker trains on its own shards of the corpus.

`load_manifest` parses strictly: unknown or missing keys, wrong types, malformed hashes,
duplicated shards and inconsistent sizes are all rejected with one sentence (`DataError`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowdtrain import strictjson
from crowdtrain.config import canonical_json

FORMAT = "crowdtrain-data"
VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
MAX_MANIFEST_BYTES = 64 << 20

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_KEYS = frozenset(
    {
        "format",
        "version",
        "source",
        "include",
        "shard_bytes",
        "val_fraction",
        "train",
        "val",
        "total_bytes",
        "files",
    }
)
_SHARD_KEYS = frozenset({"sha256", "bytes"})


class DataError(ValueError):
    """A corpus, shard or manifest is unusable; the message is one sentence for a person."""


def is_shard_id(value: object) -> bool:
    """Whether VALUE is a well-formed shard id (64 lowercase hex digits of a sha256)."""
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


@dataclass(frozen=True)
class ShardRef:
    """One shard: the sha256 (hex) of its bytes, and its length in bytes."""

    sha256: str
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class DataManifest:
    """A packed corpus: its source, packing parameters and train/validation shards.

    `source` is stored exactly as given to `pack_source` (never resolved to an absolute path),
    so packing the same source with the same parameters gives a byte-identical manifest.
    """

    source: str
    include: tuple[str, ...]
    shard_bytes: int
    val_fraction: float
    train: tuple[ShardRef, ...]
    val: tuple[ShardRef, ...]
    total_bytes: int
    files: int

    @property
    def train_ids(self) -> list[str]:
        return [s.sha256 for s in self.train]

    @property
    def val_ids(self) -> list[str]:
        return [s.sha256 for s in self.val]

    @property
    def shards(self) -> tuple[ShardRef, ...]:
        """All shards, training first."""
        return self.train + self.val

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "source": self.source,
            "include": list(self.include),
            "shard_bytes": self.shard_bytes,
            "val_fraction": self.val_fraction,
            "train": [s.to_json() for s in self.train],
            "val": [s.to_json() for s in self.val],
            "total_bytes": self.total_bytes,
            "files": self.files,
        }

    def to_bytes(self) -> bytes:
        """The manifest file's bytes (sorted keys, indented, trailing newline; deterministic)."""
        return (json.dumps(self.to_json(), sort_keys=True, indent=1) + "\n").encode()

    def hash(self) -> str:
        """sha256 hex of the manifest's canonical JSON: pins the data of a run."""
        return hashlib.sha256(canonical_json(self.to_json())).hexdigest()

    @classmethod
    def from_json(cls, obj: object) -> DataManifest:
        """Validate a parsed manifest strictly; raise DataError naming the first problem."""
        return _parse(obj)


def _int(obj: Mapping[str, Any], key: str, lo: int) -> int:
    value = obj[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise DataError(f"'{key}' must be an integer of at least {lo}, not {value!r}")
    return value


def _shards(obj: Mapping[str, Any], key: str, shard_bytes: int) -> tuple[ShardRef, ...]:
    items = obj[key]
    if not isinstance(items, list):
        raise DataError(f"'{key}' must be a list of shards")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != _SHARD_KEYS:
            raise DataError(f"'{key}[{i}]' must be an object with keys 'sha256' and 'bytes'")
        if not is_shard_id(item["sha256"]):
            raise DataError(f"'{key}[{i}].sha256' is not 64 lowercase hex digits")
        size = item["bytes"]
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= shard_bytes:
            raise DataError(f"'{key}[{i}].bytes' must be an integer from 1 to {shard_bytes}")
        out.append(ShardRef(item["sha256"], size))
    return tuple(out)


def _parse(obj: object) -> DataManifest:
    if not isinstance(obj, dict):
        raise DataError("the top level must be a JSON object")
    if set(obj) != _KEYS:
        missing, extra = sorted(_KEYS - set(obj)), sorted(set(obj) - _KEYS)
        what = f"missing keys {missing}" if missing else f"unknown keys {extra}"
        raise DataError(f"it has {what}")
    if obj["format"] != FORMAT:
        raise DataError(f"'format' is {obj['format']!r}, not {FORMAT!r}")
    if type(obj["version"]) is not int or obj["version"] != VERSION:
        raise DataError(f"'version' is {obj['version']!r}; this crowdtrain reads version {VERSION}")
    source = obj["source"]
    if not isinstance(source, str) or not source:
        raise DataError("'source' must be a non-empty string")
    include = obj["include"]
    if (
        not isinstance(include, list)
        or not include
        or not all(isinstance(g, str) and g for g in include)
    ):
        raise DataError("'include' must be a non-empty list of non-empty strings")
    shard_bytes = _int(obj, "shard_bytes", 1)
    val_fraction = obj["val_fraction"]
    if (
        not isinstance(val_fraction, int | float)
        or isinstance(val_fraction, bool)
        or not math.isfinite(val_fraction)
        or not 0.0 <= val_fraction < 1.0
    ):
        raise DataError("'val_fraction' must be a number from 0 up to (not including) 1")
    train = _shards(obj, "train", shard_bytes)
    val = _shards(obj, "val", shard_bytes)
    if not train:
        raise DataError("'train' lists no shards")
    ids = [s.sha256 for s in train + val]
    if len(set(ids)) != len(ids):
        raise DataError("a shard is listed twice (within or across 'train' and 'val')")
    if sum(s.bytes < shard_bytes for s in train + val) > 1:
        raise DataError("more than one shard is shorter than 'shard_bytes'")
    total = _int(obj, "total_bytes", 1)
    if total != sum(s.bytes for s in train + val):
        raise DataError("'total_bytes' is not the sum of the shard sizes")
    files = _int(obj, "files", 1)
    return DataManifest(
        source=source,
        include=tuple(include),
        shard_bytes=shard_bytes,
        val_fraction=float(val_fraction),
        train=train,
        val=val,
        total_bytes=total,
        files=files,
    )


def manifest_path(data_dir: str | Path) -> Path:
    """The manifest file of a packed corpus directory (or DATA_DIR itself if it is a file)."""
    p = Path(data_dir)
    return p if p.is_file() else p / MANIFEST_NAME


def parse_manifest(raw: bytes, where: str = "the data manifest") -> DataManifest:
    """Parse and validate manifest bytes; raise DataError naming WHERE and the problem."""
    try:
        if len(raw) > MAX_MANIFEST_BYTES:
            raise DataError(f"it is larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            obj = strictjson.loads(raw)
        except strictjson.StrictJsonError as exc:
            raise DataError(str(exc)) from None
        return _parse(obj)
    except DataError as exc:
        raise DataError(f"{where} is invalid: {exc}") from None


def load_manifest(data_dir: str | Path) -> DataManifest:
    """Load and strictly validate `DATA_DIR/manifest.json` (DATA_DIR may be the file itself)."""
    path = manifest_path(data_dir)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise DataError(
            f"no data manifest at {path}; pack a corpus first with `crowdtrain data`"
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read data manifest {path}: {exc.strerror}") from None
    return parse_manifest(raw, f"data manifest {path}")
