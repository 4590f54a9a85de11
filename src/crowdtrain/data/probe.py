"""Batches for checking a contribution: one of the peer's assigned batches, one held-out batch.

Usefulness scoring (docs/SECURITY.md, stage f) measures the loss before and after applying a
peer's pseudo-gradient on data the peer was told to train on, and on validation data it never
saw. Both batches are pure functions of their arguments, like everything the sampler draws, so
the coordinator and the simulator score identically and anyone can audit a score.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt
import torch

from crowdtrain.config import RunConfig
from crowdtrain.data.sampler import Batch, BatchSampler, eval_batches

ShardLoader = Callable[[str], npt.NDArray[np.uint8]]


class ShardProbe:
    """Draws scoring batches from shards loaded on demand (and kept, they are small)."""

    def __init__(
        self,
        load: ShardLoader | Mapping[str, npt.NDArray[np.uint8]],
        val_ids: Sequence[str],
        *,
        train_batch_size: int,
        batch_size: int,
        context: int,
        seed: int,
    ) -> None:
        self._load = load if callable(load) else load.__getitem__
        self._cache: dict[str, npt.NDArray[np.uint8]] = {}
        self.val_ids = list(val_ids)
        self.train_batch_size = train_batch_size
        self.batch_size = batch_size
        self.context = context
        self.seed = seed

    @classmethod
    def of_run(
        cls,
        load: ShardLoader | Mapping[str, npt.NDArray[np.uint8]],
        val_ids: Sequence[str],
        config: RunConfig,
    ) -> ShardProbe:
        """The probe a run scores with (the coordinator, the simulators and a volunteer that
        scores another's contribution draw the same batches from it)."""
        return cls(
            load,
            val_ids,
            train_batch_size=config.data.batch_size,
            batch_size=config.defence.score_batch_size,
            context=config.model.context,
            seed=config.data.seed,
        )

    def _shards(self, ids: Sequence[str]) -> dict[str, npt.NDArray[np.uint8]]:
        for sha in ids:
            if sha not in self._cache:
                self._cache[sha] = self._load(sha)
        return {sha: self._cache[sha] for sha in ids}

    def assigned(
        self, shard_ids: Sequence[str], *, seed: int, round: int, peer: str, index: int
    ) -> Batch:
        """`batch_size` sequences of a peer's work order: its training batches from `index` on
        (as many as it takes), so the scoring batch is data the peer trained on."""
        sampler = BatchSampler(
            self._shards(shard_ids),
            shard_ids,
            seed=seed,
            round=round,
            peer=peer,
            batch_size=self.train_batch_size,
            context=self.context,
        )
        count = -(-self.batch_size // self.train_batch_size)
        xs, ys = zip(*(sampler.batch(index + i) for i in range(count)), strict=True)
        return torch.cat(xs)[: self.batch_size], torch.cat(ys)[: self.batch_size]

    def scoring_batches(
        self, shard_ids: Sequence[str], *, seed: int, round: int, peer: str, index: int, held: int
    ) -> tuple[Batch, Batch]:
        """What a contribution is scored on: its peer's training batches from `index` on
        (`assigned`) and held-out batch `held` (`heldout`)."""
        assigned = self.assigned(shard_ids, seed=seed, round=round, peer=peer, index=index)
        return assigned, self.heldout(held)

    def batches_needed(self) -> int:
        """How many consecutive training batches `assigned` reads."""
        return -(-self.batch_size // self.train_batch_size)

    def heldout(self, index: int) -> Batch:
        """Held-out batch `index`: validation windows no peer trains on."""
        (batch,) = eval_batches(
            self._shards(self.val_ids),
            self.val_ids,
            batch_size=self.batch_size,
            context=self.context,
            n_batches=1,
            seed=self.seed * 1_000_003 + index,
        )
        return batch
