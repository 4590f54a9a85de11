"""In-process swarm: N virtual volunteers driven through the real protocol core, no network.

Each round every volunteer asks the protocol for work, trains with `LocalTrainer` on exactly the
batches its work order names, compresses its pseudo-gradient with the run's codec (keeping the
error-feedback residual when the codec or outer optimizer uses one), and the coordinator side
decodes the payload and hands it to the protocol. So the numerics and the wire bytes are those
of the networked system; only time is virtual (a counter) and transfers are instant. The
discrete-event simulator with network and compute costs builds on this.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crowdtrain import codec
from crowdtrain.config import RunConfig
from crowdtrain.data import (
    BatchSampler,
    DataManifest,
    ShardStore,
    ensure_packed_for,
    eval_batches,
)
from crowdtrain.models import initial_state
from crowdtrain.protocol import (
    ContributionSubmitted,
    PeerJoined,
    RoundClosed,
    RoundProtocol,
    RunFinished,
    WorkOrder,
    WorkRequested,
)
from crowdtrain.robust import DictSource
from crowdtrain.train import Contribution, LocalTrainer, evaluate


@dataclass(frozen=True)
class RoundRow:
    """One line of the per-round table."""

    round: int
    train_loss: float
    eval_loss: float
    contributions: int
    bytes_up: int


@dataclass
class SwarmResult:
    """What a swarm run produced: the per-round table and the evaluation losses."""

    rounds: list[RoundRow] = field(default_factory=list)
    initial_eval_loss: float = math.nan
    final_eval_loss: float = math.nan

    def to_json(self) -> dict[str, Any]:
        """The JSON document of `crowdtrain simulate --json`."""
        return {
            "rounds": [asdict(r) for r in self.rounds],
            "initial_eval_loss": self.initial_eval_loss,
            "final_eval_loss": self.final_eval_loss,
        }


class _CounterClock:
    """Virtual time: advances only when the driver says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def uses_error_feedback(config: RunConfig) -> bool:
    """Whether volunteers keep a compression residual (top-k codec or SparseLoCo outer step)."""
    return config.codec.name == "topk2bit" or config.outer.optimizer == "error_feedback"


def load_shards(manifest: DataManifest, data_dir: Path) -> dict[str, np.ndarray]:
    """Load (and verify) every shard of a packed corpus into memory, keyed by sha256."""
    store = ShardStore(data_dir)
    ids = list(manifest.train_ids) + list(manifest.val_ids)
    return {sha: store.load(sha, verify=True) for sha in ids}


class Volunteer:
    """One virtual volunteer: its trainer (or a shared one) and its error-feedback residual."""

    def __init__(self, peer_id: str, trainer: LocalTrainer) -> None:
        self.peer_id = peer_id
        self.trainer = trainer
        self.residual: dict[str, torch.Tensor] | None = None

    def work(
        self,
        order: WorkOrder,
        base: Mapping[str, torch.Tensor],
        shards: Mapping[str, np.ndarray],
        config: RunConfig,
        feedback: bool,
    ) -> tuple[bytes, Contribution]:
        """Train on the work order; return the wire payload and the local result."""
        sampler = BatchSampler(
            shards,
            order.shard_ids,
            seed=order.seed,
            round=order.round,
            peer=self.peer_id,
            batch_size=config.data.batch_size,
            context=config.model.context,
        )
        result = self.trainer.train(
            base, iter(sampler), step_offset=order.step_offset, max_steps=order.max_steps
        )
        if feedback and self.residual is None:
            self.residual = {}
        return codec.encode(result.delta, config.codec, residual=self.residual), result


def submission(
    order: WorkOrder, payload: bytes, result: Contribution, shapes: Mapping[str, tuple[int, ...]]
) -> ContributionSubmitted:
    """The coordinator's side of an upload: decode the payload into a submission event."""
    return ContributionSubmitted(
        peer_id=order.peer_id,
        round=order.round,
        base_version=order.base_version,
        delta=DictSource(codec.decode(payload, shapes)),
        samples=result.samples,
        tokens=result.tokens,
        steps=result.steps,
        train_loss=result.loss_mean,
        payload_bytes=len(payload),
    )


def run_swarm(
    config: RunConfig,
    peers: int,
    *,
    eval_batch_count: int = 8,
    eval_batch_size: int = 16,
    on_round: Callable[[RoundRow], None] | None = None,
) -> SwarmResult:
    """Run `peers` in-process volunteers through `config.rounds.total` rounds of the protocol."""
    torch.set_num_threads(config.inner.threads)
    data_dir = Path(config.data.dir)
    manifest = ensure_packed_for(config.data)
    shards = load_shards(manifest, data_dir)
    evals = eval_batches(
        shards,
        manifest.val_ids,
        batch_size=eval_batch_size,
        context=config.model.context,
        n_batches=eval_batch_count,
        seed=config.data.seed,
    )
    clock = _CounterClock()
    protocol = RoundProtocol(config, initial_state(config.model), manifest.train_ids, clock)
    shared = LocalTrainer(config.model, config.inner)
    volunteers = [
        Volunteer(
            f"peer-{i}",
            LocalTrainer(config.model, config.inner)
            if config.inner.keep_optimizer_state
            else shared,
        )
        for i in range(peers)
    ]
    for v in volunteers:
        protocol.handle(PeerJoined(v.peer_id, v.peer_id))
    feedback = uses_error_feedback(config)
    result = SwarmResult(initial_eval_loss=evaluate(config.model, protocol.params, evals))
    for step in itertools.count():
        base = {k: t.clone() for k, t in protocol.params.items()}
        closed: RoundClosed | None = None
        finished = False
        for v in volunteers:
            (order,) = protocol.handle(WorkRequested(v.peer_id))
            if not isinstance(order, WorkOrder):
                continue
            payload, local = v.work(order, base, shards, config, feedback)
            event = submission(order, payload, local, protocol.shapes)
            for decision in protocol.handle(event):
                if isinstance(decision, RoundClosed):
                    closed = decision
                elif isinstance(decision, RunFinished):
                    finished = True
        clock.now = float(step + 1)
        if closed is None:
            raise RuntimeError("the round did not close after every volunteer contributed")
        row = RoundRow(
            round=closed.round,
            train_loss=closed.train_loss,
            eval_loss=evaluate(config.model, protocol.params, evals),
            contributions=len(closed.contributors),
            bytes_up=closed.payload_bytes,
        )
        result.rounds.append(row)
        if on_round is not None:
            on_round(row)
        if finished:
            break
    result.final_eval_loss = result.rounds[-1].eval_loss
    return result
