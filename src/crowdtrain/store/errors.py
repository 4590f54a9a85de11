"""Errors raised by the state store and the blob store.

Every implementation (SQLite and a directory today; PostgreSQL and S3-compatible object storage
later) raises these and only these for the conditions they name, so the HTTP coordinator can map
them to status codes without knowing which backend it runs on. No paper is implemented here.
Messages are one sentence that names the bad thing and, where it helps, what to do.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the stores raise on purpose."""


class BlobNotFound(StoreError):
    """No blob with this id is stored (the coordinator answers 404)."""


class InvalidBlobId(BlobNotFound, ValueError):
    """The id is not 64 lowercase hex characters; no blob can have it (also a ValueError)."""


class BlobTooLarge(StoreError):
    """More bytes arrived (or are stored) than the caller's cap allows (the coordinator: 413)."""


class BlobMismatch(StoreError):
    """The bytes that arrived do not hash to the sha256 the caller expected."""


class AlreadyExists(StoreError):
    """A row with the same unique key is already stored (peer id, token, accepted
    contribution for a peer and round, or model version)."""


class PeerNotFound(StoreError):
    """The row refers to a peer id that was never added."""


class SchemaVersionError(StoreError):
    """The stored schema was written by a different (usually newer) version of crowdtrain."""
