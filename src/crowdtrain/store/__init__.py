"""Durable storage of the coordinator: a state store (rows) and a blob store (bytes).

`StateStore` and `BlobStore` are the interfaces the coordinator codes against; `SqliteStateStore`
and `DirBlobStore` are today's implementations (PostgreSQL and S3-compatible object storage are
the planned scale-out ones). See `state` and `blobs` for the contracts. No paper is implemented
here.
"""

from crowdtrain.store.blobs import BlobStore, check_blob_id, is_blob_id
from crowdtrain.store.dirblobs import DirBlobStore
from crowdtrain.store.errors import (
    AlreadyExists,
    BlobMismatch,
    BlobNotFound,
    BlobTooLarge,
    InvalidBlobId,
    PeerNotFound,
    SchemaVersionError,
    StoreError,
)
from crowdtrain.store.sqlite import SqliteStateStore
from crowdtrain.store.state import ContributionRow, PeerRow, StateStore, VersionRow

__all__ = [
    "AlreadyExists",
    "BlobMismatch",
    "BlobNotFound",
    "BlobStore",
    "BlobTooLarge",
    "ContributionRow",
    "DirBlobStore",
    "InvalidBlobId",
    "PeerNotFound",
    "PeerRow",
    "SchemaVersionError",
    "SqliteStateStore",
    "StateStore",
    "StoreError",
    "VersionRow",
    "check_blob_id",
    "is_blob_id",
]
