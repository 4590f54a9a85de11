"""SqliteStateStore specifics: pragmas, schema versioning, crash durability, shared files."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from crowdtrain.store import (
    AlreadyExists,
    PeerRow,
    SchemaVersionError,
    SqliteStateStore,
    StoreError,
)
from crowdtrain.store.schema import SCHEMA_VERSION


def make_peer(n: int) -> PeerRow:
    return PeerRow(f"p{n}", f"peer {n}", f"hash{n}", {"kind": "cpu"}, float(n), float(n))


def test_durability_pragmas(tmp_path: Path) -> None:
    with SqliteStateStore(tmp_path / "s.sqlite") as store:
        conn = store._connection()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_schema_version_row(tmp_path: Path) -> None:
    SqliteStateStore(tmp_path / "s.sqlite").close()
    with sqlite3.connect(tmp_path / "s.sqlite") as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert int(row[0]) == SCHEMA_VERSION


def _set_schema_version(path: Path, value: int) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(value),))
    conn.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    SqliteStateStore(path).close()
    _set_schema_version(path, SCHEMA_VERSION + 1)
    with pytest.raises(SchemaVersionError, match="upgrade crowdtrain"):
        SqliteStateStore(path)


def test_older_schema_without_migration_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    SqliteStateStore(path).close()
    _set_schema_version(path, 0)
    with pytest.raises(SchemaVersionError, match="cannot upgrade"):
        SqliteStateStore(path)


def test_version_1_store_is_migrated_keeping_the_first_of_each_name(tmp_path: Path) -> None:
    """A store written before unique names (schema 1) opens; namesakes it already holds stay,
    the first keeps the name, and no newcomer can take it."""
    path = tmp_path / "s.sqlite"
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        conn.execute(
            """CREATE TABLE peers (peer_id TEXT PRIMARY KEY, name TEXT NOT NULL,
            token_hash TEXT NOT NULL UNIQUE, device TEXT NOT NULL, created_at REAL NOT NULL,
            last_seen REAL NOT NULL, banned INTEGER NOT NULL, ban_reason TEXT)"""
        )
        conn.execute("CREATE TABLE contributions (id INTEGER PRIMARY KEY, blob_sha TEXT)")
        for n, name in enumerate(["vol", "Vol", "other"]):
            conn.execute(
                "INSERT INTO peers VALUES (?, ?, ?, '{}', ?, ?, 0, NULL)",
                (f"p{n}", name, f"h{n}", float(n), float(n)),
            )
    conn.close()
    with SqliteStateStore(path) as store:
        assert [p.name for p in store.list_peers()] == ["vol", "Vol", "other"]
        first = store.peer_by_name("VOL")
        assert first is not None and first.peer_id == "p0"
        with pytest.raises(AlreadyExists):
            store.add_peer(PeerRow("p9", "vol", "h9", {}, 9.0, 9.0))
        store.add_peer(PeerRow("p9", "new", "h9", {}, 9.0, 9.0, subject="idp#1"))
    with SqliteStateStore(path) as store:
        row = store.peer_by_subject("idp#1")
        assert row is not None and row.peer_id == "p9"


def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE things (x)")
    conn.close()
    with pytest.raises(SchemaVersionError, match="not a crowdtrain state store"):
        SqliteStateStore(path)


def test_non_database_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are not the tables you are looking for\n" * 100)
    with pytest.raises(StoreError, match="not an SQLite database"):
        SqliteStateStore(path)


def test_two_connections_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    with SqliteStateStore(path) as a, SqliteStateStore(path) as b:
        a.add_peer(make_peer(1))
        assert b.get_peer("p1") == make_peer(1)
        with b.transaction():
            b.put_json("k", [1])
        assert a.get_json("k") == [1]


def test_close_inside_transaction_is_refused(tmp_path: Path) -> None:
    with SqliteStateStore(tmp_path / "s.sqlite") as store:
        with store.transaction(), pytest.raises(StoreError):
            store.close()
        store.add_peer(make_peer(1))
        assert store.get_peer("p1") == make_peer(1)


CRASH_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from crowdtrain.store import ContributionRow, PeerRow, SqliteStateStore, VersionRow

    store = SqliteStateStore(sys.argv[1])
    for n in range(5):
        with store.transaction():
            store.add_peer(PeerRow(f"p{n}", f"v{n}", f"h{n}", {"kind": "cpu"}, 1.0, 1.0))
            store.record_contribution(ContributionRow(
                f"p{n}", 0, f"receipt{n}", None, 8, 64, 2, 1.5, 1.0, 99, 2.0, "accepted"))
    store.add_version(VersionRow(1, 0, "w" * 64, None, None, 3.0, {"contributors": 5}))
    store.put_json("round", 1)
    print("committed", flush=True)
    with store.transaction():
        store.put_json("round", 2)
        store.add_peer(PeerRow("late", "v", "hlate", {}, 4.0, 4.0))
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_committed_rows_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_WRITER, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.strip() == "committed"
    with SqliteStateStore(path) as store:
        assert [p.peer_id for p in store.list_peers()] == [f"p{n}" for n in range(5)]
        receipts = [c.receipt for c in store.contributions_for_round(0)]
        assert receipts == [f"receipt{n}" for n in range(5)]
        latest = store.latest_version()
        assert latest is not None and latest.metrics == {"contributors": 5}
        assert store.get_json("round") == 1  # the transaction open at the kill left nothing
        assert store.get_peer("late") is None
