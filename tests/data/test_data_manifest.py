"""Strict parsing of data manifests and the shard store's integrity checks."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from crowdtrain.data import (
    DataError,
    DataManifest,
    ShardRef,
    ShardStore,
    load_manifest,
    pack_source,
    parse_manifest,
    shard_id,
)

H1, H2, H3 = (shard_id(bytes([i]) * 8) for i in range(3))


def good() -> dict[str, Any]:
    return DataManifest(
        source="corpus",
        include=("*.py",),
        shard_bytes=8,
        val_fraction=0.25,
        train=(ShardRef(H1, 8), ShardRef(H2, 3)),
        val=(ShardRef(H3, 8),),
        total_bytes=19,
        files=2,
    ).to_json()


def test_a_good_manifest_parses_and_hashes_canonically() -> None:
    raw = good()
    m = DataManifest.from_json(raw)
    assert m.to_json() == raw
    assert m.train_ids == [H1, H2]
    assert m.val_ids == [H3]
    reordered = json.dumps(dict(reversed(list(raw.items())))).encode()
    assert parse_manifest(reordered).hash() == m.hash()


Mutation = Callable[[dict[str, Any]], object]

MUTATIONS: dict[str, Mutation] = {
    "extra key": lambda d: d.update(extra=1),
    "missing key": lambda d: d.pop("files"),
    "wrong format": lambda d: d.update(format="other"),
    "version as text": lambda d: d.update(version="1"),
    "version as bool": lambda d: d.update(version=True),
    "future version": lambda d: d.update(version=2),
    "empty source": lambda d: d.update(source=""),
    "include not a list": lambda d: d.update(include="*.py"),
    "shard_bytes zero": lambda d: d.update(shard_bytes=0),
    "shard_bytes float": lambda d: d.update(shard_bytes=8.0),
    "val_fraction one": lambda d: d.update(val_fraction=1.0),
    "val_fraction bool": lambda d: d.update(val_fraction=False),
    "uppercase sha": lambda d: d["train"][0].update(sha256=H1.upper()),
    "short sha": lambda d: d["train"][0].update(sha256=H1[:-1]),
    "path in sha": lambda d: d["train"][0].update(sha256="../" + H1[3:]),
    "zero bytes": lambda d: d["train"][0].update(bytes=0),
    "too many bytes": lambda d: d["train"][0].update(bytes=9),
    "extra shard key": lambda d: d["train"][0].update(path="x"),
    "shard in both splits": lambda d: d["val"][0].update(sha256=H1),
    "two short shards": lambda d: d["val"][0].update(bytes=7),
    "no train shards": lambda d: d.update(train=[], total_bytes=8),
    "wrong total": lambda d: d.update(total_bytes=20),
    "zero files": lambda d: d.update(files=0),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_bad_manifests_are_rejected(name: str) -> None:
    raw = copy.deepcopy(good())
    MUTATIONS[name](raw)
    with pytest.raises(DataError, match="is invalid"):
        parse_manifest(json.dumps(raw).encode())


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"[]",
        b"\xff",
        b'{"format": "crowdtrain-data", "format": "crowdtrain-data"}',
        json.dumps(good()).replace("0.25", "NaN").encode(),
    ],
)
def test_bad_json_is_rejected(text: bytes) -> None:
    with pytest.raises(DataError, match="is invalid"):
        parse_manifest(text)


def test_load_manifest_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no data manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match=r"manifest\.json is invalid"):
        load_manifest(tmp_path)


def test_store_loads_verified_and_memory_mapped_shards(tmp_path: Path) -> None:
    store = ShardStore(tmp_path)
    data = bytes(range(256)) * 3
    sha = store.put(data)
    assert sha == shard_id(data)
    assert store.path(sha) == tmp_path / "shards" / f"{sha}.bin"
    assert store.has(sha) and store.has(sha, len(data)) and not store.has(sha, 1)
    for verify in (True, False):
        arr = store.load(sha, verify=verify)
        assert arr.dtype == np.uint8
        assert arr.tobytes() == data
    assert store.put(data, expected=sha) == sha
    assert set(store.load_many([sha, sha])) == {sha}


def test_store_rejects_corrupt_missing_and_malformed_shards(tmp_path: Path) -> None:
    store = ShardStore(tmp_path)
    sha = store.put(b"hello shard")
    store.path(sha).write_bytes(b"hellO shard")
    with pytest.raises(DataError, match="corrupt"):
        store.load(sha)
    assert store.load(sha, verify=False).tobytes() == b"hellO shard"  # trusted, not checked
    with pytest.raises(DataError, match="missing"):
        store.load(H1)
    with pytest.raises(DataError, match="not a shard id"):
        store.path("../../etc/passwd")
    with pytest.raises(DataError, match="wrong content"):
        store.put(b"other", expected=sha)
    store.put(b"hello shard")  # repairs the corrupt copy
    assert store.load(sha).tobytes() == b"hello shard"


def test_packed_shards_load_back(tmp_path: Path) -> None:
    src = tmp_path / "c.txt"
    src.write_bytes(bytes(range(1, 128)) * 2)
    m = pack_source(src, tmp_path / "out", shard_bytes=64)
    store = ShardStore(tmp_path / "out")
    loaded = store.load_many(m.train_ids + m.val_ids)
    assert sum(len(a) for a in loaded.values()) == m.total_bytes
