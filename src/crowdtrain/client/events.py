"""What the volunteer's machine (`client/machine.py`) takes and gives: events in, decisions out.

Drivers (the HTTP client, the in-process swarm, the discrete-event simulator) turn what happens
to them into these events, feed them to `VolunteerMachine.handle`, and carry out the decisions
they get back (as `h11/_events.py` is to h11's connection). Every decision that needs an answer
gets exactly one event back:

    AskForWork        -> GotWork | GotCheck | GotScore | GotWait | GotFinished | GotBanned
    Wait              -> Woke
    Fetch             -> InputsReady
    Train, Replay     -> Trained
    Evaluate          -> Evaluated
    StopSpeculation   -> SpeculationEnded
    Upload, UploadReplay, UploadScore -> Uploaded

`Speculate`, `PauseSpeculation` and `ResumeSpeculation` need none: the driver starts, pauses or
resumes overlapped training (Streaming DiLoCo, Douillard et al. 2025, arXiv:2501.18512) and goes
on with the next decision. `Stop` ends the machine. Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from crowdtrain.adversary import Claim
from crowdtrain.client.work import (
    Batch,
    CheckLike,
    Params,
    ScoreLike,
    Stream,
    TrainFn,
    WorkLike,
    replay_check,
    score_contribution,
)
from crowdtrain.config import RunConfig
from crowdtrain.robust.usefulness import Score, Scorers
from crowdtrain.train import Contribution

# --- events (driver -> machine) --------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """The volunteer has joined and pinned the run's manifest."""


@dataclass(frozen=True)
class GotWork:
    """The coordinator handed out a work order."""

    order: WorkLike


@dataclass(frozen=True)
class GotCheck:
    """The coordinator asks this (trusted) volunteer to replay another peer's work order."""

    check: CheckLike


@dataclass(frozen=True)
class GotScore:
    """The coordinator asks this (trusted) volunteer to score another peer's contribution."""

    check: ScoreLike


@dataclass(frozen=True)
class GotWait:
    """No work now; the coordinator says to ask again after `retry_after` seconds."""

    retry_after: float
    reason: str


@dataclass(frozen=True)
class GotFinished:
    """The run is over."""


@dataclass(frozen=True)
class GotBanned:
    """The coordinator banned this volunteer (any call may say so)."""

    reason: str


@dataclass(frozen=True)
class Woke:
    """The wait a `Wait` asked for is over."""


@dataclass(frozen=True)
class InputsReady:
    """Everything the order needs is here: θ_base, and for a replay of overlapped work where
    the overlapped steps began, θ_prior − decode(prior payload) (`client.work.overlap_start`).
    The driver has the shards."""

    base: Params
    prior: Params | None = None
    target: Params | None = None  # for a score order: the contribution's Δ, decoded


@dataclass(frozen=True)
class Trained:
    """The last `Train` or `Replay` finished with this result."""

    result: Contribution


@dataclass(frozen=True)
class Evaluated:
    """The last `Evaluate` finished with this score."""

    score: Score


@dataclass(frozen=True)
class SpeculationEnded:
    """Overlapped training stopped; `result` is its progress (None: not one step was taken)."""

    result: Contribution | None


@dataclass(frozen=True)
class Uploaded:
    """The upload was acknowledged (`accepted`) or refused for this round only."""

    accepted: bool


Event = (
    Start
    | GotWork
    | GotCheck
    | GotScore
    | GotWait
    | GotFinished
    | GotBanned
    | Woke
    | InputsReady
    | Trained
    | Evaluated
    | SpeculationEnded
    | Uploaded
)


# --- decisions (machine -> driver) -----------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One call of the trainer: from `start` (default `base`), Δ measured from `base`, on the
    batches of `stream` for `peer` from batch `first_batch`, the first at `step_offset`, for
    `max_steps` steps or `max_seconds` seconds (exactly one is set)."""

    base: Params
    start: Params | None
    stream: Stream
    peer: str
    first_batch: int
    step_offset: int
    max_steps: int | None
    max_seconds: float | None
    poisoned: bool = False  # an attacker's own training: batches pass through its poison

    def run(self, train: TrainFn, batches: Iterator[Batch], **extra: Any) -> Contribution:
        """Run this segment with `train` (`LocalTrainer.train` or a wrapper of it)."""
        return train(
            self.base,
            batches,
            step_offset=self.step_offset,
            max_steps=self.max_steps,
            max_seconds=self.max_seconds,
            start=self.start,
            **extra,
        )


@dataclass(frozen=True)
class AskForWork:
    """Ask the coordinator what to do next."""


@dataclass(frozen=True)
class Wait:
    """Ask again after `seconds` (the coordinator said so, with `reason`)."""

    seconds: float
    reason: str


@dataclass(frozen=True)
class Fetch:
    """Download (or find cached) what `order` needs: its shards and θ of its base version; for
    a spot-check of overlapped work also θ of the prior version and the prior payload; for a
    score order the scored payload (decoded into `InputsReady.target`) and the validation
    shards."""

    order: WorkLike | CheckLike | ScoreLike


@dataclass(frozen=True)
class Train:
    """Train `segment` of round `round`'s work order and answer `Trained`."""

    round: int
    segment: Segment


