"""Packing corpora into content-addressed shards: file selection, shard layout, determinism."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crowdtrain.data import (
    SEPARATOR,
    DataError,
    DataManifest,
    ShardRef,
    ensure_packed,
    list_files,
    load_manifest,
    pack_source,
    stdlib_root,
    val_indices,
)
from crowdtrain.data.sources import read_text

A = b"print('a')\n"
B = b"def b():\n    return 'b\xc3\xa9'\n"  # UTF-8 with a non-ASCII character
C = b"".join(b"# c%d\n" % i for i in range(20))
README = b"not code\n"


def make_tree(root: Path) -> Path:
    """A small source tree with files that must be skipped for each reason."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.py").write_bytes(A)
    (root / "sub" / "b.py").write_bytes(B)
    (root / "sub" / "deeper" / "c.py").write_bytes(C)
    (root / "README.txt").write_bytes(README)
    (root / "latin1.py").write_bytes(b"x = '\xe9'\n")  # not UTF-8
    (root / "nul.py").write_bytes(b"x = 1\x00\n")  # NUL byte
    (root / "empty.py").write_bytes(b"")
    (root / ".hidden" / "h.py").write_bytes(b"hidden = True\n")
    os.symlink(root / "a.py", root / "link.py")
    os.symlink(root / "sub", root / "linkdir")
    return root


def in_stream_order(manifest: DataManifest) -> list[ShardRef]:
    """The shards of a manifest in the order they were cut from the stream."""
    n = len(manifest.shards)
    held = val_indices(n, manifest.val_fraction)
    train, val = iter(manifest.train), iter(manifest.val)
    return [next(val) if i in held else next(train) for i in range(n)]


def stream_of(manifest: DataManifest, root: Path) -> bytes:
    """The packed stream, rebuilt from the shards in stream order."""
    shards = in_stream_order(manifest)
    return b"".join((root / "shards" / f"{s.sha256}.bin").read_bytes() for s in shards)


