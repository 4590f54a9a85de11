"""What training a work order or replaying one means, as pure functions over a trainer.

Every driver of a volunteer (the HTTP client, the in-process swarm, the discrete-event
simulator) and the coordinator's own spot-check replays compute a round's result with these
functions, so a replay reproduces a contribution bit for bit: same start, same batches, same
step offsets, a fresh optimizer for every trainer call.

Overlap (Streaming DiLoCo, Douillard et al. 2025, arXiv:2501.18512; DeMo's delayed
application, Peng et al. 2024, arXiv:2411.19870): a volunteer keeps training round r's order
while its upload travels, from θ_r − decode(payload_r), and rebases that progress Δ_c onto
θ_{r+1} when it arrives: the rest of round r+1 starts at θ_{r+1} − Δ_c and Δ is measured from
θ_{r+1}. `CarriedWork` is that overlapped start as a replay needs it; `replay_work` recomputes
a contribution with it (the recomputation spot-check of BOINC-style adaptive replication,
Anderson, "BOINC: A Platform for Volunteer Computing", J. Grid Computing 2020).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch

from crowdtrain.config import RunConfig
from crowdtrain.data import BatchSampler
from crowdtrain.data.probe import ShardProbe
from crowdtrain.robust import DictSource
from crowdtrain.robust.usefulness import Score, Scorers
from crowdtrain.train import Contribution
from crowdtrain.train.moments import split_base

Params = Mapping[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]
#: `LocalTrainer.train` or a wrapper of it: (base, batches, *, step_offset, max_steps, start=).
TrainFn = Callable[..., Contribution]

#: A seconds budget counts as used up within this relative tolerance (a simulated clock adds
#: step times that may land an ulp short of the budget).
SECONDS_SLACK = 1e-9


class Stream(Protocol):
    """What names a batch stream: a work order, a replayed one, or a replay's prior work."""

    @property
    def shard_ids(self) -> Sequence[str]: ...
    @property
    def seed(self) -> int: ...
    @property
    def round(self) -> int: ...
    @property
    def step_offset(self) -> int: ...


class WorkLike(Stream, Protocol):
    """A work order, as the protocol (`WorkOrder`) or the HTTP API (`WorkOrderMsg`) gives it:
    its stream, its base version and its budget (`max_steps` or `max_seconds`)."""

    @property
    def base_version(self) -> int: ...
    @property
    def budget(self) -> str: ...
    @property
    def max_steps(self) -> int: ...
    @property
    def max_seconds(self) -> float: ...


def batch_sampler(
    stream: Stream, peer: str, shards: Mapping[str, npt.NDArray[np.uint8]], config: RunConfig
) -> BatchSampler:
    """The batches `stream` names for `peer` (a spot-check draws its target's batches)."""
    return BatchSampler(
        shards,
        list(stream.shard_ids),
        seed=stream.seed,
        round=stream.round,
        peer=peer,
        batch_size=config.data.batch_size,
        context=config.model.context,
    )


def batches_from(sampler: BatchSampler, first: int) -> Iterator[Batch]:
    """The sampler's batches from index `first` on (the stream never ends)."""
    return (sampler.batch(i) for i in range(first, 1 << 62))


@dataclass(frozen=True)
class CarriedWork:
    """The overlapped start of a contribution, as a replay needs it: `steps` steps from
    `start` (θ_prior − decode(payload_prior)) on `batches`, the first at `step_offset`."""

    start: Params
    batches: Iterator[Batch]
    step_offset: int
    steps: int

    @classmethod
    def after(
        cls, start: Params, sampler: BatchSampler, *, first_batch: int, step_offset: int, steps: int
    ) -> CarriedWork:
        """The steps a peer trained ahead from `start` = θ_prior − Δ_sent, from batch
        `first_batch` of its prior work order's stream (`step_offset` is that order's)."""
        return cls(
            start=start,
            batches=batches_from(sampler, first_batch),
            step_offset=step_offset + first_batch,
            steps=steps,
        )


def overlap_start(theta: Params, sent: Params) -> dict[str, torch.Tensor]:
    """Where overlapped training starts: θ_r − decode(payload_r), what the peer sent for round
    r subtracted from that round's base, which anyone can recompute from public data. The AdamW
    moments published with θ_r, when `theta` carries them, come along: the overlapped steps
    start from them as the round's own steps did (``train.moments``)."""
    return {**split_base(theta)[1], **{k: theta[k] - d for k, d in sent.items()}}


def fills_budget(order: WorkLike, done: Contribution) -> bool:
    """Whether overlapped work `done` already used the whole budget of `order`."""
    if order.budget == "steps":
        return done.steps >= order.max_steps
    return done.seconds >= order.max_seconds * (1 - SECONDS_SLACK)


def rebased(base: Params, done: Contribution) -> dict[str, torch.Tensor]:
    """Where the rest of a round starts: θ_base − Δ_done (the progress rebased onto θ_base),
    with θ_base's published moments when it carries them."""
    return {**split_base(base)[1], **{k: base[k] - d for k, d in done.delta.items()}}