@dataclass(frozen=True)
class Replay:
    """Replay `check` exactly (`client.work.replay_check`) and answer `Trained`."""

    check: CheckLike
    base: Params
    prior: Params | None

    def run(
        self, train: TrainFn, shards: Mapping[str, npt.NDArray[np.uint8]], config: RunConfig
    ) -> Contribution:
        """The replay's result, computed with `train` on `shards`."""
        return replay_check(train, self.check, self.base, shards, config, self.prior)


@dataclass(frozen=True)
class Evaluate:
    """Score the target's contribution `delta` at `base` as `check` says and answer
    `Evaluated` (`client.work.score_contribution`)."""

    check: ScoreLike
    base: Params
    delta: Params

    def run(
        self,
        scorers: Scorers,
        shards: Mapping[str, npt.NDArray[np.uint8]],
        val_ids: Sequence[str],
        config: RunConfig,
    ) -> Score:
        """The score, computed with a model from `scorers` on `shards` (training and
        validation shards)."""
        return score_contribution(
            scorers, self.check, self.base, self.delta, shards, val_ids, config
        )


@dataclass(frozen=True)
class Speculate:
    """Start overlapped training of `segment` in the background until `StopSpeculation`
    (at most the segment's budget; a step under way is finished first)."""

    round: int
    segment: Segment


@dataclass(frozen=True)
class PauseSpeculation:
    """Pause overlapped training (after the step under way) while a replay runs."""


@dataclass(frozen=True)
class ResumeSpeculation:
    """Resume paused overlapped training."""


@dataclass(frozen=True)
class StopSpeculation:
    """Stop overlapped training after the step under way and answer `SpeculationEnded`."""


@dataclass(frozen=True)
class Overlap:
    """What a contribution declares about its overlapped start: `steps` steps that continued
    the order of round `round` from its batch `first_batch`."""

    steps: int
    round: int
    first_batch: int

    def meta(self) -> dict[str, int]:
        """The upload metadata fields that declare it."""
        return {
            "overlap_steps": self.steps,
            "overlap_round": self.round,
            "overlap_first_batch": self.first_batch,
        }


#: What a contribution without overlapped steps declares.
NO_OVERLAP = Overlap(0, -1, 0)


@dataclass(frozen=True)
class Upload:
    """Upload `payload` for `order` with its `claim` (and `overlap` declaration); `result` is
    the local training result behind it (None for an attacker that does not train)."""

    order: WorkLike
    payload: bytes
    claim: Claim
    overlap: Overlap | None
    result: Contribution | None

    def meta(self) -> dict[str, Any]:
        """The upload's metadata (docs/API.md, X-Crowdtrain-Meta) without utilization."""
        return {
            "base_version": self.order.base_version,
            "samples": self.claim.samples,
            "tokens": self.claim.tokens,
            "steps": self.claim.steps,
            "train_loss": self.claim.train_loss,
            **(self.overlap or NO_OVERLAP).meta(),
        }


@dataclass(frozen=True)
class UploadReplay:
    """Upload the replay Δ' of `check` (`result.steps` steps) as `payload`."""

    check: CheckLike
    payload: bytes
    result: Contribution


@dataclass(frozen=True)
class UploadScore:
    """Submit `score`, the usefulness score `check` asked for."""

    check: ScoreLike
    score: Score


@dataclass(frozen=True)
class Stop:
    """The volunteer is done: the run finished, or it was banned (`banned`)."""

    reason: str
    banned: bool = False


Decision = (
    AskForWork
    | Wait
    | Fetch
    | Train
    | Replay
    | Evaluate
    | Speculate
    | PauseSpeculation
    | ResumeSpeculation
    | StopSpeculation
    | Upload
    | UploadReplay
    | UploadScore
    | Stop
)
