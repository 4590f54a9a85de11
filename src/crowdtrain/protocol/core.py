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
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from crowdtrain.config import RunConfig
from crowdtrain.data import assign_shards
from crowdtrain.outer import OuterOptimizer, build_outer
from crowdtrain.protocol.events import (
    Accepted,
    ContributionSubmitted,
    Decision,
    Event,
    PeerJoined,
    PeerLeft,
    PeerRecord,
    PeerSeen,
    Rejected,
    RoundClosed,
    RunFinished,
    Tick,
    Unknown,
    Wait,
    WorkOrder,
    WorkRequested,
)
from crowdtrain.robust import DeltaSource, aggregate

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

    def to_json(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "weight": self.weight,
            "samples": self.samples,
            "train_loss": self.train_loss,
            "payload_bytes": self.payload_bytes,
            "receipt": self.receipt,
            "ref": self.ref,
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


def _receipt(peer_id: str, round_number: int, base_version: int) -> str:
    return hashlib.sha256(f"{peer_id}\x00{round_number}\x00{base_version}".encode()).hexdigest()[
        :24
    ]


class RoundProtocol:
    """The coordinator's round logic over the global weights θ and the outer optimizer state.

    `params` is θ_0 (copied); `train_shards` are the ids of the training shards that work orders
    draw from. `clock` is the only source of time.
    """

    def __init__(
        self,
        config: RunConfig,
        params: Mapping[str, torch.Tensor],
        train_shards: Sequence[str],
        clock: Clock,
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
        self.finished = False
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
        }

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """θ, the outer optimizer's state and the last aggregate: what changes at a close."""
        return {
            "params": self.params,
            "outer": self.outer.state_dict(),
            "aggregate": dict(self.last_aggregate or {}),
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
    ) -> RoundProtocol:
        """Rebuild a protocol from `snapshot` and `tensors`; `source` maps a ref to its delta."""
        if snapshot.get("format") != "crowdtrain-protocol":
            raise ValueError("the protocol snapshot is not a crowdtrain-protocol document")
        proto = cls(config, tensors["params"], train_shards, clock)
        proto.outer.load_state_dict(tensors["outer"])
        proto.last_aggregate = dict(tensors["aggregate"]) or None
        proto.version = int(snapshot["version"])
        proto.finished = bool(snapshot["finished"])
        proto._round = _Round.from_json(snapshot["round"], source)
        prev = snapshot["previous"]
        proto._previous = None if prev is None else _Round.from_json(prev, source)
        proto.peers = {
            p["peer_id"]: PeerRecord(**{**p, "rounds": list(p["rounds"])})
            for p in snapshot["peers"]
        }
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
        if isinstance(event, PeerSeen):
            peer = self.peers.get(event.peer_id)
            if peer is None:
                return [Unknown(event.peer_id, "no peer with this id has joined the run")]
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
            self.peers[event.peer_id] = PeerRecord(event.peer_id, event.name, now, now)
        else:
            peer.online, peer.last_seen = True, now
        return []

    def _on_left(self, event: PeerLeft, now: float) -> list[Decision]:
        peer = self.peers.get(event.peer_id)
        if peer is None:
            return [Unknown(event.peer_id, "no peer with this id has joined the run")]
        peer.last_seen = now
        self._gone(peer, now)
        return self._maybe_close(now)

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
            return [Unknown(event.peer_id, "no peer with this id has joined the run")]
        peer.online, peer.last_seen = True, now
        if self.finished:
            return [RunFinished(self.version)]
        rnd = self._round
        if event.peer_id in rnd.submissions:
            return [Wait(event.peer_id, 0.25, "your contribution to this round is in")]
        order = rnd.orders.get(event.peer_id)
        if order is not None:
            return [order]
        if len(rnd.orders) >= self.config.rounds.max_peers_per_round:
            return [Wait(event.peer_id, 1.0, "this round has all the peers it can take")]
        window_end = rnd.opened_at + self.config.rounds.join_window * self.config.rounds.deadline_s
        if window_end < now < rnd.deadline and len(rnd.orders) >= self.config.rounds.quorum:
            # An open round past its deadline still lacks its quorum, so it takes anyone.
            retry = max(0.5, min(5.0, rnd.deadline - now))
            reason = "this round is past its join window; your work starts with the next round"
            return [Wait(event.peer_id, retry, reason)]
        order = self._make_order(event.peer_id, rnd)
        rnd.orders[event.peer_id] = order
        return [order]

    def _on_contribution(self, event: ContributionSubmitted, now: float) -> list[Decision]:
        peer = self.peers.get(event.peer_id)
        if peer is None:
            return [Unknown(event.peer_id, "no peer with this id has joined the run")]
        peer.last_seen = now
        rnd, weight_factor = self._round_for(event.round)
        if rnd is None:
            return [self._reject(peer, event.round, "closed", "this round is closed")]
        done = rnd.submissions.get(event.peer_id) or rnd.late.get(event.peer_id)
        if done is not None:
            return [Accepted(event.peer_id, event.round, done.receipt, done.weight)]
        if event.peer_id not in rnd.orders:
            reason = "this peer has no work order for this round"
            return [self._reject(peer, event.round, "no_order", reason)]
        if event.base_version != rnd.base_version:
            reason = f"the contribution starts from version {event.base_version}, "
            reason += f"not {rnd.base_version}"
            return [self._reject(peer, event.round, "bad_base", reason)]
        if event.samples <= 0 or event.steps <= 0:
            reason = "a contribution must report a positive number of samples and steps"
            return [self._reject(peer, event.round, "bad_samples", reason)]
        sub = _Submission(
            peer_id=event.peer_id,
            delta=event.delta,
            weight=float(event.samples) * weight_factor,
            samples=event.samples,
            train_loss=event.train_loss,
            payload_bytes=event.payload_bytes,
            receipt=_receipt(event.peer_id, event.round, event.base_version),
            ref=event.ref,
        )
        if rnd is self._round:
            rnd.submissions[event.peer_id] = sub
        else:
            self._round.late[event.peer_id] = sub
            rnd.late[event.peer_id] = sub
        peer.accepted += 1
        peer.samples += event.samples
        peer.rounds.append(event.round)
        decisions: list[Decision] = [Accepted(event.peer_id, event.round, sub.receipt, sub.weight)]
        decisions.extend(self._maybe_close(now))
        return decisions

    # --- internals -----------------------------------------------------------------------

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
        return _Round(number, self.version, now, now + self.config.rounds.deadline_s)

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
        if self.finished:
            return []
        count = len(rnd.submissions) + len(rnd.late)
        if count < self.config.rounds.quorum:
            return []
        if now < rnd.deadline and (rnd.waiting_on() or not rnd.orders):
            return []
        return self._close(now)

    def _close(self, now: float) -> list[Decision]:
        rnd = self._round
        subs = list(rnd.submissions.values()) + list(rnd.late.values())
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
        self.version += 1
        total_weight = sum(s.weight for s in subs)
        closed = RoundClosed(
            round=rnd.number,
            new_version=self.version,
            contributors=tuple(s.peer_id for s in subs),
            weights=tuple(s.weight for s in subs),
            samples=sum(s.samples for s in subs),
            train_loss=sum(s.train_loss * s.weight for s in subs) / total_weight,
            payload_bytes=sum(s.payload_bytes for s in subs),
            scales=tuple(result.scales),
            tau=result.tau,
        )
        self.history.append(closed)
        self._previous = rnd
        decisions: list[Decision] = [closed]
        if rnd.number + 1 >= self.config.rounds.total:
            self.finished = True
            decisions.append(RunFinished(self.version))
        else:
            self._round = self._open_round(rnd.number + 1)
        return decisions