def merge(first: Contribution, second: Contribution) -> Contribution:
    """One round's result from the overlapped part and the rest (Δ is already from base)."""
    steps = first.steps + second.steps
    return Contribution(
        delta=second.delta,
        samples=first.samples + second.samples,
        tokens=first.tokens + second.tokens,
        steps=steps,
        loss_first=first.loss_first,
        loss_last=second.loss_last,
        loss_mean=(first.loss_mean * first.steps + second.loss_mean * second.steps) / steps,
        seconds=first.seconds + second.seconds,
    )


def replay_work(
    train: TrainFn,
    base: Params,
    batches: Iterator[Batch],
    *,
    step_offset: int,
    steps: int,
    carried: CarriedWork | None = None,
) -> Contribution:
    """Recompute a contribution of `steps` steps from `base`, the way its volunteer made it.

    Without `carried`: `steps` steps on `batches` from `base`. With it, first the overlapped
    part, Δ_c = θ_s − θ_end after `carried.steps` steps from θ_s = `carried.start`; if that is
    the whole budget, Δ_c is the contribution, else training goes on from θ_base − Δ_c for the
    remaining steps on `batches` from their start, and Δ is measured from θ_base. Every `train`
    call has a fresh optimizer, as the volunteer's own calls do.
    """
    if carried is None:
        return train(base, batches, step_offset=step_offset, max_steps=steps)
    done = train(
        carried.start, carried.batches, step_offset=carried.step_offset, max_steps=carried.steps
    )
    if done.steps >= steps:
        return done
    rest = train(
        base,
        batches,
        step_offset=step_offset,
        max_steps=steps - done.steps,
        start=rebased(base, done),
    )
    return merge(done, rest)


class PriorLike(Stream, Protocol):
    """The overlapped start of a checked contribution (protocol `PriorWork`, client `PriorMsg`):
    `steps` steps of that order's stream from its batch `first_batch`."""

    @property
    def first_batch(self) -> int: ...
    @property
    def steps(self) -> int: ...


class CheckLike(Stream, Protocol):
    """A spot-check (protocol `VerifyOrder`, client `VerifyOrderMsg`): replay `steps` steps of
    `target`'s order from version `base_version`, after its overlapped `prior` if any."""

    @property
    def target(self) -> str: ...
    @property
    def steps(self) -> int: ...
    @property
    def base_version(self) -> int: ...
    @property
    def prior(self) -> PriorLike | None: ...


class ScoreLike(Stream, Protocol):
    """A score order (protocol `ScoreOrder`, client `ScoreOrderMsg`): score `target`'s
    contribution at θ of version `base_version` on its order's batches from
    `assigned_batch` on and on held-out batch `heldout_batch`."""

    @property
    def check_id(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def base_version(self) -> int: ...
    @property
    def assigned_batch(self) -> int: ...
    @property
    def heldout_batch(self) -> int: ...


def score_contribution(
    scorers: Scorers,
    check: ScoreLike,
    base: Params,
    delta: Params,
    shards: Mapping[str, npt.NDArray[np.uint8]],
    val_ids: Sequence[str],
    config: RunConfig,
) -> Score:
    """The usefulness score of `delta` (the target's Δ) at `base`, on the batches the order
    names, as the coordinator's stage (f) computes it (`protocol.screening.score`)."""
    probe = ShardProbe.of_run(shards, val_ids, config)
    batches = probe.scoring_batches(
        check.shard_ids,
        seed=check.seed,
        round=check.round,
        peer=check.target,
        index=check.assigned_batch,
        held=check.heldout_batch,
    )
    theta, _moments = split_base(base)  # a base may carry the published AdamW moments
    return scorers.score(theta, DictSource(dict(delta)), *batches)


def replay_check(
    train: TrainFn,
    check: CheckLike,
    base: Params,
    shards: Mapping[str, npt.NDArray[np.uint8]],
    config: RunConfig,
    prior_start: Params | None = None,
) -> Contribution:
    """Replay spot-check `check` from `base`: the target's batches, offsets and step count.

    With `check.prior` (an overlapped contribution), the first `prior.steps` steps start from
    `prior_start` = θ_prior − decode(prior payload) (`overlap_start`) on the target's batches
    of the prior order (`CarriedWork.after`)."""
    carried, prior = None, check.prior
    if prior is not None:
        if prior_start is None:
            raise ValueError("a replay of overlapped work needs where the overlapped steps began")
        carried = CarriedWork.after(
            prior_start,
            batch_sampler(prior, check.target, shards, config),
            first_batch=prior.first_batch,
            step_offset=prior.step_offset,
            steps=prior.steps,
        )
    return replay_work(
        train,
        base,
        iter(batch_sampler(check, check.target, shards, config)),
        step_offset=check.step_offset,
        steps=check.steps,
        carried=carried,
    )
