"""The state store interface: peers, contributions, model versions and small JSON documents.

This is the coordinator's durable memory. The round protocol itself is sans-IO (crowdtrain.protocol,
after h11); the HTTP driver writes what must survive a restart here, and the blob store holds the
bytes. A contribution's receipt promises durability, so `record_contribution` is durable once its
transaction commits. Versions follow the DiLoCo outer loop (Douillard et al. 2023, "DiLoCo:
Distributed Low-Communication Training of Language Models", arXiv:2311.08105): one row per
closed round, naming the blobs of θ_{r+1}, the outer-optimizer state and the aggregate.

`StateStore` is what the coordinator codes against; `SqliteStateStore` is the one implementation
today and PostgreSQL the planned second, so the contract below avoids SQLite specifics. The store
never reads a clock: every timestamp is a float (seconds) passed in by the caller.
"""

from __future__ import annotations

import unicodedata
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

ContributionStatus = Literal["accepted", "rejected"]
STATUSES: tuple[ContributionStatus, ...] = ("accepted", "rejected")


def name_key(name: str) -> str:
    """The form of a display name that must be unique in a run: NFKC, case-folded, with runs
    of white space as one space, so "Alice", "ALICE" and "Ａｌｉｃｅ" are one name."""
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


@dataclass(frozen=True)
class PeerRow:
    """A registered volunteer. `token_hash` is the sha256 hex of its bearer token; `subject`
    the identity provider's account it registered with (unique), if the run uses one. Display
    names are unique by `name_key`."""

    peer_id: str
    name: str
    token_hash: str
    device: dict[str, Any]
    created_at: float
    last_seen: float
    banned: bool = False
    ban_reason: str | None = None
    subject: str | None = None


@dataclass(frozen=True)
class ContributionRow:
    """One upload of a pseudo-gradient for one round, accepted or rejected (with a reason).

    `blob_sha` names the stored payload (None when a rejected upload was not kept). At most one
    accepted row exists per (peer_id, round); rejected rows may repeat.
    """

    peer_id: str
    round: int
    receipt: str
    blob_sha: str | None
    samples: int
    tokens: int
    steps: int
    train_loss: float
    weight: float
    payload_bytes: int
    received_at: float
    status: ContributionStatus
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(
                f"Contribution status must be 'accepted' or 'rejected', not {self.status!r}."
            )
        for name in ("round", "samples", "tokens", "steps", "payload_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"Contribution {name} must be zero or more.")


@dataclass(frozen=True)
class VersionRow:
    """One version of the global model, written when a round closes (version 0: θ_0).

    `metrics` is free-form JSON (train_loss, eval_loss, samples, bytes_up, contributors, ...).
    """

    version: int
    round: int
    weights_sha: str
    optimizer_sha: str | None
    aggregate_sha: str | None
    created_at: float
    metrics: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class StateStore(Protocol):
    """Durable coordinator state. Contract shared by every implementation:

    - Every method is atomic on its own. `transaction()` groups several calls into one atomic,
      durable commit; a nested `transaction()` joins the outer one, and an exception leaving a
      nested block undoes only that block's writes (a savepoint), so the outer block may catch
      it and go on. An exception leaving the outermost block undoes everything in it.
    - A write that breaks a unique key raises `AlreadyExists`; a write naming an unknown peer
      raises `PeerNotFound`. Neither leaves anything behind.
    - Rows read back equal the rows written: floats round-trip exactly (a NaN loss comes back
      as NaN), and JSON values (`device`, `metrics`, documents) round-trip through `json`, so
      tuples come back as lists.
    - Safe to call from several threads; several processes may share one store.
    """

    def transaction(self) -> AbstractContextManager[None]:
        """Group the calls made inside the block into one atomic commit."""
        ...

    # --- peers ---------------------------------------------------------------------------------

    def add_peer(self, peer: PeerRow) -> None:
        """Add a new peer; `AlreadyExists` if its id, token hash, name (by `name_key`) or
        subject is taken."""
        ...

    def get_peer(self, peer_id: str) -> PeerRow | None:
        """The peer with this id, or None."""
        ...

    def peer_by_token_hash(self, token_hash: str) -> PeerRow | None:
        """The peer whose token hashes to `token_hash`, or None."""
        ...

    def peer_by_name(self, name: str) -> PeerRow | None:
        """The peer whose display name has the same `name_key` as NAME."""
        ...

    def peer_by_subject(self, subject: str) -> PeerRow | None:
        """The peer registered with the identity-provider account SUBJECT."""
        ...

    def replace_token(self, peer_id: str, token_hash: str) -> None:
        """Give a peer a new bearer token (its old one stops working); PeerNotFound if none."""
        ...

    def touch_peer(self, peer_id: str, now: float) -> None:
        """Record that the peer was seen at `now` (last_seen never moves backwards)."""
        ...

    def set_banned(self, peer_id: str, banned: bool, reason: str | None) -> None:
        """Ban or unban a peer; the reason is kept as given (pass None when unbanning)."""
        ...

    def list_peers(self) -> list[PeerRow]:
        """All peers, oldest first (by created_at, then peer_id)."""
        ...

    # --- contributions -------------------------------------------------------------------------

    def record_contribution(self, row: ContributionRow) -> None:
        """Store a contribution; `AlreadyExists` for a second accepted row of a (peer, round)."""
        ...

    def blob_accepted(self, sha: str) -> bool:
        """Whether an accepted contribution's payload is the blob SHA."""
        ...

    def blob_authors(self, sha: str) -> set[str]:
        """The peers whose contributions (accepted or refused) uploaded the blob SHA."""
        ...

    def get_contribution(self, peer_id: str, round: int) -> ContributionRow | None:
        """The accepted contribution of the peer for the round; failing that the latest
        rejected one; failing that None."""
        ...

    def contributions_for_round(
        self, round: int, *, status: ContributionStatus | None = None
    ) -> list[ContributionRow]:
        """The round's contributions (optionally only one status) in the order recorded."""
        ...

    # --- model versions ------------------------------------------------------------------------

    def add_version(self, row: VersionRow) -> None:
        """Store a new model version; `AlreadyExists` if the number is taken."""
        ...

    def set_version_metrics(self, version: int, metrics: dict[str, Any]) -> None:
        """Replace a stored version's metrics (its evaluation arrives after it is stored);
        KeyError for an unknown version."""
        ...

    def latest_version(self) -> VersionRow | None:
        """The version with the highest number, or None before θ_0 is stored."""
        ...

    def get_version(self, version: int) -> VersionRow | None:
        """The version with this number, or None."""
        ...

    def list_versions(self, after: int = -1) -> list[VersionRow]:
        """The versions numbered above `after` (default: all) in increasing order."""
        ...

    # --- small JSON documents ------------------------------------------------------------------

    def get_json(self, key: str) -> Any | None:
        """The document stored under `key`, or None."""
        ...

    def put_json(self, key: str, value: Any) -> None:
        """Store (or replace) a JSON-serialisable document under `key`."""
        ...

    def close(self) -> None:
        """Release the connection; further calls raise `StoreError`. Closing twice is fine."""
        ...
