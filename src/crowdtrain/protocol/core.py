"""The round protocol: a pure state machine for time-budgeted synchronous DiLoCo rounds.

Implements the round structure of DiLoCo (Douillard et al. 2023, arXiv:2311.08105): every peer
starts round r from the global weights θ_r, trains locally, and returns the pseudo-gradient
Δ = θ_r − θ_local; the coordinator aggregates the Δs (sample-weighted, robustly) and applies the
outer optimizer to get θ_{r+1}. A round closes early when every assigned peer has contributed
and the quorum is met, or at its deadline once the quorum is met; absent peers are simply absent.

Sans-IO in the style of h11: `RoundProtocol.handle(event)` takes an event and returns decisions.
It never touches the network or the disk, and reads time only from the clock it was given, so the
HTTP coordinator and the simulator drive exactly the same code. As in h11's `_state.py`, the
machine's states (`RunState`) and its transitions (`TRANSITIONS`, `LAST_ROUND_CLOSED`) are data
that tests read, and an event reaches its handler through a table (`RoundProtocol.HANDLERS`).

This module is the round itself and reads in the order a round runs: peers come and go, a round
opens and hands out work orders, contributions arrive, the round closes (robust aggregation and
the outer step) and the next one opens; then the administrator's events. What checks a
contribution (claims, screening, spot-checks, reputation, bans) is in `verification.py`, what
the machine remembers in `records.py`, and its JSON snapshot in `snapshot.py`.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from enum import Enum
from typing import Any, ClassVar, get_args

import torch

from crowdtrain.config import RunConfig
from crowdtrain.data import assign_shards
from crowdtrain.data.probe import ShardProbe
from crowdtrain.faults import crash_point
from crowdtrain.outer import OuterOptimizer, build_outer
from crowdtrain.protocol.broadcast import Broadcast
from crowdtrain.protocol.events import (
    Accepted,
    Banned,
    ContributionMalformed,
    ContributionSubmitted,
    DeadlineChanged,
    Decision,
    Event,
    PeerBanned,
    PeerJoined,
    PeerLeft,
    PeerRecord,
    PeerSeen,
    PeerUnbanned,
    RoundClosed,
    RunFinished,
    RunPaused,
    RunResumed,
    ScoreSubmitted,
    Tick,
    Unknown,
    Verdict,
    VerificationSubmitted,
    Wait,
    WorkOrder,
    WorkRequested,
)
from crowdtrain.protocol.records import Check, Round, Submission
from crowdtrain.protocol.snapshot import (
    Snapshot,
    check_format,
    snapshot_from_json,
    snapshot_to_json,
)
from crowdtrain.protocol.verification import (
    CHECK_LIFETIME_ROUNDS,
    VERDICTS_KEPT,
    Ledger,
    Verification,
    reject,
    replayable,
    secret_seed,
)
from crowdtrain.robust import DeltaSource, aggregate
from crowdtrain.robust.reputation import new_standing, seed_standing
from crowdtrain.train.moments import drift, publish, publish_derived

__all__ = [
    "CHECK_LIFETIME_ROUNDS",
    "EVENT_TYPES",
    "LAST_ROUND_CLOSED",
    "TRANSITIONS",
    "VERDICTS_KEPT",
    "Clock",
    "Handler",
    "RoundProtocol",
    "RunState",
    "replayable",
    "secret_seed",
]

Clock = Callable[[], float]
#: What handles one event type: (machine, event, now) -> decisions.
Handler = Callable[["RoundProtocol", Any, float], list[Decision]]


class RunState(Enum):
    """Where the run stands. Pausing is the administrator's switch and stops the open round's
    clock; it is independent of the rounds, so a finished run can be paused too."""

    COLLECTING = "collecting"  # a round is open: orders go out, contributions come in, it closes
    PAUSED = "paused"  # no work is handed out and no round closes; contributions are still taken
    FINISHED = "finished"  # the last round closed: no work, no contribution is accepted
    FINISHED_PAUSED = "finished_paused"  # as FINISHED; a resume moves the last round's clock

    @property
    def finished(self) -> bool:
        return self in (RunState.FINISHED, RunState.FINISHED_PAUSED)

    @property
    def paused(self) -> bool:
        return self in (RunState.PAUSED, RunState.FINISHED_PAUSED)

    @classmethod
    def of(cls, finished: bool, paused: bool) -> RunState:
        """The state with these two properties (how a snapshot records it)."""
        if finished:
            return cls.FINISHED_PAUSED if paused else cls.FINISHED
        return cls.PAUSED if paused else cls.COLLECTING


#: Every event type a driver may send.
EVENT_TYPES: tuple[type[Event], ...] = get_args(Event)


def _staying(state: RunState) -> dict[type[Event], RunState]:
    return dict.fromkeys(EVENT_TYPES, state)


#: (state, event type) -> the state the event moves the run to, before the event is handled.
#: Only pausing and resuming move it; every other event leaves the state as it is, and how it
#: is answered depends on the state (a request for work gets a Wait while paused and
#: RunFinished once finished; a contribution to a finished run is refused as "closed").
TRANSITIONS: Mapping[RunState, Mapping[type[Event], RunState]] = {
    RunState.COLLECTING: {**_staying(RunState.COLLECTING), RunPaused: RunState.PAUSED},
    RunState.PAUSED: {**_staying(RunState.PAUSED), RunResumed: RunState.COLLECTING},
    RunState.FINISHED: {**_staying(RunState.FINISHED), RunPaused: RunState.FINISHED_PAUSED},
    RunState.FINISHED_PAUSED: {
        **_staying(RunState.FINISHED_PAUSED),
        RunResumed: RunState.FINISHED,
    },
}

#: The transition the machine takes by itself while it handles an event (as h11's
#: state-triggered ones): rounds close only while COLLECTING, and the close of the last round
#: finishes the run.
LAST_ROUND_CLOSED: Mapping[RunState, RunState] = {RunState.COLLECTING: RunState.FINISHED}


#: The pseudo-peer whose batches the published moments' gradients are computed on.
MOMENTS_PEER = "~moments"


def _receipt(peer_id: str, round_number: int, base_version: int) -> str:
    return hashlib.sha256(f"{peer_id}\x00{round_number}\x00{base_version}".encode()).hexdigest()[
        :24
    ]


class _Laps:
    """Wall seconds between calls, by name (diagnostics only: no decision depends on them)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self._last
        self._last = now


