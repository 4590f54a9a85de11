"""`SqliteStateStore`: the state store in one SQLite file, durable at every commit.

The file runs in WAL mode with ``synchronous=FULL``, so a transaction that has committed survives
a process crash or power loss (the WAL is fsynced at each commit); that is what lets a receipt
promise durability. Foreign keys are on. One connection serves all threads, guarded by a
re-entrant lock that a `transaction()` holds from BEGIN to COMMIT; nested transactions are
savepoints. Write transactions start with BEGIN IMMEDIATE so two processes sharing the file
queue on the write lock (``busy_timeout``) instead of failing halfway through.
No paper is implemented here; see the SQLite documentation on WAL and `PRAGMA synchronous`.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crowdtrain.faults import crash_point
from crowdtrain.store.errors import AlreadyExists, PeerNotFound, SchemaVersionError, StoreError
from crowdtrain.store.schema import MIGRATIONS, SCHEMA_VERSION, TABLES
from crowdtrain.store.state import (
    ContributionRow,
    ContributionStatus,
    PeerRow,
    VersionRow,
    name_key,
)

log = logging.getLogger(__name__)

_PEER_COLUMNS = (
    "peer_id, name, token_hash, device, created_at, last_seen, banned, ban_reason, subject"
)
_CONTRIBUTION_COLUMNS = (
    "peer_id, round, receipt, blob_sha, samples, tokens, steps, train_loss, weight, "
    "payload_bytes, received_at, status, reason"
)
_VERSION_COLUMNS = "version, round, weights_sha, optimizer_sha, aggregate_sha, created_at, metrics"
_UNIQUE_ERRORS = ("SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY")


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _float_or_nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _peer(row: Sequence[Any]) -> PeerRow:
    return PeerRow(
        peer_id=row[0],
        name=row[1],
        token_hash=row[2],
        device=json.loads(row[3]),
        created_at=row[4],
        last_seen=row[5],
        banned=bool(row[6]),
        ban_reason=row[7],
        subject=row[8],
    )


def _contribution(row: Sequence[Any]) -> ContributionRow:
    return ContributionRow(
        peer_id=row[0],
        round=row[1],
        receipt=row[2],
        blob_sha=row[3],
        samples=row[4],
        tokens=row[5],
        steps=row[6],
        train_loss=_float_or_nan(row[7]),
        weight=_float_or_nan(row[8]),
        payload_bytes=row[9],
        received_at=row[10],
        status=row[11],
        reason=row[12],
    )


def _version(row: Sequence[Any]) -> VersionRow:
    return VersionRow(
        version=row[0],
        round=row[1],
        weights_sha=row[2],
        optimizer_sha=row[3],
        aggregate_sha=row[4],
        created_at=row[5],
        metrics=json.loads(row[6]),
    )


class SqliteStateStore:
    """A `StateStore` in the SQLite file at `path` (created, with its schema, if missing).

    `busy_timeout` is how many seconds a write waits for another process holding the file's
    write lock before it fails.
    """

    def __init__(self, path: str | Path, *, busy_timeout: float = 10.0) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._depth = 0
        self._conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"Cannot open the state store at {self.path}: {exc}.") from None
        self._conn = conn
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("state store %s runs in journal mode %s, not WAL", self.path, mode)
            conn.execute("PRAGMA synchronous = FULL")
            self._prepare_schema()
        except sqlite3.DatabaseError:
            self.close()
            raise StoreError(
                f"{self.path} is not a crowdtrain state store (not an SQLite database); "
                "point the coordinator at a new path or at its own state file."
            ) from None
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"SqliteStateStore({str(self.path)!r})"

    def __enter__(self) -> SqliteStateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"The state store at {self.path} is closed.")
        return self._conn

    def _prepare_schema(self) -> None:
        conn = self._connection()
        with self.transaction():
            tables = {
                row[0]
                for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            tables.discard("sqlite_sequence")
            if not tables:
                for statement in TABLES:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                return
            found = None
            if "meta" in tables:
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                found = int(row[0]) if row is not None else None
            if found is None:
                raise SchemaVersionError(
                    f"{self.path} is an SQLite database but not a crowdtrain state store; "
                    "point the coordinator at a new path."
                )
            if found > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"The state store at {self.path} has schema version {found}, newer than the "
                    f"version {SCHEMA_VERSION} this crowdtrain understands; upgrade crowdtrain."
                )
            for step in range(found, SCHEMA_VERSION):
                if step not in MIGRATIONS:
                    raise SchemaVersionError(
                        f"The state store at {self.path} has schema version {found}, which this "
                        f"crowdtrain cannot upgrade to version {SCHEMA_VERSION}."
                    )
                for statement in MIGRATIONS[step]:
                    conn.execute(statement)
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
            )

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            conn = self._connection()
            depth = self._depth
            savepoint = f"crowdtrain_{depth}"
            conn.execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT {savepoint}")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth = depth
                if depth == 0:
                    conn.execute("ROLLBACK")
                else:
                    conn.execute(f"ROLLBACK TO {savepoint}")
                    conn.execute(f"RELEASE {savepoint}")
                raise
            self._depth = depth
            if depth > 0:
                conn.execute(f"RELEASE {savepoint}")
                return
            crash_point("sqlite.before_commit")
            try:
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            crash_point("sqlite.after_commit")

    def _write(self, sql: str, params: Sequence[Any], what: str) -> int:
        """Run one write statement in its own (or the caller's) transaction; return rowcount.
        `what` names the row in the error raised when a unique key is taken."""
        with self.transaction():
            try:
                return self._connection().execute(sql, params).rowcount
            except sqlite3.IntegrityError as exc:
                name = getattr(exc, "sqlite_errorname", "")
                if name in _UNIQUE_ERRORS:
                    raise AlreadyExists(f"{what} is already stored.") from None
                if name == "SQLITE_CONSTRAINT_FOREIGNKEY":
                    raise PeerNotFound(f"{what} names a peer that was never added.") from None
                raise ValueError(f"{what} has a value the store refuses ({exc}).") from None

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._connection().execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            if self._depth > 0:
                raise StoreError("Cannot close the state store inside a transaction.")
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # --- peers ---------------------------------------------------------------------------------

    def add_peer(self, peer: PeerRow) -> None:
        self._write(
            f"INSERT INTO peers ({_PEER_COLUMNS}, name_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                peer.peer_id,
                peer.name,
                peer.token_hash,
                _dumps(peer.device),
                peer.created_at,
                peer.last_seen,
                int(peer.banned),
                peer.ban_reason,
                peer.subject,
                name_key(peer.name),
            ),
            f"A peer with id {peer.peer_id!r}, the same token, name or subject",
        )

    def get_peer(self, peer_id: str) -> PeerRow | None:
        rows = self._read(f"SELECT {_PEER_COLUMNS} FROM peers WHERE peer_id = ?", (peer_id,))
        return _peer(rows[0]) if rows else None

    def peer_by_token_hash(self, token_hash: str) -> PeerRow | None:
        rows = self._read(f"SELECT {_PEER_COLUMNS} FROM peers WHERE token_hash = ?", (token_hash,))
        return _peer(rows[0]) if rows else None

    def peer_by_name(self, name: str) -> PeerRow | None:
        rows = self._read(
            f"SELECT {_PEER_COLUMNS} FROM peers WHERE name_key = ?", (name_key(name),)
        )
        return _peer(rows[0]) if rows else None

    def peer_by_subject(self, subject: str) -> PeerRow | None:
        rows = self._read(f"SELECT {_PEER_COLUMNS} FROM peers WHERE subject = ?", (subject,))
        return _peer(rows[0]) if rows else None

    def replace_token(self, peer_id: str, token_hash: str) -> None:
        changed = self._write(
            "UPDATE peers SET token_hash = ? WHERE peer_id = ?",
            (token_hash, peer_id),
            "The new token",
        )
        if changed == 0:
            raise PeerNotFound(f"No peer {peer_id!r} is registered.")

    def touch_peer(self, peer_id: str, now: float) -> None:
        changed = self._write(
            "UPDATE peers SET last_seen = MAX(last_seen, ?) WHERE peer_id = ?",
            (now, peer_id),
            f"Peer {peer_id!r}",
        )
        if changed == 0:
            raise PeerNotFound(f"No peer {peer_id!r} is registered.")

    def set_banned(self, peer_id: str, banned: bool, reason: str | None) -> None:
        changed = self._write(
            "UPDATE peers SET banned = ?, ban_reason = ? WHERE peer_id = ?",
            (int(banned), reason, peer_id),
            f"Peer {peer_id!r}",
        )
        if changed == 0:
            raise PeerNotFound(f"No peer {peer_id!r} is registered.")

    def list_peers(self) -> list[PeerRow]:
        rows = self._read(f"SELECT {_PEER_COLUMNS} FROM peers ORDER BY created_at, peer_id")
        return [_peer(row) for row in rows]

    # --- contributions -------------------------------------------------------------------------

    def record_contribution(self, row: ContributionRow) -> None:
        self._write(
            f"INSERT INTO contributions ({_CONTRIBUTION_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.peer_id,
                row.round,
                row.receipt,
                row.blob_sha,
                row.samples,
                row.tokens,
                row.steps,
                row.train_loss,
                row.weight,
                row.payload_bytes,
                row.received_at,
                row.status,
                row.reason,
            ),
            f"An accepted contribution of peer {row.peer_id!r} for round {row.round}",
        )

    def blob_accepted(self, sha: str) -> bool:
        rows = self._read(
            "SELECT 1 FROM contributions WHERE blob_sha = ? AND status = 'accepted' LIMIT 1",
            (sha,),
        )
        return bool(rows)

    def blob_authors(self, sha: str) -> set[str]:
        rows = self._read("SELECT DISTINCT peer_id FROM contributions WHERE blob_sha = ?", (sha,))
        return {str(row[0]) for row in rows}

    def get_contribution(self, peer_id: str, round: int) -> ContributionRow | None:
        rows = self._read(
            f"SELECT {_CONTRIBUTION_COLUMNS} FROM contributions WHERE peer_id = ? AND round = ? "
            "ORDER BY status = 'accepted' DESC, id DESC LIMIT 1",
            (peer_id, round),
        )
        return _contribution(rows[0]) if rows else None

    def contributions_for_round(
        self, round: int, *, status: ContributionStatus | None = None
    ) -> list[ContributionRow]:
        if status is None:
            rows = self._read(
                f"SELECT {_CONTRIBUTION_COLUMNS} FROM contributions WHERE round = ? ORDER BY id",
                (round,),
            )
        else:
            rows = self._read(
                f"SELECT {_CONTRIBUTION_COLUMNS} FROM contributions "
                "WHERE round = ? AND status = ? ORDER BY id",
                (round, status),
            )
        return [_contribution(row) for row in rows]

    # --- model versions ------------------------------------------------------------------------

    def add_version(self, row: VersionRow) -> None:
        self._write(
            f"INSERT INTO versions ({_VERSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                row.version,
                row.round,
                row.weights_sha,
                row.optimizer_sha,
                row.aggregate_sha,
                row.created_at,
                _dumps(row.metrics),
            ),
            f"Model version {row.version}",
        )

    def set_version_metrics(self, version: int, metrics: dict[str, Any]) -> None:
        changed = self._write(
            "UPDATE versions SET metrics = ? WHERE version = ?",
            (_dumps(metrics), version),
            f"Model version {version}",
        )
        if not changed:
            raise KeyError(f"there is no model version {version}")

    def latest_version(self) -> VersionRow | None:
        rows = self._read(f"SELECT {_VERSION_COLUMNS} FROM versions ORDER BY version DESC LIMIT 1")
        return _version(rows[0]) if rows else None

    def get_version(self, version: int) -> VersionRow | None:
        rows = self._read(f"SELECT {_VERSION_COLUMNS} FROM versions WHERE version = ?", (version,))
        return _version(rows[0]) if rows else None

    def list_versions(self, after: int = -1) -> list[VersionRow]:
        rows = self._read(
            f"SELECT {_VERSION_COLUMNS} FROM versions WHERE version > ? ORDER BY version", (after,)
        )
        return [_version(row) for row in rows]

    # --- small JSON documents ------------------------------------------------------------------

    def get_json(self, key: str) -> Any | None:
        rows = self._read("SELECT value FROM documents WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else None

    def put_json(self, key: str, value: Any) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError("A JSON document key must be a non-empty string.")
        self._write(
            "INSERT INTO documents (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, _dumps(value)),
            f"Document {key!r}",
        )
