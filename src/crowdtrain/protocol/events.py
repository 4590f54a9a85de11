"""Events into and decisions out of the round protocol (sans-IO, in the style of h11).

Drivers (the HTTP coordinator, the in-process swarm, the simulator) turn what happens to them
into these events, feed them to `RoundProtocol.handle`, and act on the decisions they get back.
Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from crowdtrain.robust import DeltaSource
from crowdtrain.robust.reputation import Standing
from crowdtrain.robust.usefulness import Score

# --- events (driver -> protocol) -------------------------------------------------------------


@dataclass(frozen=True)
class PeerJoined:
    """A volunteer registered (or re-registered) under `peer_id`. `seed`: the organizer
    vouches for it (a seed volunteer, e.g. the organizer's own machine): it starts established,
    so that a run has a reference fresh identities cannot outvote from its first round."""

    peer_id: str
    name: str = ""
    seed: bool = False


@dataclass(frozen=True)
class PeerLeft:
    """A volunteer said goodbye or was declared gone by the driver."""

    peer_id: str


@dataclass(frozen=True)
class PeerSeen:
    """A volunteer showed it is alive (a heartbeat) without asking for anything."""

    peer_id: str


@dataclass(frozen=True)
class WorkRequested:
    """A volunteer asks what to do next."""

    peer_id: str


@dataclass(frozen=True)
class ContributionSubmitted:
    """A volunteer's decoded, format-checked pseudo-gradient for one round."""

    peer_id: str
    round: int
    base_version: int
    delta: DeltaSource
    samples: int
    tokens: int
    steps: int
    train_loss: float
    payload_bytes: int = 0
    ref: str = ""  # the driver's durable handle of `delta` (a blob id), kept in snapshots
    # Overlap: the first `overlap_steps` steps were trained before the base arrived, continuing
    # the work order of round `overlap_round` (-1: none) from its batch `overlap_first_batch`,
    # starting at that round's base minus the Δ this peer sent for it (then rebased).
    overlap_steps: int = 0
    overlap_round: int = -1
    overlap_first_batch: int = 0


@dataclass(frozen=True)
class ContributionMalformed:
    """The driver could not accept a payload's format (the first stage of verification)."""

    peer_id: str
    round: int
    reason: str


@dataclass(frozen=True)
class VerificationSubmitted:
    """The result of a replayed work order: Δ' recomputed by a verifier (or the coordinator)."""

    check_id: str
    peer_id: str  # the verifier; "" when the coordinator replayed it itself
    delta: DeltaSource
    steps: int
    ref: str = ""


@dataclass(frozen=True)
class ScoreSubmitted:
    """A verifier's usefulness score of another peer's contribution (a `ScoreOrder`)."""

    check_id: str
    peer_id: str
    score: Score


@dataclass(frozen=True)
class PeerBanned:
    """An administrator bans a peer (reason recorded)."""

    peer_id: str
    reason: str


@dataclass(frozen=True)
class PeerUnbanned:
    """An administrator lifts a peer's ban: its strikes are cleared and it may work again."""

    peer_id: str


@dataclass(frozen=True)
class RunPaused:
    """An administrator pauses the run: no new work is handed out and no round closes."""


@dataclass(frozen=True)
class RunResumed:
    """An administrator resumes a paused run; the open round's deadline moves by the pause."""


@dataclass(frozen=True)
class DeadlineChanged:
    """An administrator moves the open round's deadline to `deadline_in` seconds from now and,
    with `round_seconds`, sets the deadline length of the rounds that follow."""

    deadline_in: float
    round_seconds: float | None = None


@dataclass(frozen=True)
class Tick:
    """Time passed; the protocol reads the current time from its injected clock."""


Event = (
    PeerJoined
    | PeerLeft
    | PeerSeen
    | WorkRequested
    | ContributionSubmitted
    | ContributionMalformed
    | VerificationSubmitted
    | ScoreSubmitted
    | PeerBanned
    | PeerUnbanned
    | RunPaused
    | RunResumed
    | DeadlineChanged
    | Tick
)


# --- decisions (protocol -> driver) ----------------------------------------------------------


@dataclass(frozen=True)
class WorkOrder:
    """What one volunteer trains in one round: everything needed to replay it exactly."""

    peer_id: str
    round: int
    base_version: int
    shard_ids: tuple[str, ...]
    seed: int
    step_offset: int
    budget: str
    max_steps: int
    max_seconds: float
    deadline: float


@dataclass(frozen=True)
class PriorWork:
    """The overlapped start of a spot-checked contribution: previous-round work to replay first.

    The peer kept training round `round`'s work order while its upload travelled (Streaming
    DiLoCo's overlap), from θ_s = θ_{base_version} − decode(payload `payload_ref`), i.e. from
    what it sent for that round. A replay trains `steps` steps from θ_s on that order's batches
    (keyed by the target) from batch `first_batch`, at step offset `step_offset + first_batch`,
    with a fresh optimizer; that progress Δ_c is rebased onto the checked order's base.
    """

    round: int
    base_version: int
    shard_ids: tuple[str, ...]
    seed: int
    step_offset: int
    first_batch: int
    steps: int
    payload_ref: str


@dataclass(frozen=True)
class VerifyOrder:
    """Replay another peer's work order exactly: same base, shards, seed, offset and steps.

    `target` is the peer whose batches to draw (the sampler is keyed by it); the verifier
    trains `steps` steps from version `base_version` and submits Δ' (recomputation spot-check).
    With `prior` (an overlapped contribution), the first `prior.steps` of them are the
    previous round's work (see PriorWork), rebased onto θ_base; the rest start at batch 0.
    """

    check_id: str
    peer_id: str  # who replays it ("" for the coordinator)
    target: str
    round: int
    base_version: int
    shard_ids: tuple[str, ...]
    seed: int
    step_offset: int
    steps: int
    prior: PriorWork | None = None


@dataclass(frozen=True)
class ScoreOrder:
    """Score another peer's contribution, as the coordinator's usefulness stage would: the
    losses of θ (version `base_version`) and of θ − Δ (Δ the payload blob `payload_ref`) on
    `target`'s assigned batches from batch `assigned_batch` of its order (`shard_ids`,
    `seed`, `round`; the sampler is keyed by the target) and on held-out batch
    `heldout_batch` (`data.probe.ShardProbe`), then submit the four losses."""

    check_id: str
    peer_id: str  # who scores it
    target: str
    round: int
    base_version: int
    shard_ids: tuple[str, ...]
    seed: int
    step_offset: int
    assigned_batch: int
    heldout_batch: int
    payload_ref: str


@dataclass(frozen=True)
class Wait:
    """No work right now; ask again after `retry_after` seconds."""

    peer_id: str
    retry_after: float
    reason: str


@dataclass(frozen=True)
class Accepted:
    """A contribution is recorded; `receipt` is stable for a repeated submission."""

    peer_id: str
    round: int
    receipt: str
    weight: float


@dataclass(frozen=True)
class Rejected:
    """A contribution is refused; `reason` is one sentence, `code` is machine-readable."""

    peer_id: str
    round: int
    code: str
    reason: str


@dataclass(frozen=True)
class Flagged:
    """A verification stage excluded an accepted contribution (at the round's close, or later
    by a failed spot-check, which voids its credit)."""

    peer_id: str
    round: int
    stage: str
    reason: str


@dataclass(frozen=True)
class Banned:
    """A peer is banned: its work is refused from now on."""

    peer_id: str
    reason: str


@dataclass(frozen=True)
class CheckDone:
    """A spot-check ended; `passed` tells whether the replay matched the contribution."""

    check_id: str
    target: str
    round: int
    verifier: str
    passed: bool
    reason: str


@dataclass(frozen=True)
class CheckReported:
    """A verifier's replay was recorded; the check waits for more verifiers to agree."""

    check_id: str
    target: str
    round: int
    verifier: str


@dataclass(frozen=True)
class RoundClosed:
    """A round ended: its contributions were aggregated and the outer step produced a version."""

    round: int
    new_version: int
    contributors: tuple[str, ...]
    weights: tuple[float, ...]
    samples: int
    train_loss: float
    payload_bytes: int
    scales: tuple[float, ...] = ()
    tau: float | None = None


@dataclass(frozen=True)
class RunFinished:
    """The configured number of rounds is done."""

    rounds: int


@dataclass(frozen=True)
class Unknown:
    """The event named a peer the protocol does not know."""

    peer_id: str
    reason: str


Decision = (
    WorkOrder
    | VerifyOrder
    | ScoreOrder
    | Wait
    | Accepted
    | Rejected
    | Flagged
    | Banned
    | CheckDone
    | CheckReported
    | RoundClosed
    | RunFinished
    | Unknown
)


@dataclass(frozen=True)
class Verdict:
    """One recorded decision of the verification pipeline, for the status API and audits."""

    time: float
    peer_id: str
    round: int
    stage: str  # format, claims, norm, copy, usefulness, spot_check, reputation, admin, ...
    outcome: str  # rejected, flagged, banned, check_passed, check_failed, check_expired
    reason: str


@dataclass
class PeerRecord:
    """What the protocol knows about one volunteer."""

    peer_id: str
    name: str
    joined_at: float
    last_seen: float
    online: bool = True
    samples: int = 0
    accepted: int = 0
    rejected: int = 0  # refused at upload
    flagged: int = 0  # accepted, then excluded at the close or voided by a failed spot-check
    rounds: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)  # steps of recent accepted rounds
    standing: Standing = field(default_factory=lambda: Standing(score=0.0))