def _stranger(peer_id: str) -> Unknown:
    return Unknown(peer_id, "no peer with this id has joined the run")


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
        self.broadcast = Broadcast(config.broadcast, self.shapes)
        self.train_shards = tuple(train_shards)
        self.version = 0
        self.peers: dict[str, PeerRecord] = {}
        self.last_aggregate: dict[str, torch.Tensor] | None = None
        self.history: list[RoundClosed] = []
        self.verification = Verification(config, self.shapes, probe=probe, secret=secret)
        self.probe = probe
        self.workers = 1  # threads a close aggregates with (the driver's machine, not the run)
        self.close_timing: dict[str, float] = {}  # seconds of each step of the last close
        # The AdamW moments published with θ (inner.optimizer_state "published"; needs a probe).
        self.moments: dict[str, torch.Tensor] = {}
        self.state = RunState.COLLECTING
        self.paused_at: float | None = None  # when an administrator paused the run
        self.round_seconds = config.rounds.deadline_s  # an administrator may change it
        self._round = self._open_round(0)
        self._previous: Round | None = None

    # --- what drivers read ---------------------------------------------------------------

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
    def finished(self) -> bool:
        """Whether the last round has closed."""
        return self.state.finished

    @property
    def paused(self) -> bool:
        """Whether an administrator has paused the run."""
        return self.state.paused

    @property
    def defended(self) -> bool:
        """Whether the verification stages beyond the format check are on."""
        return self.verification.enabled

    @property
    def checks(self) -> dict[str, Check]:
        """Pending spot-checks by id."""
        return self.verification.checks

    @property
    def fingerprints(self) -> dict[str, torch.Tensor]:
        """Copy-detection fingerprints of recent accepted contributions, by "round/peer"."""
        return self.verification.fingerprints

    @property
    def verdicts(self) -> list[Verdict]:
        """The verification pipeline's recorded decisions, oldest first."""
        return self.verification.verdicts

    @property
    def scored(self) -> int:
        """Usefulness evaluations so far."""
        return self.verification.scored

    def assigned(self) -> dict[str, WorkOrder]:
        """The work orders handed out in the open round."""
        return dict(self._round.orders)

    def submitted(self) -> tuple[str, ...]:
        """Peers whose contribution to the open round is recorded."""
        return tuple(self._round.submissions)

    def analysis_job(self, peer_id: str, round_number: int) -> Callable[[], None] | None:
        """What the close would compute for the contribution PEER_ID just had accepted for
        ROUND_NUMBER from it alone (its norm and fingerprint: `screening.analyze`) and the
        usefulness scores due by then (`screening.to_score`), as a job a driver may run in
        any thread as soon as the contribution arrives; the close reuses its result if it
        finished (the same numbers either way) and computes it otherwise. None when there is
        nothing to do. Call it under the driver's lock; the job itself reads only immutable
        inputs, so it needs none."""
        rnd = self._round
        sub = rnd.submissions.get(peer_id) if round_number == rnd.number else None
        if sub is None:
            sub = rnd.late.get(peer_id)
        if sub is None or sub.round != round_number:
            return None
        subs = [*rnd.submissions.values(), *rnd.late.values()]
        expected = max(len(rnd.orders), self.config.rounds.quorum)
        return self.verification.analysis_job(
            rnd.number, self.version, sub, subs, expected, self._ledger()
        )

    # --- events in, decisions out --------------------------------------------------------

    def handle(self, event: Event) -> list[Decision]:
        """Apply one event and return the decisions it causes, in order."""
        now = self.clock()
        # The event's own type, or the nearest base that has a handler (as isinstance would).
        kind = next((k for k in type(event).__mro__ if k in self.HANDLERS), None)
        if kind is None:
            raise TypeError(f"unknown event type {type(event).__name__}")
        self._enter(TRANSITIONS[self.state][kind], now)
        return self.HANDLERS[kind](self, event, now)

    def delay_open(self, seconds: float) -> None:
        """The open round's opening and deadline move on by SECONDS. The simulator's close
        takes no time on the protocol's clock, so it says how long the real one would have
        taken (`sim.coordinator_cost`); the HTTP coordinator's clock runs during its close, and
        its rounds open after it."""
        if not (seconds >= 0.0 and math.isfinite(seconds)):
            raise ValueError(
                f"a round's opening moves on by a finite non-negative time, not {seconds}"
            )
        self._round.opened_at += seconds
        self._round.deadline += seconds

    def _enter(self, state: RunState, now: float) -> None:
        """Move the run to STATE. A pause stops the clock of the open round: resuming moves
        its opening and deadline on by the pause, so no peer loses time to it."""
        if state.paused and not self.state.paused:
            self.paused_at = now
        elif self.state.paused and not state.paused and self.paused_at is not None:
            shift = max(0.0, now - self.paused_at)
            self._round.opened_at += shift
            self._round.deadline += shift
            self.paused_at = None
        self.state = state

    # --- peers come and go ---------------------------------------------------------------

    def _on_joined(self, event: PeerJoined, now: float) -> list[Decision]:
        peer = self.peers.get(event.peer_id)
        if peer is None:
            make = seed_standing if event.seed else new_standing
            standing = make(self.config.defence)
            self.peers[event.peer_id] = PeerRecord(
                event.peer_id, event.name, now, now, standing=standing
            )
        else:
            peer.online, peer.last_seen = True, now
        return []

    def _on_seen(self, event: PeerSeen, now: float) -> list[Decision]:
        peer = self.peers.get(event.peer_id)
        if peer is None:
            return [_stranger(event.peer_id)]
        peer.online, peer.last_seen = True, now
        return []

    def _on_left(self, event: PeerLeft, now: float) -> list[Decision]:
        peer = self.peers.get(event.peer_id)
        if peer is None:
            return [_stranger(event.peer_id)]
        peer.last_seen = now
        self._gone(peer)
        return self._maybe_close(now)

    def _on_tick(self, event: Tick, now: float) -> list[Decision]:
        """Peers not heard from for `rounds.peer_timeout_s` are gone; the round may close."""
        cutoff = now - self.config.rounds.peer_timeout_s
        for peer in self.peers.values():
            if peer.online and peer.last_seen < cutoff:
                self._gone(peer)
        return self._maybe_close(now)

    def _gone(self, peer: PeerRecord) -> None:
        """A peer went offline: its order lapses unless its contribution is in."""
        peer.online = False
        if peer.peer_id not in self._round.submissions:
            self._round.orders.pop(peer.peer_id, None)

    # --- a round opens and hands out work ------------------------------------------------

    def _open_round(self, number: int) -> Round:
        now = self.clock()
        return Round(number, self.version, now, now + self.round_seconds)

    def _on_work(self, event: WorkRequested, now: float) -> list[Decision]:
        peer = self.peers.get(event.peer_id)
        if peer is None:
            return [_stranger(event.peer_id)]
        peer.online, peer.last_seen = True, now
        if peer.standing.banned:
            return [Banned(peer.peer_id, peer.standing.ban_reason)]
        if self.state.finished:  # training is over; the checks of its last rounds still run
            check = self.verification.check_for(peer, now)
            return [check] if check is not None else [RunFinished(self.version)]
        if self.state is RunState.PAUSED:
            return [Wait(event.peer_id, 2.0, "the run is paused by its organizer")]
        rnd = self._round
        if event.peer_id in rnd.submissions:
            # Its contribution is in: it waits for the next round, so a check costs none.
            check = self.verification.check_for(peer, now)
            if check is not None:
                return [check]
            return [Wait(event.peer_id, 0.25, "your contribution to this round is in")]
        order = rnd.orders.get(event.peer_id)
        if order is not None:  # it owes this round its contribution
            return [order]
        # Its own work comes first: checks go to peers that cannot take part in the open round
        # (their contribution is in, or they came too late for it), so verifying never keeps
        # a volunteer out of a round it could have trained in.
        late = self._cannot_join(rnd, now, event.peer_id)
        if isinstance(late, Wait):
            check = self.verification.check_for(peer, now)
            return [check if check is not None else replace(late, peer_id=event.peer_id)]
        order = self._make_order(event.peer_id, rnd)
        if late is not None:  # past the join window: what is left of the round's work
            order = replace(order, max_seconds=late)
        rnd.orders[event.peer_id] = order
        return [order]

    def _cannot_join(self, rnd: Round, now: float, peer_id: str) -> Wait | float | None:
        """Why PEER_ID, without an order, cannot have a full one in RND now: a Wait (for the
        next round; its peer id left empty), the work seconds of a shortened late order
        (`RunConfig.late_order_s`), or None (it can). A late order goes only to a peer that
        contributed to the round before: it holds that base, so it fetches only what the
        peers in the window fetched and ends with them; one that must first download all of
        θ would hold the close."""
        cfg = self.config
        if len(rnd.orders) >= cfg.rounds.max_peers_per_round:
            return Wait("", 1.0, "this round has all the peers it can take")
        if len(rnd.orders) < cfg.rounds.quorum:
            return None  # a round still short of its quorum's orders takes anyone
        if now >= rnd.deadline:
            # It closes as soon as its quorum of contributions is in: new work would be refused.
            reason = "this round is past its deadline; your work starts with the next round"
            return Wait("", 1.0, reason)
        if now <= rnd.opened_at + cfg.join_window_s(self.round_seconds, len(rnd.orders)):
            return None
        late = cfg.late_order_s(now - rnd.opened_at)
        previous = self._previous
        if late is not None and previous is not None and peer_id in previous.submissions:
            return late
        retry = max(0.5, min(5.0, rnd.deadline - now))
        reason = "this round is past its join window; your work starts with the next round"
        return Wait("", retry, reason)

    def _make_order(self, peer_id: str, rnd: Round) -> WorkOrder:
        """PEER's work order in RND: a pure function of the two, so anyone can replay it."""
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

    # --- contributions arrive ------------------------------------------------------------

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

    def _round_for(self, number: int) -> tuple[Round | None, float]:
        """The round a contribution to round NUMBER goes to, and its weight factor: the open
        one, or (with `rounds.late = "accept"`) the last one at `late_weight`."""
        if number == self._round.number and not self.state.finished:
            return self._round, 1.0
        late_ok = self.config.rounds.late == "accept" and not self.state.finished
        if late_ok and self._previous is not None and number == self._previous.number:
            return self._previous, self.config.rounds.late_weight
        return None, 0.0

    def _on_contribution(self, event: ContributionSubmitted, now: float) -> list[Decision]:
        peer = self._uploader(event.peer_id, now)
        if not isinstance(peer, PeerRecord):
            return [peer]
        rnd, late_factor = self._round_for(event.round)
        if rnd is None:
            return [reject(peer, event.round, "closed", "this round is closed")]
        done = rnd.submissions.get(event.peer_id)
        if done is None and rnd is not self._round:  # the open round's `late` is the last's
            done = rnd.late.get(event.peer_id)
        if done is not None:
            return [Accepted(event.peer_id, event.round, done.receipt, done.weight)]
        order = rnd.orders.get(event.peer_id)
        if order is None:
            reason = "this peer has no work order for this round"
            return [reject(peer, event.round, "no_order", reason)]
        if event.base_version != rnd.base_version:
            reason = f"the contribution starts from version {event.base_version}, "
            reason += f"not {rnd.base_version}"
            return [reject(peer, event.round, "bad_base", reason)]
        if event.samples <= 0 or event.steps <= 0:
            reason = "a contribution must report a positive number of samples and steps"
            return [reject(peer, event.round, "bad_samples", reason)]
        round_steps = [s.steps for s in rnd.submissions.values()]
        refusal = self.verification.check_claims(
            peer, event, order, round_steps, self._ledger(), now
        )
        if refusal:
            return [*refusal, *self._after_bans(refusal, now)]
        overlap = self.verification.check_overlap(peer, event, self._ledger(), now)
        if isinstance(overlap, list):
            return [*overlap, *self._after_bans(overlap, now)]
        overlap_steps, overlap_round, overlap_first_batch = overlap
        factor = late_factor * self.verification.probation_factor(peer)
        sub = Submission(
            peer_id=event.peer_id,
            delta=event.delta,
            weight=float(event.samples) * factor,
            samples=event.samples,
            train_loss=event.train_loss,
            payload_bytes=event.payload_bytes,
            receipt=_receipt(event.peer_id, event.round, event.base_version),
            ref=event.ref,
            steps=event.steps,
            overlap_steps=overlap_steps,
            round=event.round,
            overlap_round=overlap_round,
            overlap_first_batch=overlap_first_batch,
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
        refusal = self.verification.malformed(peer, event.round, event.reason, self._ledger(), now)
        return [*refusal, *self._after_bans(refusal, now)]

    def _on_verification(self, event: VerificationSubmitted, now: float) -> list[Decision]:
        decisions = self.verification.judge(event, self._ledger(), now)
        return [*decisions, *self._after_bans(decisions, now)]

    def _on_score(self, event: ScoreSubmitted, now: float) -> list[Decision]:
        decisions = self.verification.judge_score(event, self._ledger(), now)
        return [*decisions, *self._after_bans(decisions, now)]

    # --- the round closes: aggregation, outer step, the next round -----------------------

    def _maybe_close(self, now: float) -> list[Decision]:
        rnd = self._round
        if self.state is not RunState.COLLECTING:
            return []
        count = len(rnd.submissions) + len(rnd.late)
        if count < self.config.rounds.quorum:
            return []
        if now < rnd.deadline and (rnd.waiting_on() or not rnd.orders):
            return []
        return self._close(now)

    def _close(self, now: float) -> list[Decision]:
        rnd, cfg = self._round, self.config
        subs = [*rnd.submissions.values(), *rnd.late.values()]
        decisions: list[Decision] = []
        lap = _Laps()  # seconds of each step, for the driver's metrics and benchmarks
        if self.defended:
            common = drift(self.moments, cfg.inner, self.shapes, self._steps_of(rnd.number))
            decisions.extend(
                self.verification.screen(
                    rnd.number, self.version, subs, self._ledger(), now, common
                )
            )
            lap("screen_s")
        if subs:
            crash_point("close.before_aggregate")
            result = aggregate(
                [s.delta for s in subs],
                [s.weight for s in subs],
                self.shapes,
                self.config.aggregation,
                reference=self.last_aggregate,
                seed=self.config.seed * 1_000_003 + rnd.number,
                workers=self.workers,
                distances=False,  # the screening stages measured what they need on arrival
            )
            lap("aggregate_s")
            # θ is replaced, never changed in place: an analysis job may still read θ_r.
            before = self.params
            self.params = {k: t.clone() for k, t in before.items()}
            self.outer.step(self.params, result.delta)
            crash_point("close.after_outer_step")
            lap("outer_s")
            self.broadcast.publish(before, self.params)
            lap("broadcast_s")
            self.last_aggregate = result.delta
            if self._publishes():
                self.moments = self._published_moments(rnd.number, before, len(subs))
                lap("moments_s")
            scales, tau = tuple(result.scales), result.tau
        else:
            scales, tau = (), None  # every contribution was flagged: θ stays as it was
            self.broadcast.update = None
        self.close_timing = lap.laps
        if self.defended:
            decisions.extend(
                self.verification.schedule(rnd.number, self.version, subs, self._ledger(), now)
            )
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
            self._enter(LAST_ROUND_CLOSED[self.state], now)
            decisions.append(RunFinished(self.version))
        else:
            self._round = self._open_round(rnd.number + 1)
        return decisions

    def _publishes(self) -> bool:
        state = self.config.inner.optimizer_state
        return state == "derived" or (state == "published" and self.probe is not None)

    def _published_moments(
        self, number: int, before: Mapping[str, torch.Tensor], workers: int
    ) -> dict[str, torch.Tensor]:
        """The moments round NUMBER + 1 starts from (``train.moments.publish``): gradients on
        batches drawn like a work order's for the pseudo-peer ``MOMENTS_PEER``, public data;
        the second moment is that of the mean of `workers` (the contributions round NUMBER
        averaged) workers' gradients. A derived base (``inner.optimizer_state = "derived"``)
        carries only the round's mean steps and `workers` (``train.moments.publish_derived``):
        no model pass."""
        cfg = self.config
        if cfg.inner.optimizer_state == "derived":
            return publish_derived(
                cfg.inner, before, self.params, round_steps=self._steps_of(number), workers=workers
            )
        assert self.probe is not None
        shards = assign_shards(
            self.train_shards,
            seed=cfg.data.seed,
            round=number,
            peer=MOMENTS_PEER,
            k=min(cfg.data.shards_per_peer, len(self.train_shards)),
        )
        per = self.probe.batches_needed()
        batches = [
            self.probe.assigned(shards, seed=cfg.seed, round=number, peer=MOMENTS_PEER, index=i)
            for i in range(0, per * cfg.inner.moment_batches, per)
        ]
        return publish(
            cfg.model,
            cfg.inner,
            before,
            self.params,
            batches,
            round_steps=self._steps_of(number),
            workers=workers,
        )

    def _steps_of(self, number: int) -> range:
        """The global indices of round NUMBER's inner steps (work orders' step offsets)."""
        return range(number * self.config.inner.steps, (number + 1) * self.config.inner.steps)

    def base(self) -> dict[str, torch.Tensor]:
        """What a round starting now trains from: copies of θ and of the published moments."""
        return {k: t.clone() for k, t in {**self.params, **self.moments}.items()}

    # --- the administrator ---------------------------------------------------------------

    def _on_paused(self, event: RunPaused, now: float) -> list[Decision]:
        return []  # the transition stopped the clock

    def _on_resumed(self, event: RunResumed, now: float) -> list[Decision]:
        return self._maybe_close(now)  # the transition restarted the clock

    def _on_deadline(self, event: DeadlineChanged, now: float) -> list[Decision]:
        if not event.deadline_in > 0 or (
            event.round_seconds is not None and not event.round_seconds > 0
        ):
            raise ValueError("a deadline must be a positive number of seconds")
        self._round.deadline = now + event.deadline_in
        if event.round_seconds is not None:
            self.round_seconds = float(event.round_seconds)
        return self._maybe_close(now)

    def _on_banned(self, event: PeerBanned, now: float) -> list[Decision]:
        peer = self.peers.get(event.peer_id)
        if peer is None:
            return [_stranger(event.peer_id)]
        banned = self.verification.ban(peer, self._round.number, event.reason, self._ledger(), now)
        return [*banned, *self._maybe_close(now)]

    def _on_unbanned(self, event: PeerUnbanned, now: float) -> list[Decision]:
        peer = self.peers.get(event.peer_id)
        if peer is None:
            return [_stranger(event.peer_id)]
        self.verification.unban(peer, self._round.number, now)
        return []

    # --- what verification reads of the rounds, and asks of them -------------------------

    def _ledger(self) -> Ledger:
        return Ledger(
            self.peers,
            self._previous,
            self._order_of,
            self.params,
            self.last_aggregate,
            self._drop_work,
        )

    def _order_of(self, sub: Submission) -> WorkOrder:
        """The work order a contribution answered (recomputed if it lapsed: it is a pure
        function of the round and the peer)."""
        for rnd in (self._round, self._previous):
            if rnd is not None and rnd.number == sub.round:
                return rnd.orders.get(sub.peer_id) or self._make_order(sub.peer_id, rnd)
        raise ValueError(f"round {sub.round} is neither the open nor the last round")

    def _drop_work(self, peer_id: str) -> None:
        """A banned peer's open order and unaggregated contributions are dropped."""
        self._round.orders.pop(peer_id, None)
        self._round.submissions.pop(peer_id, None)
        self._round.late.pop(peer_id, None)

    def _after_bans(self, decisions: Sequence[Decision], now: float) -> list[Decision]:
        """A ban among DECISIONS may have removed the last peer the round waited on."""
        if any(isinstance(d, Banned) for d in decisions):
            return self._maybe_close(now)
        return []

    # --- persistence (the JSON codec is snapshot.py) -------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The protocol's state as JSON, except the tensors (see `tensors`) and the history.

        Contributions appear by their `ref`; a driver that persists this document after every
        accepted contribution, and the tensors after every closed round, can `restore` exactly.
        """
        return snapshot_to_json(
            Snapshot(
                version=self.version,
                finished=self.finished,
                round=self._round,
                previous=self._previous,
                peers=self.peers,
                checks=self.checks,
                verdicts=self.verdicts[-VERDICTS_KEPT:],
                scored=self.scored,
                paused_at=self.paused_at,
                round_seconds=self.round_seconds,
            )
        )

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """θ, the outer optimizer's state, the last aggregate, the copy-detection
        fingerprints of recent rounds, the published moments and the broadcast's residual:
        what changes at a close."""
        return {
            "params": self.params,
            "outer": self.outer.state_dict(),
            "broadcast": self.broadcast.residual,
            "aggregate": dict(self.last_aggregate or {}),
            "fingerprints": dict(self.fingerprints),
            "moments": self.moments,
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
        check_format(snapshot)
        proto = cls(config, tensors["params"], train_shards, clock, probe=probe, secret=secret)
        proto.outer.load_state_dict(tensors["outer"])
        proto.last_aggregate = dict(tensors["aggregate"]) or None
        proto.moments = dict(tensors.get("moments", {}))
        proto.broadcast.residual = dict(tensors.get("broadcast", {}))
        verification = proto.verification
        verification.fingerprints = dict(tensors.get("fingerprints", {}))
        saved = snapshot_from_json(snapshot, source)
        proto.version = saved.version
        proto._round, proto._previous = saved.round, saved.previous
        proto.peers = saved.peers
        verification.checks = saved.checks
        verification.verdicts = saved.verdicts
        verification.scored = saved.scored
        proto.paused_at = saved.paused_at
        proto.state = RunState.of(saved.finished, saved.paused_at is not None)
        if saved.round_seconds is not None:
            proto.round_seconds = saved.round_seconds
        return proto

    #: Event type -> its handler (dispatch is by table, as the transitions are).
    HANDLERS: ClassVar[Mapping[type[Any], Handler]] = {
        PeerJoined: _on_joined,
        PeerSeen: _on_seen,
        PeerLeft: _on_left,
        Tick: _on_tick,
        WorkRequested: _on_work,
        ContributionSubmitted: _on_contribution,
        ContributionMalformed: _on_malformed,
        VerificationSubmitted: _on_verification,
        ScoreSubmitted: _on_score,
        RunPaused: _on_paused,
        RunResumed: _on_resumed,
        DeadlineChanged: _on_deadline,
        PeerBanned: _on_banned,
        PeerUnbanned: _on_unbanned,
    }