def test_pack_selects_files_and_concatenates_in_sorted_order(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    m = pack_source(src, tmp_path / "out", shard_bytes=16, val_fraction=0.0)
    assert m.files == 3
    assert m.val == ()
    # sorted relative paths: "a.py" < "sub/b.py" < "sub/deeper/c.py"
    expected = SEPARATOR.join([A, B, C])
    assert stream_of(m, tmp_path / "out") == expected
    assert m.total_bytes == len(expected)


def test_include_globs_match_file_names(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    m = pack_source(src, tmp_path / "out", include=("*.txt", "*.py"), shard_bytes=1 << 10)
    assert m.files == 4
    assert stream_of(m, tmp_path / "out") == SEPARATOR.join([README, A, B, C])
    m2 = pack_source(src, tmp_path / "out2", include=("c.*",), shard_bytes=1 << 10)
    assert stream_of(m2, tmp_path / "out2") == C


def test_shards_are_full_size_and_named_by_their_hash(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    out = tmp_path / "out"
    m = pack_source(src, out, shard_bytes=16, val_fraction=0.2)
    sizes = [s.bytes for s in in_stream_order(m)]
    assert all(size == 16 for size in sizes[:-1])
    assert 1 <= sizes[-1] <= 16
    assert sum(sizes) == m.total_bytes
    for ref in m.shards:
        data = (out / "shards" / f"{ref.sha256}.bin").read_bytes()
        assert hashlib.sha256(data).hexdigest() == ref.sha256
        assert len(data) == ref.bytes
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]


def test_train_and_val_are_disjoint_and_val_is_not_empty(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    m = pack_source(src, tmp_path / "out", shard_bytes=8, val_fraction=0.02)
    assert len(m.val) == 1
    assert not set(m.train_ids) & set(m.val_ids)
    assert len(m.train) + len(m.val) == len(set(m.train_ids + m.val_ids))


def test_manifest_round_trips(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    m = pack_source(src, tmp_path / "out", shard_bytes=32)
    assert load_manifest(tmp_path / "out") == m
    assert load_manifest(tmp_path / "out" / "manifest.json") == m
    assert DataManifest.from_json(m.to_json()) == m
    assert m.source == str(src)
    assert len(m.hash()) == 64


def test_repacking_is_byte_identical(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    m1 = pack_source(src, tmp_path / "one", shard_bytes=16)
    m2 = pack_source(src, tmp_path / "two", shard_bytes=16)
    m3 = pack_source(src, tmp_path / "one", shard_bytes=16)
    assert m1 == m2 == m3
    one = (tmp_path / "one" / "manifest.json").read_bytes()
    assert one == (tmp_path / "two" / "manifest.json").read_bytes()
    names = sorted(p.name for p in (tmp_path / "one" / "shards").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two" / "shards").iterdir())
    assert m1.hash() == m2.hash()
    assert pack_source(src, tmp_path / "three", shard_bytes=17).hash() != m1.hash()


def test_repeated_shards_are_stored_once(tmp_path: Path) -> None:
    src = tmp_path / "rep.txt"
    src.write_bytes(b"abcd" * 64)
    m = pack_source(src, tmp_path / "out", shard_bytes=8)
    assert len(m.shards) == 1
    assert m.total_bytes == 8


def test_a_single_file_source_ignores_include(tmp_path: Path) -> None:
    src = tmp_path / "corpus.md"
    src.write_bytes(C)
    m = pack_source(src, tmp_path / "out", shard_bytes=len(C))
    assert m.files == 1
    assert stream_of(m, tmp_path / "out") == C


def test_the_last_shard_keeps_the_remainder(tmp_path: Path) -> None:
    src = tmp_path / "corpus.txt"
    src.write_bytes(bytes(range(1, 101)))
    m = pack_source(src, tmp_path / "out", shard_bytes=30, val_fraction=0.0)
    assert [s.bytes for s in m.train] == [30, 30, 30, 10]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: make_tree(p / "src"), "match the include"),
    ],
)
def test_bad_sources_raise_data_error(tmp_path: Path, make: object, message: str) -> None:
    source = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(DataError, match=message):
        pack_source(source, tmp_path / "out", include=("*.rs",))


def test_a_source_that_is_not_a_file_or_directory_raises(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        pack_source(fifo, tmp_path / "out")


def test_unreadable_files_are_skipped(tmp_path: Path) -> None:
    assert read_text(tmp_path) is None  # reading a directory fails: skipped, not an error
    assert read_text(tmp_path / "missing.py") is None


def test_a_corpus_without_text_raises(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "bad.py").write_bytes(b"\xff\xfe")
    (src / "empty.py").write_bytes(b"")
    with pytest.raises(DataError, match="no usable text"):
        pack_source(src, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_an_unwritable_out_dir_raises(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match="cannot create data directory"):
        pack_source(src, blocker / "out")


@pytest.mark.parametrize(
    "kwargs", [{"shard_bytes": 0}, {"val_fraction": 1.0}, {"val_fraction": -0.1}, {"include": ()}]
)
def test_bad_parameters_raise(tmp_path: Path, kwargs: dict[str, object]) -> None:
    src = make_tree(tmp_path / "src")
    with pytest.raises(DataError):
        pack_source(src, tmp_path / "out", **kwargs)  # type: ignore[arg-type]


def test_ensure_packed_reuses_a_matching_pack(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    out = tmp_path / "out"
    m = ensure_packed(src, out, shard_bytes=16)
    manifest_file = out / "manifest.json"
    os.utime(manifest_file, (1, 1))
    assert ensure_packed(src, out, shard_bytes=16) == m
    assert manifest_file.stat().st_mtime == 1  # not rewritten

    m2 = ensure_packed(src, out, shard_bytes=32)  # parameters changed: re-pack
    assert m2.shard_bytes == 32
    assert load_manifest(out) == m2

    (out / "shards" / f"{m2.train_ids[0]}.bin").unlink()  # a shard went missing: re-pack
    assert ensure_packed(src, out, shard_bytes=32) == m2
    assert (out / "shards" / f"{m2.train_ids[0]}.bin").exists()

    manifest_file.write_text("{")  # a broken manifest: re-pack
    assert ensure_packed(src, out, shard_bytes=32) == m2


def test_progress_reports_input_bytes(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    seen: list[tuple[int, int]] = []
    pack_source(src, tmp_path / "out", progress=lambda d, t: seen.append((d, t)))
    assert seen
    assert seen[-1][0] == seen[-1][1]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_stdlib_lists_the_standard_library_only() -> None:
    files = list_files("stdlib", ("*.py",))
    root = stdlib_root()
    rel = {f.path.relative_to(root).as_posix() for f in files}
    assert "os.py" in rel
    assert "json/decoder.py" in rel
    for r in rel:
        parts = r.split("/")
        assert not {"site-packages", "dist-packages", "__pycache__", "test", "tests"} & set(parts)
        assert not parts[0].startswith("config-")
        assert not r.startswith("_sysconfigdata_")


def test_stdlib_packs(tmp_path: Path) -> None:
    m = pack_source("stdlib", tmp_path / "out", shard_bytes=1 << 22)
    assert m.source == "stdlib"
    assert m.files > 100
    assert m.total_bytes > 1 << 20
    assert len(m.val) >= 1


@given(n=st.integers(0, 5000), frac=st.floats(0.0, 0.999))
def test_val_indices_are_a_spread_proper_subset(n: int, frac: float) -> None:
    idx = val_indices(n, frac)
    assert idx == sorted(set(idx))
    assert all(0 <= i < n for i in idx)
    if n >= 2 and frac > 0:
        assert 1 <= len(idx) <= n - 1
        assert abs(len(idx) - n * frac) <= 1 or len(idx) in (1, n - 1)
    else:
        assert idx == []
