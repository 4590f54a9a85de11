"""The JSON codec of the round machine's state: rounds, submissions, checks, peers, verdicts.

A driver persists `RoundProtocol.snapshot()` after every accepted contribution and the tensors
(θ, the outer optimizer's state, the last aggregate, fingerprints) after every closed round,
and rebuilds the machine with `RoundProtocol.restore`; this module is the JSON half of that.
The document ("format": "crowdtrain-protocol") is a stable on-disk format: state directories
written by earlier versions must restore, so a field is only ever added, with a default for
documents that lack it. Tensors never appear in it: a contribution's Δ and a checked
contribution's Δ are named by their `ref` (the driver's blob id) and fetched back through the
`source` the driver passes in. Peer standings carry the BOINC-style reputation (Anderson 2004,
"BOINC: A System for Public-Resource Computing and Storage") that `verification.py` keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from crowdtrain.protocol.events import (
    PeerRecord,
    PriorWork,
    ScoreOrder,
    Verdict,
    VerifyOrder,
    WorkOrder,
)
from crowdtrain.protocol.records import Check, Round, Submission
from crowdtrain.robust import DeltaSource
from crowdtrain.robust.reputation import Standing

#: The value of a snapshot document's "format" field.
FORMAT = "crowdtrain-protocol"

#: Maps a contribution's `ref` back to its Δ.
Source = Callable[[str], DeltaSource]


@dataclass
class Snapshot:
    """The round machine's state as the JSON document holds it, decoded."""

    version: int
    finished: bool
    round: Round
    previous: Round | None
    peers: dict[str, PeerRecord]
    checks: dict[str, Check]
    verdicts: list[Verdict]
    scored: int
    paused_at: float | None
    round_seconds: float | None  # None in documents written before it could change


def snapshot_to_json(snap: Snapshot) -> dict[str, Any]:
    """The document for SNAP (every verdict in it: the caller keeps the most recent)."""
    return {
        "format": FORMAT,
        "version": snap.version,
        "finished": snap.finished,
        "round": round_to_json(snap.round),
        "previous": None if snap.previous is None else round_to_json(snap.previous),
        "peers": [peer_to_json(p) for p in snap.peers.values()],
        "checks": [check_to_json(c) for c in snap.checks.values()],
        "verdicts": [asdict(v) for v in snap.verdicts],
        "scored": snap.scored,
        "paused_at": snap.paused_at,
        "round_seconds": snap.round_seconds,
    }


def check_format(doc: Mapping[str, Any]) -> None:
    """Refuse a document that is not a protocol snapshot."""
    if doc.get("format") != FORMAT:
        raise ValueError("the protocol snapshot is not a crowdtrain-protocol document")


def snapshot_from_json(doc: Mapping[str, Any], source: Source) -> Snapshot:
    """Decode DOC (see `check_format`); `source` maps a ref to its delta."""
    check_format(doc)
    version = int(doc["version"])
    finished = bool(doc["finished"])
    rnd = round_from_json(doc["round"], source)
    prev = doc["previous"]
    previous = None if prev is None else round_from_json(prev, source)
    peers = {p["peer_id"]: peer_from_json(p) for p in doc["peers"]}
    checks: dict[str, Check] = {}
    for item in doc.get("checks", []):
        check = check_from_json(item, source)
        checks[check.order.check_id] = check
    return Snapshot(
        version=version,
        finished=finished,
        round=rnd,
        previous=previous,
        peers=peers,
        checks=checks,
        verdicts=[Verdict(**v) for v in doc.get("verdicts", [])],
        scored=int(doc.get("scored", 0)),
        paused_at=doc.get("paused_at"),
        round_seconds=float(doc["round_seconds"]) if "round_seconds" in doc else None,
    )


# --- records -----------------------------------------------------------------------------------


#: A submission's fields in its JSON document, in order (its Δ is named by `ref`).
SUBMISSION_FIELDS = (
    "round",
    "peer_id",
    "weight",
    "samples",
    "train_loss",
    "payload_bytes",
    "receipt",
    "ref",
    "steps",
    "overlap_steps",
    "overlap_round",
    "overlap_first_batch",
)


def submission_to_json(sub: Submission) -> dict[str, Any]:
    """A submission without its Δ, which `ref` names."""
    return {name: getattr(sub, name) for name in SUBMISSION_FIELDS}


