"""Deterministic shard assignment and batch sampling: what a peer trains on is recomputable.

The batches a volunteer trains on in a round are a pure function of (shard ids, seed, round,
peer id, batch index), so the coordinator or any other peer can replay exactly the steps a
volunteer claims to have run — the basis of recomputation spot-checks in DiLoCo-style training
with untrusted workers (Douillard et al. 2023, arXiv:2311.08105; verification of outsourced
training as in Jia et al. 2021, "Proof-of-Learning", arXiv:2103.05633).

Randomness comes only from NumPy's `SeedSequence` and the raw output of the `PCG64` bit
generator, both of which NumPy keeps stable across releases (unlike `Generator` methods), with
entropy built from sha256 digests (never Python's salted `hash()`). Batch i has its own
`SeedSequence(..., spawn_key=(i,))`, so `batch(i)` needs no replay of batches 0..i-1.

A batch is `batch_size` windows of `context + 1` bytes drawn uniformly among all window
positions of the assigned shards (a shard too short for a window is skipped); x is a window's
first `context` bytes and y the same window shifted by one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import numpy.typing as npt
import torch
from numpy.lib.stride_tricks import sliding_window_view

from crowdtrain.config import canonical_json
from crowdtrain.data.manifest import DataError

SAMPLER_VERSION = 1
_TAG_ASSIGN = 1
_TAG_TRAIN = 2
_TAG_EVAL = 3

Batch = tuple[torch.Tensor, torch.Tensor]


def _digest(domain: bytes, payload: bytes) -> int:
    return int.from_bytes(hashlib.sha256(domain + b"\x00" + payload).digest(), "big")


def peer_key(peer: str) -> int:
    """A stable 256-bit integer for a peer id (sha256; the same on every machine and run)."""
    if not isinstance(peer, str) or not peer:
        raise DataError("a peer id must be a non-empty string")
    return _digest(b"crowdtrain-peer", peer.encode("utf-8", "surrogatepass"))


def ids_key(ids: Sequence[str]) -> int:
    """A stable 256-bit integer for an ordered list of shard ids."""
    return _digest(b"crowdtrain-shards", canonical_json(list(ids)))


def _nonneg(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise DataError(f"{name} must be a non-negative integer, not {value!r}")
    return int(value)


def _positive(name: str, value: int) -> int:
    if _nonneg(name, value) < 1:
        raise DataError(f"{name} must be at least 1, not {value!r}")
    return int(value)


def _raw(entropy: list[int], n: int, spawn: tuple[int, ...] = ()) -> npt.NDArray[np.uint64]:
    seq = np.random.SeedSequence(entropy, spawn_key=spawn)
    return np.random.PCG64(seq).random_raw(n)


def assign_shards(
    train_ids: Sequence[str],
    *,
    seed: int,
    round: int,
    peer: str,
    k: int,
    slot: int | None = None,
) -> list[str]:
    """The K shard ids PEER trains on in ROUND (all of them, without repeats, if K exceeds them).

    Each round has its own permutation of TRAIN_IDS keyed by (SEED, ROUND); a peer takes K
    consecutive entries of it from an offset. The offset comes from sha256 of the peer id, so
    peers are spread without coordination (two may still overlap); a coordinator that numbers
    the peers of a round can pass SLOT instead (offset SLOT*K), which gives disjoint shards to
    slots 0 .. len(train_ids)//K - 1.
    """
    ids = list(train_ids)
    if not ids:
        raise DataError("there are no training shards to assign")
    if len(set(ids)) != len(ids):
        raise DataError("the training shard ids contain duplicates")
    k = _positive("k", k)
    n = len(ids)
    entropy = [_TAG_ASSIGN, SAMPLER_VERSION, _nonneg("seed", seed), _nonneg("round", round)]
    order = np.argsort(_raw([*entropy, ids_key(ids)], n), kind="stable")
    key = peer_key(peer)
    offset = key % n if slot is None else _nonneg("slot", slot) * k
    return [ids[int(order[(offset + j) % n])] for j in range(min(k, n))]


class _Windows:
    """All windows of CONTEXT+1 bytes in some shards, numbered 0..total-1, and their gather."""

    def __init__(
        self, shards: Mapping[str, npt.NDArray[np.uint8]], shard_ids: Sequence[str], context: int
    ) -> None:
        self.context = _positive("context", context)
        ids = list(shard_ids)
        if not ids:
            raise DataError("no shards were given to sample from")
        self.arrays: list[npt.NDArray[np.uint8]] = []
        counts: list[int] = []
        for sha in ids:
            if sha not in shards:
                raise DataError(f"shard {sha} was not loaded")
            arr = shards[sha]
            if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 1:
                raise DataError(f"shard {sha} must be a 1-D uint8 array")
            if len(arr) > self.context:
                self.arrays.append(arr)
                counts.append(len(arr) - self.context)
        if not counts:
            raise DataError(
                f"no shard is longer than the context ({self.context} bytes); use a smaller "
                "context or larger shards"
            )
        self.ends = np.cumsum(np.asarray(counts, dtype=np.int64))
        self.starts = self.ends - np.asarray(counts, dtype=np.int64)
        self.total = int(self.ends[-1])

    def draw(self, entropy: list[int], i: int, n: int) -> Batch:
        """Batch I of N windows for ENTROPY: a pure function of its arguments."""
        raw = _raw(entropy, n, spawn=(_nonneg("batch index", i),))
        picks = (raw % np.uint64(self.total)).astype(np.int64)
        which = np.searchsorted(self.ends, picks, side="right")
        local = picks - self.starts[which]
        out = np.empty((n, self.context + 1), dtype=np.uint8)
        for j in np.unique(which):
            mask = which == j
            out[mask] = sliding_window_view(self.arrays[j], self.context + 1)[local[mask]]
        x = torch.from_numpy(out[:, :-1].astype(np.int64))
        y = torch.from_numpy(out[:, 1:].astype(np.int64))
        return x, y


class BatchSampler:
    """The training batches of one peer in one round: `batch(i)`, or iterate from batch 0.

    Batches are (x, y) int64 tensors of shape [batch_size, context], y being x shifted by one
    byte. They depend only on (SHARD_IDS, the shard contents, SEED, ROUND, PEER, batch_size,
    context) and the batch index. Iteration never ends; the trainer stops at its budget.
    """

    def __init__(
        self,
        shards: Mapping[str, npt.NDArray[np.uint8]],
        shard_ids: Sequence[str],
        *,
        seed: int,
        round: int,
        peer: str,
        batch_size: int,
        context: int,
    ) -> None:
        self.shard_ids = list(shard_ids)
        self.batch_size = _positive("batch_size", batch_size)
        self.context = int(context)
        self._windows = _Windows(shards, self.shard_ids, context)
        self._entropy = [
            _TAG_TRAIN,
            SAMPLER_VERSION,
            _nonneg("seed", seed),
            _nonneg("round", round),
            peer_key(peer),
            ids_key(self.shard_ids),
        ]

    def batch(self, i: int) -> Batch:
        """Batch I (0-based), computed directly."""
        return self._windows.draw(self._entropy, i, self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        i = 0
        while True:
            yield self.batch(i)
            i += 1


def eval_batches(
    shards: Mapping[str, npt.NDArray[np.uint8]],
    val_ids: Sequence[str],
    *,
    batch_size: int,
    context: int,
    n_batches: int,
    seed: int = 0,
) -> list[Batch]:
    """A fixed evaluation set of N_BATCHES batches drawn from the validation shards."""
    if not val_ids:
        raise DataError(
            "the corpus has no validation shards; pack it with a smaller shard_bytes so that "
            "it has at least two shards"
        )
    windows = _Windows(shards, val_ids, context)
    batch_size = _positive("batch_size", batch_size)
    entropy = [_TAG_EVAL, SAMPLER_VERSION, _nonneg("seed", seed), ids_key(list(val_ids))]
    return [windows.draw(entropy, i, batch_size) for i in range(_nonneg("n_batches", n_batches))]
