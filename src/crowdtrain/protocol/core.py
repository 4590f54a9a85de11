"""The round protocol: a pure state machine for time-budgeted synchronous DiLoCo rounds.

Implements the round structure of DiLoCo (Douillard et al. 2023, arXiv:2311.08105): every peer
starts round r from the global weights θ_r, trains locally, and returns the pseudo-gradient
Δ = θ_r − θ_local; the coordinator aggregates the Δs (sample-weighted, robustly) and applies the
outer optimizer to get θ_{r+1}. A round closes early when every assigned peer has contributed
and the quorum is met, or at its deadline once the quorum is met; absent peers are simply absent.

Sans-IO in the style of h11: `RoundProtocol.handle(event)` takes an event and returns decisions.
It never touches the network or the disk, and reads time only from the clock it was given, so the
HTTP coordinator and the simulator drive exactly the same code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from crowdtrain.config import RunConfig
from crowdtrain.data import assign_shards
from crowdtrain.data.probe import ShardProbe
from crowdtrain.outer import OuterOptimizer, build_outer
from crowdtrain.protocol.events import (
    Accepted,
    Banned,
    CheckDone,
    ContributionMalformed,
    ContributionSubmitted,
    DeadlineChanged,
    Decision,
    Event,
    Flagged,
    PeerBanned,
    PeerJoined,
    PeerLeft,
    PeerRecord,
    PeerSeen,
    PeerUnbanned,
    PriorWork,
    Rejected,
    RoundClosed,
    RunFinished,
    RunPaused,
    RunResumed,
    Tick,
    Unknown,
    Verdict,
    VerificationSubmitted,
    VerifyOrder,
    Wait,
    WorkOrder,
    WorkRequested,
)
from crowdtrain.protocol.screening import Candidate, screen
from crowdtrain.robust import DeltaSource, DictSource, aggregate
from crowdtrain.robust.claims import check_claim
from crowdtrain.robust.copies import fingerprint
from crowdtrain.robust.reputation import (
    Standing,
    check_probability,
    is_trusted,
    new_standing,
    record_check,
    record_failure,
    record_success,
    weight_factor,
)
from crowdtrain.robust.spotcheck import compare, mismatch
from crowdtrain.robust.usefulness import Scorer

Clock = Callable[[], float]


@dataclass
class _Submission:
    peer_id: str
    delta: DeltaSource
    weight: float
    samples: int
    train_loss: float
    payload_bytes: int
    receipt: str
    ref: str = ""
    steps: int = 0
    overlap_steps: int = 0
    round: int = -1  # the round the work was ordered for (a late one belongs to the last)
    overlap_round: int = -1  # the round whose order the overlapped steps continued
    overlap_first_batch: int = 0  # ... from this batch of that order's stream

    @property
    def key(self) -> str:
        return f"{self.round}/{self.peer_id}"

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "peer_id": self.peer_id,
            "weight": self.weight,
            "samples": self.samples,
            "train_loss": self.train_loss,
            "payload_bytes": self.payload_bytes,
            "receipt": self.receipt,
            "ref": self.ref,
            "steps": self.steps,
            "overlap_steps": self.overlap_steps,
            "overlap_round": self.overlap_round,
            "overlap_first_batch": self.overlap_first_batch,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], source: Callable[[str], DeltaSource]) -> _Submission:
        return cls(delta=source(doc["ref"]), **doc)


@dataclass
class _Round:
    number: int
    base_version: int
    opened_at: float
    deadline: float
    orders: dict[str, WorkOrder] = field(default_factory=dict)
    submissions: dict[str, _Submission] = field(default_factory=dict)
    late: dict[str, _Submission] = field(default_factory=dict)

    def waiting_on(self) -> set[str]:
        return set(self.orders) - set(self.submissions)

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "base_version": self.base_version,
            "opened_at": self.opened_at,
            "deadline": self.deadline,
            "orders": [asdict(o) for o in self.orders.values()],
            "submissions": [s.to_json() for s in self.submissions.values()],
            "late": [s.to_json() for s in self.late.values()],
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], source: Callable[[str], DeltaSource]) -> _Round:
        rnd = cls(doc["number"], doc["base_version"], doc["opened_at"], doc["deadline"])
        for o in doc["orders"]:
            rnd.orders[o["peer_id"]] = WorkOrder(**{**o, "shard_ids": tuple(o["shard_ids"])})
        for key in ("submissions", "late"):
            table = getattr(rnd, key)
            for sub in doc[key]:
                table[sub["peer_id"]] = _Submission.from_json(sub, source)
        return rnd


@dataclass
class _Check:
    """A pending recomputation spot-check of one accepted contribution."""

    order: VerifyOrder
    delta: DeltaSource
    ref: str
    opened_round: int
    samples: int = 0
    assigned_to: str = ""
    assigned_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        order = asdict(self.order)
        if order["prior"] is not None:
            order["prior"]["shard_ids"] = list(order["prior"]["shard_ids"])
        return {
            "order": {**order, "shard_ids": list(self.order.shard_ids)},
            "ref": self.ref,
            "opened_round": self.opened_round,
            "samples": self.samples,
            "assigned_to": self.assigned_to,
            "assigned_at": self.assigned_at,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], source: Callable[[str], DeltaSource]) -> _Check:
        o = doc["order"]
        p = o.get("prior")
        prior = None if p is None else PriorWork(**{**p, "shard_ids": tuple(p["shard_ids"])})
        order = VerifyOrder(**{**o, "shard_ids": tuple(o["shard_ids"]), "prior": prior})
        return cls(
            order,
            source(doc["ref"]),
            doc["ref"],
            doc["opened_round"],
            doc["samples"],
            doc["assigned_to"],
            doc["assigned_at"],
        )


#: Pending spot-checks lapse after this many rounds without a verifier.
CHECK_LIFETIME_ROUNDS = 3
#: How many verdicts the snapshot (and the status API) keeps.
VERDICTS_KEPT = 1000


def _receipt(peer_id: str, round_number: int, base_version: int) -> str:
    return hashlib.sha256(f"{peer_id}\x00{round_number}\x00{base_version}".encode()).hexdigest()[
        :24
    ]


class RoundProtocol:
    """The coordinator's round logic over the global weights θ and the outer optimizer state.

    `params` is θ_0 (copied); `train_shards` are the ids of the training shards that work orders
    draw from. `clock` is the only source of time. `probe` gives the usefulness stage its
    batches (no probe: that stage is skipped); `secret` keys the copy-detection fingerprints
    (a driver facing real peers passes a random one and keeps it).
    """

    def __init__(
        self,
        config: RunConfig,
        params: Mapping[str, torch.Tensor],
        train_shards: Sequence[str],
        clock: Clock,
        *,
        probe: ShardProbe | None = None,
        secret: int = 0,
    ) -> None:
        if not train_shards:
            raise ValueError("the run needs at least one training shard")
        self.config = config
        self.clock = clock
        self.params: dict[str, torch.Tensor] = {
            k: v.detach().to(torch.float32).clone() for k, v in params.items()
        }
        self.shapes = {k: tuple(v.shape) for k, v in self.params.items()}
        self.outer: OuterOptimizer = build_outer(config.outer)
        self.train_shards = tuple(train_shards)
        self.version = 0
        self.peers: dict[str, PeerRecord] = {}
        self.last_aggregate: dict[str, torch.Tensor] | None = None
        self.history: list[RoundClosed] = []
        self.verdicts: list[Verdict] = []
        self.finished = False
        self.probe = probe
        self.secret = secret
        self.checks: dict[str, _Check] = {}
        self.fingerprints: dict[str, torch.Tensor] = {}  # "round/peer" -> fingerprint
        self.scored = 0  # usefulness evaluations so far
        self.paused_at: float | None = None  # when an administrator paused the run
        self.round_seconds = config.rounds.deadline_s  # an administrator may change it
        self._scorer: Scorer | None = None
        self._round = self._open_round(0)
        self._previous: _Round | None = None

    # --- public --------------------------------------------------------------------------

    @property
    def round(self) -> int:
        """The number of the round that is open now."""
        return self._round.number

    @property
    def deadline(self) -> float:
        """When the open round may close (once the quorum is met)."""
        return self._round.deadline

    @property
    def opened_at(self) -> float:
        """When the open round opened (moved on by the length of a pause)."""
        return self._round.opened_at

    @property
    def paused(self) -> bool:
        """Whether an administrator has paused the run."""
        return self.paused_at is not None

    @property
    def defended(self) -> bool:
        """Whether the verification stages beyond the format check are on."""
        return self.config.defence.enabled

    def assigned(self) -> dict[str, WorkOrder]:
        """The work orders handed out in the open round."""
        return dict(self._round.orders)

    def submitted(self) -> tuple[str, ...]:
        """Peers whose contribution to the open round is recorded."""
        return tuple(self._round.submissions)

    def snapshot(self) -> dict[str, Any]:
        """The protocol's state as JSON, except the tensors (see `tensors`) and the history.

        Contributions appear by their `ref`; a driver that persists this document after every
        accepted contribution, and the tensors after every closed round, can `restore` exactly.
        """
        return {
            "format": "crowdtrain-protocol",
            "version": self.version,
            "finished": self.finished,
            "round": self._round.to_json(),
            "previous": None if self._previous is None else self._previous.to_json(),
            "peers": [asdict(p) for p in self.peers.values()],
            "checks": [c.to_json() for c in self.checks.values()],
            "verdicts": [asdict(v) for v in self.verdicts[-VERDICTS_KEPT:]],
            "scored": self.scored,
            "paused_at": self.paused_at,
            "round_seconds": self.round_seconds,
        }

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """θ, the outer optimizer's state, the last aggregate and the copy-detection
        fingerprints of recent rounds: what changes at a close."""
        return {
            "params": self.params,
            "outer": self.outer.state_dict(),
            "aggregate": dict(self.last_aggregate or {}),
            "fingerprints": dict(self.fingerprints),
        }

    @classmethod
    def restore(
        cls,
        config: RunConfig,
        snapshot: Mapping[str, Any],
        tensors: Mapping[str, Mapping[str, torch.Tensor]],
        train_shards: Sequence[str],
        clock: Clock,
        source: Callable[[str], DeltaSource],
        *,
        probe: ShardProbe | None = None,
        secret: int = 0,
    ) -> RoundProtocol:
        """Rebuild a protocol from `snapshot` and `tensors`; `source` maps a ref to its delta."""
        if snapshot.get("format") != "crowdtrain-protocol":
            raise ValueError("the protocol snapshot is not a crowdtrain-protocol document")
        proto = cls(config, tensors["params"], train_shards, clock, probe=probe, secret=secret)
        proto.outer.load_state_dict(tensors["outer"])
        proto.last_aggregate = dict(tensors["aggregate"]) or None
        proto.fingerprints = dict(tensors.get("fingerprints", {}))
        proto.version = int(snapshot["version"])
        proto.finished = bool(snapshot["finished"])
        proto._round = _Round.from_json(snapshot["round"], source)
        prev = snapshot["previous"]
        proto._previous = None if prev is None else _Round.from_json(prev, source)
        proto.peers = {
            p["peer_id"]: PeerRecord(
                **{
                    **p,
                    "rounds": list(p["rounds"]),
                    "steps": list(p.get("steps", [])),
                    "standing": Standing(**p["standing"]),
                }
            )
            for p in snapshot["peers"]
        }
        for doc in snapshot.get("checks", []):
            check = _Check.from_json(doc, source)
            proto.checks[check.order.check_id] = check
        proto.verdicts = [Verdict(**v) for v in snapshot.get("verdicts", [])]
        proto.scored = int(snapshot.get("scored", 0))
        proto.paused_at = snapshot.get("paused_at")
        proto.round_seconds = float(snapshot.get("round_seconds", proto.round_seconds))
        return proto

    def handle(self, event: Event) -> list[Decision]:
        """Apply one event and return the decisions it causes, in order."""
        now = self.clock()
        if isinstance(event, PeerJoined):
            return self._on_joined(event, now)
        if isinstance(event, PeerLeft):
            return self._on_left(event, now)
        if isinstance(event, WorkRequested):
            return self._on_work(event, now)
        if isinstance(event, ContributionSubmitted):
            return self._on_contribution(event, now)
        if isinstance(event, ContributionMalformed):
            return self._on_malformed(event, now)
        if isinstance(event, VerificationSubmitted):
            return self._on_verification(event, now)
        if isinstance(event, PeerBanned):
            return self._on_banned(event, now)
        if isinstance(event, PeerUnbanned):
            return self._on_unbanned(event, now)
        if isinstance(event, RunPaused | RunResumed | DeadlineChanged):
            return self._on_admin(event, now)
        if isinstance(event, PeerSeen):
            peer = self.peers.get(event.peer_id)
            if peer is None:
                return [_stranger(event.peer_id)]
            peer.online, peer.last_seen = True, now
            return []
        if isinstance(event, Tick):
            self._expire_silent_peers(now)
            return self._maybe_close(now)
        raise TypeError(f"unknown event type {type(event).__name__}")

    # --- handlers ------------------------------------------------------------------------

    def _on_joined(self, event: PeerJoined, now: float) -> list[Decision]:
        peer = self.peers.get(event.peer_id)
        if peer is None:
            standing = new_standing(self.config.defence)
            self.peers[event.peer_id] = PeerRecord(
                event.peer_id, event.name, now, now, standing=standing
            )
        else:
            peer.online, peer.last_seen = True, now
        return []

    def _on_left(self, event: PeerLeft, now: float) -> list[Decision]:
        peer = self.peers.get(event.peer_id)
        if peer is None:
            return [_stranger(event.peer_id)]
        peer.last_seen = now
        self._gone(peer, now)
        return self._maybe_close(now)

    def _on_banned(self, event: PeerBanned, now: float) -> list[Decision]:
        peer = self.peers.get(event.peer_id)
        if peer is None:
            return [_stranger(event.peer_id)]
        peer.standing.banned, peer.standing.ban_reason = True, event.reason
        self._record(now, peer.peer_id, self._round.number, "admin", "banned", event.reason)
        self._evict(peer)
        return [Banned(peer.peer_id, event.reason), *self._maybe_close(now)]

    def _on_unbanned(self, event: PeerUnbanned, now: float) -> list[Decision]:
        peer = self.peers.get(event.peer_id)
        if peer is None:
            return [_stranger(event.peer_id)]
        if peer.standing.banned:
            peer.standing.banned, peer.standing.ban_reason = False, ""
            peer.standing.strikes = 0.0
            reason = "ban lifted by an administrator"
            self._record(now, peer.peer_id, self._round.number, "admin", "unbanned", reason)
        return []

    def _on_admin(
        self, event: RunPaused | RunResumed | DeadlineChanged, now: float
    ) -> list[Decision]:
        """Pause, resume, or move the deadline. A pause stops the clock of the open round:
        resuming moves its opening and deadline on by the pause, so no peer loses time to it."""
        rnd = self._round
        if isinstance(event, RunPaused):
            if self.paused_at is None:
                self.paused_at = now
            return []
        if isinstance(event, RunResumed):
            if self.paused_at is not None:
                shift = max(0.0, now - self.paused_at)
                rnd.opened_at += shift
                rnd.deadline += shift
                self.paused_at = None
            return self._maybe_close(now)
        if not event.deadline_in > 0 or (
            event.round_seconds is not None and not event.round_seconds > 0
        ):
            raise ValueError("a deadline must be a positive number of seconds")
        rnd.deadline = now + event.deadline_in
        if event.round_seconds is not None:
            self.round_seconds = float(event.round_seconds)
        return self._maybe_close(now)

    def _evict(self, peer: PeerRecord) -> None:
        """A banned peer's open order, unaggregated contribution and pending checks of its own
        work are dropped; checks it was to replay go back to the pool."""
        self._round.orders.pop(peer.peer_id, None)
        self._round.submissions.pop(peer.peer_id, None)
        self._round.late.pop(peer.peer_id, None)
        for check_id, check in list(self.checks.items()):
            if check.order.target == peer.peer_id:  # no replay can change a ban
                del self.checks[check_id]
            elif check.assigned_to == peer.peer_id:
                check.assigned_to = ""

    def _expire_silent_peers(self, now: float) -> None:
        """Peers not heard from for `rounds.peer_timeout_s` are gone; their orders lapse."""
        cutoff = now - self.config.rounds.peer_timeout_s
        for peer in self.peers.values():
            if peer.online and peer.last_seen < cutoff:
                self._gone(peer, now)

    def _gone(self, peer: PeerRecord, now: float) -> None:
        peer.online = False
        if peer.peer_id not in self._round.submissions:
            self._round.orders.pop(peer.peer_id, None)

    def _on_work(self, event: WorkRequested, now: float) -> list[Decision]:
        peer = self.peers.get(event.peer_id)
        if peer is None:
            return [_stranger(event.peer_id)]
        peer.online, peer.last_seen = True, now
        if peer.standing.banned:
            return [Banned(peer.peer_id, peer.standing.ban_reason)]
        if self.finished:
            return [RunFinished(self.version)]
        if self.paused:
            return [Wait(event.peer_id, 2.0, "the run is paused by its organizer")]
        check = self._check_for(peer, now)
        if check is not None:
            return [check]
        rnd = self._round
        if event.peer_id in rnd.submissions:
            return [Wait(event.peer_id, 0.25, "your contribution to this round is in")]
        order = rnd.orders.get(event.peer_id)
        if order is not None:
            return [order]
        if len(rnd.orders) >= self.config.rounds.max_peers_per_round:
            return [Wait(event.peer_id, 1.0, "this round has all the peers it can take")]
        window_end = rnd.opened_at + self.config.rounds.join_window * self.round_seconds
        if window_end < now < rnd.deadline and len(rnd.orders) >= self.config.rounds.quorum:
            # An open round past its deadline still lacks its quorum, so it takes anyone.
            retry = max(0.5, min(5.0, rnd.deadline - now))
            reason = "this round is past its join window; your work starts with the next round"
            return [Wait(event.peer_id, retry, reason)]
        order = self._make_order(event.peer_id, rnd)
        rnd.orders[event.peer_id] = order
        return [order]

    def _check_for(self, peer: PeerRecord, now: float) -> VerifyOrder | None:
        """A pending spot-check for a trusted peer that is not already busy this round."""
        cfg = self.config.defence
        if cfg.spot_check != "peer" or not self.defended:
            return None
        if not is_trusted(peer.standing, cfg) or peer.peer_id in self._round.orders:
            return None
        lapse = self.config.rounds.deadline_s
        for check in self.checks.values():
            if check.assigned_to == peer.peer_id:
                return replace(check.order, peer_id=peer.peer_id)
        for check in self.checks.values():
            free = not check.assigned_to or now - check.assigned_at > lapse
            if free and check.order.target != peer.peer_id:
                check.assigned_to, check.assigned_at = peer.peer_id, now
                return replace(check.order, peer_id=peer.peer_id)
        return None

    def _uploader(self, peer_id: str, now: float) -> PeerRecord | Decision:
        """The peer behind an upload, seen now; or Unknown for a stranger, Banned for a
        banned peer."""
        peer = self.peers.get(peer_id)
        if peer is None:
            return _stranger(peer_id)
        peer.last_seen = now
        if peer.standing.banned:
            return Banned(peer.peer_id, peer.standing.ban_reason)
        return peer

    def _on_contribution(self, event: ContributionSubmitted, now: float) -> list[Decision]:
        peer = self._uploader(event.peer_id, now)
        if not isinstance(peer, PeerRecord):
            return [peer]
        rnd, weight_factor_late = self._round_for(event.round)
        if rnd is None:
            return [self._reject(peer, event.round, "closed", "this round is closed")]
        done = rnd.submissions.get(event.peer_id)
        if done is None and rnd is not self._round:  # the open round's `late` is the last's
            done = rnd.late.get(event.peer_id)
        if done is not None:
            return [Accepted(event.peer_id, event.round, done.receipt, done.weight)]
        order = rnd.orders.get(event.peer_id)
        if order is None:
            reason = "this peer has no work order for this round"
            return [self._reject(peer, event.round, "no_order", reason)]
        if event.base_version != rnd.base_version:
            reason = f"the contribution starts from version {event.base_version}, "
            reason += f"not {rnd.base_version}"
            return [self._reject(peer, event.round, "bad_base", reason)]
        if event.samples <= 0 or event.steps <= 0:
            reason = "a contribution must report a positive number of samples and steps"
            return [self._reject(peer, event.round, "bad_samples", reason)]
        factor = weight_factor_late
        if self.defended:
            claim = check_claim(
                samples=event.samples,
                tokens=event.tokens,
                steps=event.steps,
                batch_size=self.config.data.batch_size,
                context=self.config.model.context,
                budget=order.budget,
                max_steps=order.max_steps,
                history_steps=peer.steps,
                round_steps=[s.steps for s in rnd.submissions.values()],
                slack=self.config.defence.claims_slack,
            )
            if claim is not None:
                return self._fail(peer, event.round, "claims", "bad_claim", claim, now)
            factor *= weight_factor(peer.standing, self.config.defence)
        sub = _Submission(
            peer_id=event.peer_id,
            delta=event.delta,
            weight=float(event.samples) * factor,
            samples=event.samples,
            train_loss=event.train_loss,
            payload_bytes=event.payload_bytes,
            receipt=_receipt(event.peer_id, event.round, event.base_version),
            ref=event.ref,
            steps=event.steps,
            overlap_steps=event.overlap_steps,
            round=event.round,
            overlap_round=event.overlap_round,
            overlap_first_batch=event.overlap_first_batch,
        )
        if rnd is self._round:
            rnd.submissions[event.peer_id] = sub
        else:
            self._round.late[event.peer_id] = sub
            rnd.late[event.peer_id] = sub
        peer.accepted += 1
        peer.samples += event.samples
        peer.rounds.append(event.round)
        peer.steps = [*peer.steps, event.steps][-10:]
        decisions: list[Decision] = [Accepted(event.peer_id, event.round, sub.receipt, sub.weight)]
        decisions.extend(self._maybe_close(now))
        return decisions

    def _on_malformed(self, event: ContributionMalformed, now: float) -> list[Decision]:
        peer = self._uploader(event.peer_id, now)
        if not isinstance(peer, PeerRecord):
            return [peer]
        if not self.defended:
            return [self._reject(peer, event.round, "bad_payload", event.reason)]
        return self._fail(peer, event.round, "format", "bad_payload", event.reason, now)

    def _on_verification(self, event: VerificationSubmitted, now: float) -> list[Decision]:
        check = self.checks.get(event.check_id)
        if check is None:
            return [Unknown(event.peer_id, f"no open spot-check has id {event.check_id}")]
        if event.peer_id and check.assigned_to != event.peer_id:
            return [Unknown(event.peer_id, "this spot-check is assigned to another peer")]
        del self.checks[event.check_id]
        order = check.order
        target = self.peers[order.target]
        if event.peer_id in self.peers:
            self.peers[event.peer_id].standing.verified += 1
        verdict = mismatch(
            compare(check.delta, event.delta, self.shapes, self.config.aggregation.fragment_numel),
            tolerance=self.config.defence.check_tolerance,
        )
        if verdict is None and event.steps != order.steps:
            verdict = f"the replay ran {event.steps} steps, not the {order.steps} claimed"
        passed = verdict is None
        reason = verdict or "the replay matched the contribution"
        outcome = "check_passed" if passed else "check_failed"
        self._record(now, order.target, order.round, "spot_check", outcome, reason)
        decisions: list[Decision] = [
            CheckDone(order.check_id, order.target, order.round, event.peer_id, passed, reason)
        ]
        if not passed:
            target.samples -= check.samples  # the contribution is void: no credit for it
            target.flagged += 1
            decisions.append(Flagged(order.target, order.round, "spot_check", reason))
            if record_check(target.standing, self.config.defence, False, reason):
                decisions.extend(self._ban(target, order.round, now))
                decisions.extend(self._maybe_close(now))
        else:
            record_check(target.standing, self.config.defence, True, reason)
        return decisions

    # --- internals -----------------------------------------------------------------------

    def _record(
        self, now: float, peer_id: str, round_number: int, stage: str, outcome: str, reason: str
    ) -> None:
        self.verdicts.append(Verdict(now, peer_id, round_number, stage, outcome, reason))
        if len(self.verdicts) > 2 * VERDICTS_KEPT:
            del self.verdicts[:-VERDICTS_KEPT]

    def _fail(
        self, peer: PeerRecord, round_number: int, stage: str, code: str, reason: str, now: float
    ) -> list[Decision]:
        """A stage refused a peer's contribution at submission: reject, strike, maybe ban."""
        decisions: list[Decision] = [self._reject(peer, round_number, code, reason)]
        self._record(now, peer.peer_id, round_number, stage, "rejected", reason)
        if record_failure(peer.standing, self.config.defence, 1.0, f"{stage}: {reason}"):
            decisions.extend(self._ban(peer, round_number, now))
            decisions.extend(self._maybe_close(now))  # it may have been the last one awaited
        return decisions

    def _ban(self, peer: PeerRecord, round_number: int, now: float) -> list[Decision]:
        reason = peer.standing.ban_reason
        self._record(now, peer.peer_id, round_number, "reputation", "banned", reason)
        self._evict(peer)
        return [Banned(peer.peer_id, reason)]

    def _round_for(self, number: int) -> tuple[_Round | None, float]:
        if number == self._round.number and not self.finished:
            return self._round, 1.0
        late_ok = self.config.rounds.late == "accept" and not self.finished
        if late_ok and self._previous is not None and number == self._previous.number:
            return self._previous, self.config.rounds.late_weight
        return None, 0.0

    def _reject(self, peer: PeerRecord, round_number: int, code: str, reason: str) -> Rejected:
        peer.rejected += 1
        return Rejected(peer.peer_id, round_number, code, reason)

    def _open_round(self, number: int) -> _Round:
        now = self.clock()
        return _Round(number, self.version, now, now + self.round_seconds)

    def _make_order(self, peer_id: str, rnd: _Round) -> WorkOrder:
        cfg = self.config
        shards = assign_shards(
            self.train_shards,
            seed=cfg.data.seed,
            round=rnd.number,
            peer=peer_id,
            k=min(cfg.data.shards_per_peer, len(self.train_shards)),
        )
        return WorkOrder(
            peer_id=peer_id,
            round=rnd.number,
            base_version=rnd.base_version,
            shard_ids=tuple(shards),
            seed=cfg.seed,
            step_offset=rnd.number * cfg.inner.steps,
            budget=cfg.inner.budget,
            max_steps=cfg.inner.steps,
            max_seconds=cfg.inner.seconds,
            deadline=rnd.deadline,
        )

    def _maybe_close(self, now: float) -> list[Decision]:
        rnd = self._round
        if self.finished or self.paused:
            return []
        count = len(rnd.submissions) + len(rnd.late)
        if count < self.config.rounds.quorum:
            return []
        if now < rnd.deadline and (rnd.waiting_on() or not rnd.orders):
            return []
        return self._close(now)

    def _screen(self, rnd: _Round, subs: list[_Submission], now: float) -> list[Decision]:
        """Stages (b), (c), (f) on the round's contributions; flagged ones leave `subs`."""
        if self._scorer is None and self.probe is not None:
            self._scorer = Scorer(self.config.model)
        candidates = [
            Candidate(
                s.key,
                s.peer_id,
                s.delta,
                self._order_of(s),
                s.steps,
                -1.0 if self._unreplayable(s) else self.peers[s.peer_id].standing.score,
                fresh_steps=s.steps - min(s.overlap_steps, s.steps),
            )
            for s in subs
        ]
        outcome = screen(
            candidates,
            config=self.config,
            shapes=self.shapes,
            history=[*self.fingerprints.values(), *self._aggregate_print()],
            key=secret_seed("fingerprint", self.secret, self.config.seed),
            params=self.params,
            scorer=self._scorer,
            probe=self.probe,
            seed=secret_seed("scoring", self.secret, self.config.seed, rnd.number),
        )
        self.scored += outcome.scored
        decisions: list[Decision] = []
        for sub in [s for s in subs if s.key in outcome.flags]:
            stage, reason = outcome.flags[sub.key]
            peer = self.peers[sub.peer_id]
            peer.samples -= sub.samples
            peer.flagged += 1
            self._record(now, sub.peer_id, sub.round, stage, "flagged", reason)
            decisions.append(Flagged(sub.peer_id, sub.round, stage, reason))
            if record_failure(peer.standing, self.config.defence, 1.0, f"{stage}: {reason}"):
                decisions.extend(self._ban(peer, rnd.number, now))
        subs[:] = [s for s in subs if s.key not in outcome.flags]
        self.fingerprints.update(outcome.fingerprints)
        keep = rnd.number - self.config.defence.copy_history_rounds
        for name in [n for n in self.fingerprints if int(n.split("/", 1)[0]) <= keep]:
            del self.fingerprints[name]
        for s in subs:
            record_success(self.peers[s.peer_id].standing, self.config.defence)
        return decisions

    def _order_of(self, sub: _Submission) -> WorkOrder:
        """The work order a contribution answered (recomputed if it lapsed: it is a pure
        function of the round and the peer)."""
        for rnd in (self._round, self._previous):
            if rnd is not None and rnd.number == sub.round:
                return rnd.orders.get(sub.peer_id) or self._make_order(sub.peer_id, rnd)
        raise ValueError(f"round {sub.round} is neither the open nor the last round")

    def _unreplayable(self, sub: _Submission) -> bool:
        """A contribution no spot-check can replay (overlap without a known prior round): it
        is scored first instead, as if its peer were the least trusted."""
        return bool(sub.overlap_steps) and self._prior_of(sub) is None

    def _prior_of(self, sub: _Submission) -> PriorWork | None:
        """What a replay of overlapped SUB must redo first: the same peer's work of the round
        just before, trained on from the base minus the Δ it sent for that round. None (SUB
        cannot be replayed) unless that submission is still known, i.e. in the last round.

        The overlapped steps count towards SUB's steps, so a replay never runs more than those.
        """
        prev = self._previous
        if prev is None or sub.overlap_round != sub.round - 1 or prev.number != sub.overlap_round:
            return None
        candidates = (prev.submissions.get(sub.peer_id), prev.late.get(sub.peer_id))
        done = next((c for c in candidates if c is not None and c.round == prev.number), None)
        if done is None or not done.ref:
            return None
        work = self._order_of(done)
        return PriorWork(
            round=work.round,
            base_version=work.base_version,
            shard_ids=work.shard_ids,
            seed=work.seed,
            step_offset=work.step_offset,
            first_batch=sub.overlap_first_batch,
            steps=min(sub.overlap_steps, sub.steps),
            payload_ref=done.ref,
        )

    def _aggregate_print(self) -> list[torch.Tensor]:
        """The last aggregate's fingerprint: a free-rider resubmitting the global update (which
        any peer can compute from two downloads) is then a copy of it."""
        if self.last_aggregate is None:
            return []
        cfg = self.config.defence
        source = DictSource(self.last_aggregate)
        key = secret_seed("fingerprint", self.secret, self.config.seed)
        return [
            fingerprint(
                source,
                self.shapes,
                key=key,
                blocks=cfg.fingerprint_blocks,
                block_len=cfg.fingerprint_block_len,
            )
        ]

    def _schedule_checks(self, rnd: _Round, subs: list[_Submission], now: float) -> list[Decision]:
        """Pick this round's contributions to replay (BOINC-style adaptive replication)."""
        cfg = self.config.defence
        for check_id, check in list(self.checks.items()):
            if rnd.number - check.opened_round >= CHECK_LIFETIME_ROUNDS:
                del self.checks[check_id]
                o = check.order
                self._record(
                    now,
                    o.target,
                    o.round,
                    "spot_check",
                    "check_expired",
                    "no verifier replayed this contribution in time",
                )
        decisions: list[Decision] = []
        if cfg.spot_check == "off" or not replayable(self.config):
            return decisions
        rng = torch.Generator().manual_seed(
            secret_seed("checks", self.secret, self.config.seed, rnd.number)
        )
        for s in subs:
            draw = float(torch.rand((), generator=rng))
            p = check_probability(self.peers[s.peer_id].standing, cfg)
            if draw >= p:
                continue
            prior = self._prior_of(s) if s.overlap_steps else None
            if s.overlap_steps and prior is None:
                continue  # its start is private to the peer: no one can replay it
            work = self._order_of(s)
            text = f"check\x00{s.peer_id}\x00{s.round}"
            check_id = hashlib.sha256(text.encode()).hexdigest()
            order = VerifyOrder(
                check_id=check_id[:24],
                peer_id="",
                target=s.peer_id,
                round=work.round,
                base_version=work.base_version,
                shard_ids=work.shard_ids,
                seed=work.seed,
                step_offset=work.step_offset,
                steps=s.steps,
                prior=prior,
            )
            self.checks[order.check_id] = _Check(order, s.delta, s.ref, rnd.number, s.samples)
            if cfg.spot_check == "coordinator":
                decisions.append(order)
        return decisions

    def _close(self, now: float) -> list[Decision]:
        rnd = self._round
        subs = list(rnd.submissions.values()) + list(rnd.late.values())
        decisions: list[Decision] = []
        if self.defended:
            decisions.extend(self._screen(rnd, subs, now))
        if subs:
            result = aggregate(
                [s.delta for s in subs],
                [s.weight for s in subs],
                self.shapes,
                self.config.aggregation,
                reference=self.last_aggregate,
                seed=self.config.seed * 1_000_003 + rnd.number,
            )
            self.outer.step(self.params, result.delta)
            self.last_aggregate = result.delta
            scales, tau = tuple(result.scales), result.tau
        else:
            scales, tau = (), None  # every contribution was flagged: θ stays as it was
        if self.defended:
            decisions.extend(self._schedule_checks(rnd, subs, now))
        self.version += 1
        total_weight = sum(s.weight for s in subs)
        closed = RoundClosed(
            round=rnd.number,
            new_version=self.version,
            contributors=tuple(s.peer_id for s in subs),
            weights=tuple(s.weight for s in subs),
            samples=sum(s.samples for s in subs),
            train_loss=sum(s.train_loss * s.weight for s in subs) / total_weight
            if subs
            else float("nan"),
            payload_bytes=sum(s.payload_bytes for s in subs),
            scales=scales,
            tau=tau,
        )
        self.history.append(closed)
        self._previous = rnd
        decisions.append(closed)
        if rnd.number + 1 >= self.config.rounds.total:
            self.finished = True
            decisions.append(RunFinished(self.version))
        else:
            self._round = self._open_round(rnd.number + 1)
        return decisions


def _stranger(peer_id: str) -> Unknown:
    return Unknown(peer_id, "no peer with this id has joined the run")


def replayable(config: RunConfig) -> bool:
    """Whether a replay can reproduce what a peer sent: not when the peer adds its own
    error-feedback residual (top-k codec, SparseLoCo outer step) or carries AdamW moments
    across rounds (`inner.keep_optimizer_state`), which no one else knows."""
    return (
        config.codec.name != "topk2bit"
        and config.outer.optimizer != "error_feedback"
        and not config.inner.keep_optimizer_state
    )


def secret_seed(purpose: str, *parts: int) -> int:
    """A 63-bit seed from the driver's secret and public numbers: peers cannot predict which
    contributions are scored or checked, nor where fingerprints sample (fixed for the run, so
    fingerprints of different rounds compare)."""
    text = "\x00".join([purpose, *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