def submission_from_json(doc: Mapping[str, Any], source: Source) -> Submission:
    return Submission(delta=source(doc["ref"]), **doc)


def round_to_json(rnd: Round) -> dict[str, Any]:
    return {
        "number": rnd.number,
        "base_version": rnd.base_version,
        "opened_at": rnd.opened_at,
        "deadline": rnd.deadline,
        "orders": [order_to_json(o) for o in rnd.orders.values()],
        "submissions": [submission_to_json(s) for s in rnd.submissions.values()],
        "late": [submission_to_json(s) for s in rnd.late.values()],
    }


def round_from_json(doc: Mapping[str, Any], source: Source) -> Round:
    rnd = Round(doc["number"], doc["base_version"], doc["opened_at"], doc["deadline"])
    for o in doc["orders"]:
        rnd.orders[o["peer_id"]] = WorkOrder(**{**o, "shard_ids": tuple(o["shard_ids"])})
    for sub in doc["submissions"]:
        rnd.submissions[sub["peer_id"]] = submission_from_json(sub, source)
    for sub in doc["late"]:
        rnd.late[sub["peer_id"]] = submission_from_json(sub, source)
    return rnd


def check_to_json(check: Check) -> dict[str, Any]:
    """A pending check without the checked Δ, which `ref` names."""
    order = asdict(check.order)
    if isinstance(check.order, ScoreOrder):
        order["kind"] = "score"
    elif order["prior"] is not None:
        order["prior"]["shard_ids"] = list(order["prior"]["shard_ids"])
    return {
        "order": {**order, "shard_ids": list(check.order.shard_ids)},
        "ref": check.ref,
        "opened_round": check.opened_round,
        "samples": check.samples,
        "assigned": dict(check.assigned),
        "reports": dict(check.reports),
        "scores": {k: list(v) for k, v in check.scores.items()},
        "confirming": check.confirming,
    }


def check_from_json(doc: Mapping[str, Any], source: Source) -> Check:
    o = dict(doc["order"])
    order: VerifyOrder | ScoreOrder
    if o.pop("kind", "replay") == "score":
        order = ScoreOrder(**{**o, "shard_ids": tuple(o["shard_ids"])})
    else:
        p = o.get("prior")
        prior = None if p is None else PriorWork(**{**p, "shard_ids": tuple(p["shard_ids"])})
        order = VerifyOrder(**{**o, "shard_ids": tuple(o["shard_ids"]), "prior": prior})
    assigned = dict(doc.get("assigned", {}))
    if doc.get("assigned_to"):  # a snapshot from before checks had several verifiers
        assigned[doc["assigned_to"]] = doc["assigned_at"]
    return Check(
        order,
        source(doc["ref"]),
        doc["ref"],
        doc["opened_round"],
        doc["samples"],
        {str(k): float(v) for k, v in assigned.items()},
        {str(k): str(v) for k, v in doc.get("reports", {}).items()},
        {str(k): tuple(float(x) for x in v) for k, v in doc.get("scores", {}).items()},
        bool(doc.get("confirming", False)),
    )


_ORDER_FIELDS = tuple(f.name for f in fields(WorkOrder))


def order_to_json(order: WorkOrder) -> dict[str, Any]:
    """``dataclasses.asdict(order)``, field by field (a round holds an order per peer)."""
    return {name: getattr(order, name) for name in _ORDER_FIELDS}


_PEER_FIELDS = tuple(f.name for f in fields(PeerRecord))
_STANDING_FIELDS = tuple(f.name for f in fields(Standing))


def peer_to_json(peer: PeerRecord) -> dict[str, Any]:
    """``dataclasses.asdict(peer)``, field by field: the snapshot holds every peer, and asdict's
    generic recursion made it most of a snapshot's cost at 1,000 peers."""
    doc = {name: getattr(peer, name) for name in _PEER_FIELDS}
    doc["rounds"] = list(peer.rounds)
    doc["steps"] = list(peer.steps)
    doc["standing"] = {name: getattr(peer.standing, name) for name in _STANDING_FIELDS}
    return doc


def peer_from_json(doc: Mapping[str, Any]) -> PeerRecord:
    return PeerRecord(
        **{
            **doc,
            "rounds": list(doc["rounds"]),
            "steps": list(doc.get("steps", [])),
            "standing": Standing(**doc["standing"]),
        }
    )
