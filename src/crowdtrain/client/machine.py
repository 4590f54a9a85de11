"""The volunteer as one sans-IO state machine: events in, decisions out (in the style of h11).

What a volunteer does in a run — take a work order, train it, encode and upload Δ, keep
training past the round while the upload travels (overlap), rebase that progress onto the next
base, replay a spot-check — lives here once. `VolunteerMachine.handle(event)` returns the
decisions the driver carries out; it never touches the network, the disk, a thread or a clock.
The HTTP client (`client/volunteer.py`), the in-process swarm (`sim/swarm.py`) and the
discrete-event simulator (`sim/des.py`) are thin drivers of it, so what the simulator measures
is what the networked volunteer does.

The events and decisions are in `client/events.py`, each decision that needs an answer with
the one event that answers it. Legal transitions are data (`TRANSITIONS`), as in h11's
`_state.py`; any other event is a driver bug and raises `MachineError`.

The algorithm is DiLoCo's round (Douillard et al. 2023, arXiv:2311.08105) with Streaming
DiLoCo's overlap (Douillard et al. 2025, arXiv:2501.18512): after uploading round r's Δ the
volunteer goes on training round r's order from θ_r − decode(payload_r) — the end point anyone
can recompute from public data — for at most one round's budget, and when θ_{r+1} arrives that
progress is rebased onto it and counts towards round r+1 (`client.work`). A spot-check
(BOINC-style adaptive replication, Anderson 2020) pauses overlapped training, replays the
target's order exactly and uploads Δ'. Attack behaviours for testing defences come from
`crowdtrain.adversary`, applied here once for every driver.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from crowdtrain import codec
from crowdtrain.adversary import Attacker, Claim, RoundView, encode_forgery, idle_start
from crowdtrain.client.events import (
    AskForWork,
    Decision,
    Evaluate,
    Evaluated,
    Event,
    Fetch,
    GotBanned,
    GotCheck,
    GotFinished,
    GotScore,
    GotWait,
    GotWork,
    InputsReady,
    Overlap,
    PauseSpeculation,
    Replay,
    ResumeSpeculation,
    Segment,
    Speculate,
    SpeculationEnded,
    Start,
    Stop,
    StopSpeculation,
    Train,
    Trained,
    Upload,
    Uploaded,
    UploadReplay,
    UploadScore,
    Wait,
    Woke,
)
from crowdtrain.client.work import (
    Batch,
    CheckLike,
    Params,
    ScoreLike,
    WorkLike,
    batch_sampler,
    batches_from,
    fills_budget,
    merge,
    overlap_start,
    rebased,
)
from crowdtrain.config import RunConfig
from crowdtrain.train import Contribution


class MachineError(RuntimeError):
    """A driver fed the machine an event that is not legal in its state."""


def heartbeat_interval(config: RunConfig) -> float:
    """How often a volunteer tells the coordinator it is alive while it trains: four times per
    `rounds.peer_timeout_s`, within 1–15 s (drivers keep the clock; this is the rule)."""
    return max(1.0, min(15.0, config.rounds.peer_timeout_s / 4))


def uses_error_feedback(config: RunConfig) -> bool:
    """Whether volunteers keep a compression residual (top-k codec or SparseLoCo outer step)."""
    return config.codec.name == "topk2bit" or config.outer.optimizer == "error_feedback"


# --- states and the transition table ---------------------------------------------------------


class State(enum.Enum):
    """Where the volunteer is in its loop (overlapped training runs beside any of them)."""

    IDLE = "idle"  # not started
    ASKING = "asking"  # waiting for the coordinator's answer to a work request
    WAITING = "waiting"  # told to ask again later
    FETCHING = "fetching"  # downloading an order's inputs
    STOPPING = "stopping"  # waiting for overlapped training to stop
    TRAINING = "training"  # training a work order, replaying a spot-check or scoring
    UPLOADING = "uploading"  # sending Δ or Δ'
    DONE = "done"  # the run finished or this volunteer was banned


#: (state, event type) -> the states the event may lead to. Anything else is a driver bug.
TRANSITIONS: dict[tuple[State, type], frozenset[State]] = {
    (State.IDLE, Start): frozenset({State.ASKING}),
    (State.ASKING, GotWork): frozenset({State.FETCHING}),
    (State.ASKING, GotCheck): frozenset({State.FETCHING}),
    (State.ASKING, GotScore): frozenset({State.FETCHING}),
    (State.ASKING, GotWait): frozenset({State.WAITING}),
    (State.ASKING, GotFinished): frozenset({State.DONE}),
    (State.WAITING, Woke): frozenset({State.ASKING}),
    (State.FETCHING, InputsReady): frozenset({State.STOPPING, State.TRAINING, State.UPLOADING}),
    (State.STOPPING, SpeculationEnded): frozenset({State.TRAINING, State.UPLOADING}),
    (State.TRAINING, Trained): frozenset({State.UPLOADING}),
    (State.TRAINING, Evaluated): frozenset({State.UPLOADING}),
    (State.UPLOADING, Uploaded): frozenset({State.ASKING}),
    **{(s, GotBanned): frozenset({State.DONE}) for s in State if s is not State.DONE},
}


def own_view(round: int, honest: Mapping[str, torch.Tensor]) -> RoundView:
    """What a networked attacker sees of a round: only its own honest Δ (it is not
    omniscient), so ALIE and IPM work from that one Δ and copycat has nobody to copy."""
    return RoundView(round=round, peers=1, attackers=1, honest=[honest], others=[])


class VolunteerMachine:
    """One volunteer's logic: orders, training, overlap and rebase, encoding, replays.

    `shapes` are the run's parameter shapes; `attacker` (for testing defences) makes it behave
    as that attack, seeing what `view(round, own honest Δ)` returns of the round (default
    `own_view`). The error-feedback residual of the codec lives here across rounds.
    """

    def __init__(
        self,
        peer_id: str,
        config: RunConfig,
        shapes: Mapping[str, Sequence[int]],
        *,
        attacker: Attacker | None = None,
        view: Callable[[int, Mapping[str, torch.Tensor]], RoundView] = own_view,
    ) -> None:
        self.peer_id = peer_id
        self.config = config
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.attacker = attacker
        self.view = view
        self.residual: dict[str, torch.Tensor] | None = {} if uses_error_feedback(config) else None
        self.overlap = config.inner.overlap and attacker is None
        self.state = State.IDLE
        self.order: WorkLike | None = None  # the work order in hand
        self.check: CheckLike | None = None  # or the spot-check
        self.scoring: ScoreLike | None = None  # or the score order
        self.base: Params | None = None
        # Overlapped training under way: round r's order from its batch `first_batch` (its
        # steps are known when it ends) ...
        self.speculation: Overlap | None = None
        # ... and, once it ended, the progress the next work order starts with (none when the
        # upload it continues was refused: the coordinator would refuse overlap it cannot
        # replay).
        self.carried: tuple[Contribution, Overlap] | None = None
        self.orphaned = False
        self._handlers: dict[type, Callable[[Any], list[Decision]]] = {
            Start: self._on_start,
            GotWork: self._on_work,
            GotCheck: self._on_check,
            GotScore: self._on_score,
            GotWait: self._on_wait,
            GotFinished: self._on_finished,
            GotBanned: self._on_banned,
            Woke: self._on_woke,
            InputsReady: self._on_inputs,
            SpeculationEnded: self._on_speculation_ended,
            Trained: self._on_trained,
            Evaluated: self._on_evaluated,
            Uploaded: self._on_uploaded,
        }

    # --- public --------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Decision]:
        """Apply one event; return the decisions it causes (at most the last needs an answer)."""
        legal = TRANSITIONS.get((self.state, type(event)))
        if legal is None:
            raise MachineError(
                f"a volunteer in state {self.state.value} cannot take {type(event).__name__}"
            )
        decisions = self._handlers[type(event)](event)
        assert self.state in legal, (self.state, type(event))
        return decisions

    def reset(self) -> None:
        """The volunteer's process lost its work in progress (it crashed, or its machine
        slept and the run moved on): back to IDLE, to start again with `Start`. The codec's
        error-feedback residual is kept: it holds what earlier uploads left out, not work in
        progress."""
        self.state = State.IDLE
        self.order, self.check, self.scoring, self.base = None, None, None, None
        self.carried, self.speculation, self.orphaned = None, None, False

    def batches(
        self, segment: Segment, shards: Mapping[str, npt.NDArray[np.uint8]]
    ) -> Iterator[Batch]:
        """The batches `segment` trains on, drawn from `shards` (poisoned for an attacker)."""
        sampler = batch_sampler(segment.stream, segment.peer, shards, self.config)
        batches = batches_from(sampler, segment.first_batch)
        if segment.poisoned and self.attacker is not None:
            batches = self.attacker.poison(batches, self.config.model.vocab_size)
        return batches

    # --- handlers ------------------------------------------------------------------------

    def _on_start(self, event: Start) -> list[Decision]:
        self.state = State.ASKING
        return [AskForWork()]

    def _on_woke(self, event: Woke) -> list[Decision]:
        self.state = State.ASKING
        return [AskForWork()]

    def _on_wait(self, event: GotWait) -> list[Decision]:
        self.state = State.WAITING
        return [Wait(event.retry_after, event.reason)]

    def _on_finished(self, event: GotFinished) -> list[Decision]:
        self.state = State.DONE
        return [Stop("the run is over")]

    def _on_banned(self, event: GotBanned) -> list[Decision]:
        self.state = State.DONE
        return [Stop(event.reason, banned=True)]

    def _on_work(self, event: GotWork) -> list[Decision]:
        self.state, self.order, self.check = State.FETCHING, event.order, None
        self.scoring = None
        return [Fetch(event.order)]

    def _on_check(self, event: GotCheck) -> list[Decision]:
        self.state, self.order, self.check = State.FETCHING, None, event.check
        self.scoring = None
        return [Fetch(event.check)]

    def _on_score(self, event: GotScore) -> list[Decision]:
        self.state, self.order, self.check = State.FETCHING, None, None
        self.scoring = event.check
        return [Fetch(event.check)]

    def _on_inputs(self, event: InputsReady) -> list[Decision]:
        if self.scoring is not None:
            if event.target is None:
                raise MachineError("a score order's inputs need the scored contribution")
            self.state = State.TRAINING
            pause: list[Decision] = [PauseSpeculation()] if self.speculation else []
            return [*pause, Evaluate(self.scoring, event.base, event.target)]
        if self.check is not None:
            self.state = State.TRAINING
            pause = [PauseSpeculation()] if self.speculation else []
            return [*pause, Replay(self.check, event.base, event.prior)]
        self.base = event.base
        if self.speculation is not None:  # the new base is here: end the overlapped training
            self.state = State.STOPPING
            return [StopSpeculation()]
        return self._begin()

    def _on_speculation_ended(self, event: SpeculationEnded) -> list[Decision]:
        spec, self.speculation = self.speculation, None
        assert spec is not None
        orphaned, self.orphaned = self.orphaned, False
        # Overlap continues round r's upload into round r + 1 only: the coordinator replays
        # (and so accepts) no other. A volunteer that sat out a round (a check, a wait) drops it.
        follows = self._work().round == spec.round + 1
        if event.result is not None and event.result.steps > 0 and not orphaned and follows:
            self.carried = (event.result, replace(spec, steps=event.result.steps))
        return self._begin()

    def _on_trained(self, event: Trained) -> list[Decision]:
        if self.check is not None:
            self.state = State.UPLOADING
            result = event.result
            if self.attacker is not None and self.attacker.lies_as_verifier:
                check = self.check
                view = self.view(check.round, result.delta)
                lie = self.attacker.forge_replay(check.target, result.delta, view)
                result = replace(result, delta=lie)
            payload = codec.encode(result.delta, self.config.codec)
            return [UploadReplay(self.check, payload, result)]
        carried = self.carried
        result = event.result if carried is None else merge(carried[0], event.result)
        return self._finish(result)

    def _on_evaluated(self, event: Evaluated) -> list[Decision]:
        assert self.scoring is not None
        self.state = State.UPLOADING
        return [UploadScore(self.scoring, event.score)]

    def _on_uploaded(self, event: Uploaded) -> list[Decision]:
        self.state = State.ASKING
        if self.order is not None and not event.accepted and self.speculation is not None:
            self.orphaned = True  # it continues a refused upload: its progress is dropped
        resume: list[Decision] = []
        checking = self.check is not None or self.scoring is not None
        if checking and self.speculation is not None:
            resume = [ResumeSpeculation()]
        self.order, self.check, self.scoring = None, None, None
        return [*resume, AskForWork()]

    # --- a work order --------------------------------------------------------------------

    def _work(self) -> WorkLike:
        order = self.order
        assert order is not None
        return order

    def _begin(self) -> list[Decision]:
        """Train the work order, after overlapped progress if there is some (rebased)."""
        order, base, carried = self._work(), self.base, self.carried
        assert base is not None
        if self.attacker is not None and not self.attacker.trains:
            return self._finish(None)
        if carried is None:
            segment = self._segment(order, base, None, steps_done=0, seconds_done=0.0)
        elif fills_budget(order, carried[0]):
            return self._finish(carried[0])  # Δ from the new θ is the rebased progress
        else:
            done = carried[0]
            segment = self._segment(
                order, base, rebased(base, done), steps_done=done.steps, seconds_done=done.seconds
            )
        self.state = State.TRAINING
        return [Train(order.round, segment)]

    def _segment(
        self,
        order: WorkLike,
        base: Params,
        start: Params | None,
        *,
        steps_done: int,
        seconds_done: float,
        first_batch: int = 0,
    ) -> Segment:
        """The rest of `order`'s budget after `steps_done` steps / `seconds_done` seconds."""
        if order.budget == "steps":
            max_steps, max_seconds = max(1, order.max_steps - steps_done), None
        else:
            max_steps, max_seconds = None, max(0.001, order.max_seconds - seconds_done)
        return Segment(
            base=base,
            start=start,
            stream=order,
            peer=self.peer_id,
            first_batch=first_batch,
            step_offset=order.step_offset + first_batch,
            max_steps=max_steps,
            max_seconds=max_seconds,
            poisoned=self.attacker is not None,
        )

    def _finish(self, result: Contribution | None) -> list[Decision]:
        """Encode the round's result (or forgery), start overlapped training, upload."""
        order, base = self._work(), self.base
        assert base is not None
        carried, self.carried = self.carried, None
        payload, claim = self._encode(order, result, base)
        decisions: list[Decision] = []
        if self.overlap and result is not None:
            fresh = result.steps - (carried[0].steps if carried is not None else 0)
            start = self._speculation_start(base, result, payload)
            segment = self._segment(
                order, start, None, steps_done=0, seconds_done=0.0, first_batch=fresh
            )
            self.speculation = Overlap(0, order.round, fresh)
            decisions.append(Speculate(order.round, segment))
        overlap = None if carried is None else carried[1]
        self.state = State.UPLOADING
        decisions.append(Upload(order, payload, claim, overlap, result))
        return decisions

    def _encode(
        self, order: WorkLike, result: Contribution | None, base: Params
    ) -> tuple[bytes, Claim]:
        """One round's payload (or an attacker's forgery of its own result) and its claim."""
        if self.attacker is None:
            assert result is not None
            payload = codec.encode(result.delta, self.config.codec, residual=self.residual)
            return payload, _claim(result)
        if result is not None:
            honest: Mapping[str, torch.Tensor] = result.delta
            claim = _claim(result)
        else:
            honest, claim = idle_start(
                base,
                max_steps=order.max_steps,
                batch_size=self.config.data.batch_size,
                context=self.config.model.context,
            )
        forgery = self.attacker.forge(honest, claim, self.view(order.round, honest))
        return encode_forgery(forgery, self.config.codec, self.residual), forgery.claim

    def _speculation_start(
        self, base: Params, result: Contribution, payload: bytes
    ) -> dict[str, torch.Tensor]:
        """Where overlapped training starts: θ_base − decode(payload), the end point anyone
        can compute from public data, so that a verifier can replay it. With an error-feedback
        residual (never spot-checked) the payload is not Δ, so it is the local end point."""
        if self.residual is not None:
            return rebased(base, result)
        return overlap_start(base, codec.decode(payload, self.shapes))


def _claim(result: Contribution) -> Claim:
    return Claim(result.samples, result.tokens, result.steps, result.loss_mean)
