"""The SQLite schema of the state store and its version number.

`SCHEMA_VERSION` is stored in the `meta` table when a store is created. A store written by a newer
crowdtrain (a higher number) is refused rather than misread; when the schema changes, bump the
number and add a step to `MIGRATIONS` that upgrades a store from the previous version. The
tables are plain SQL that maps one to one onto PostgreSQL (the planned second backend); the
only SQLite specifics are AUTOINCREMENT and storing NaN as NULL (SQLite cannot store NaN).
No paper is implemented here.
"""

from __future__ import annotations

SCHEMA_VERSION = 2

TABLES: tuple[str, ...] = (
    """CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    """CREATE TABLE peers (
        peer_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        token_hash TEXT NOT NULL UNIQUE,
        device TEXT NOT NULL,
        created_at REAL NOT NULL,
        last_seen REAL NOT NULL,
        banned INTEGER NOT NULL CHECK (banned IN (0, 1)),
        ban_reason TEXT,
        name_key TEXT,
        subject TEXT
    )""",
    # Unique display names (by state.name_key) and one peer per identity-provider account.
    "CREATE UNIQUE INDEX peers_by_name ON peers (name_key)",
    "CREATE UNIQUE INDEX peers_by_subject ON peers (subject)",
    # train_loss and weight are NULL when the value is NaN.
    """CREATE TABLE contributions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        peer_id TEXT NOT NULL REFERENCES peers (peer_id),
        round INTEGER NOT NULL CHECK (round >= 0),
        receipt TEXT NOT NULL,
        blob_sha TEXT,
        samples INTEGER NOT NULL CHECK (samples >= 0),
        tokens INTEGER NOT NULL CHECK (tokens >= 0),
        steps INTEGER NOT NULL CHECK (steps >= 0),
        train_loss REAL,
        weight REAL,
        payload_bytes INTEGER NOT NULL CHECK (payload_bytes >= 0),
        received_at REAL NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('accepted', 'rejected')),
        reason TEXT
    )""",
    """CREATE UNIQUE INDEX contributions_accepted_once
        ON contributions (peer_id, round) WHERE status = 'accepted'""",
    "CREATE INDEX contributions_by_round ON contributions (round, id)",
    "CREATE INDEX contributions_by_blob ON contributions (blob_sha)",
    """CREATE TABLE versions (
        version INTEGER PRIMARY KEY,
        round INTEGER NOT NULL,
        weights_sha TEXT NOT NULL,
        optimizer_sha TEXT,
        aggregate_sha TEXT,
        created_at REAL NOT NULL,
        metrics TEXT NOT NULL
    )""",
    """CREATE TABLE documents (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
)

# MIGRATIONS[n] holds the statements that upgrade a store from version n to n + 1.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # 1 -> 2: unique names and identity subjects. Names registered before stay as they are;
    # the first peer of each (lower-cased) name keeps it, later namesakes get no key (NULLs
    # do not collide), so none of them can be taken by a newcomer but the first.
    1: (
        "ALTER TABLE peers ADD COLUMN name_key TEXT",
        "ALTER TABLE peers ADD COLUMN subject TEXT",
        """UPDATE peers SET name_key = lower(trim(name)) WHERE rowid IN
            (SELECT min(rowid) FROM peers GROUP BY lower(trim(name)))""",
        "CREATE UNIQUE INDEX peers_by_name ON peers (name_key)",
        "CREATE UNIQUE INDEX peers_by_subject ON peers (subject)",
        "CREATE INDEX contributions_by_blob ON contributions (blob_sha)",
    ),
}
