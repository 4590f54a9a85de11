"""The data-parallel references a volunteer swarm is measured against: numerics and clocks.

Synchronous data-parallel SGD (DDP) all-reduces the gradients of every step, so its ranks hold
one model and take one optimizer step together (Li et al. 2020, "PyTorch Distributed:
Experiences on Accelerating Data Parallel Training", arXiv:2006.15704). Two baselines share its
numerics and differ only in their clocks:

* the **datacenter ideal**: N identical machines of the swarm's *mean* effective speed
  (the same total compute Σ flops_i · mfu_i), unlimited bandwidth, no churn
  (`datacenter_step_s`);
* **ddp-wan**: the same algorithm over the volunteers' own machines and links (`ddp_wan_times`).

**Numerics** (`train_ddp`). The mean-gradient all-reduce of `peers` ranks with ``batch_size``
sequences each is, in exact arithmetic, the gradient of the mean loss over their concatenated
global batch of ``peers × batch_size`` sequences; gradient clipping in DDP acts on that reduced
gradient too. So one model and one AdamW (the run's inner optimizer settings and its warmup +
cosine schedule ``lr_at``, with an optional learning-rate override) trained on the global batch
*is* DDP. Rank r draws its batches from all training shards with its own `BatchSampler` (the
run's seed, peer id ``ddp-rank-r``), as each rank of a distributed sampler does. Training reuses
`LocalTrainer`, chunk by chunk between evaluations, with its AdamW state kept across chunks and
the global step index passed as ``step_offset``, so the chunks are one continuous run.

**Clocks**, in virtual seconds; the cost of one target step follows the 6·P·D rule of Kaplan et
al. 2020 (arXiv:2001.08361) and one proxy step stands for k target steps (`des.Target`,
proxy-step scaling as in `sim.des`). In ddp-wan, each proxy step uses the peers online at its
start; the fixed global batch of N · tokens_per_step tokens is split evenly over the n online
ranks, and the slowest online rank paces the step (it is synchronous):

    t_compute = 6 · P · (N / n) · tokens_per_step / min_online(flops · mfu)
    t_allreduce = 2 (n − 1) / n · bytes · 8 / min_online(min(up, down)) + 2 (n − 1) · max_rtt / 2

the second being a bandwidth-optimal ring all-reduce (Patarasuk & Yuan 2009, "Bandwidth optimal
all-reduce algorithms for clusters of workstations", J. Parallel Distrib. Comput. 69(2)) of
``P × allreduce_bytes_per_param`` bytes, with one one-way latency per ring hop. A step takes
max(t_compute, t_allreduce): the baseline at its best documented settings, with DDP's bucketed
overlap of communication and backward pass taken as perfect and bf16 gradients (2 bytes per
parameter). Membership changes cost nothing (no re-rendezvous, no restart from a checkpoint),
which is generous to the baseline; with nobody online the run waits until someone comes back.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from crowdtrain.config import InnerConfig, RunConfig
from crowdtrain.data import Batch, BatchSampler
from crowdtrain.models import initial_state
from crowdtrain.sim.des import Target
from crowdtrain.sim.population import PeerSpec
from crowdtrain.sim.swarm import RunData
from crowdtrain.train import LocalTrainer, evaluate

__all__ = [
    "DdpCurve",
    "datacenter_step_s",
    "ddp_inner",
    "ddp_wan_times",
    "global_batches",
    "train_ddp",
]

Interval = tuple[float, float]
FloatArray = npt.NDArray[np.float64]


# --- numerics ------------------------------------------------------------------------------


@dataclass
class DdpCurve:
    """The evaluation curve of a DDP run: eval loss after ``steps[i]`` proxy steps."""

    steps: list[int]  # proxy steps done at each evaluation, starting with 0
    eval_loss: list[float]
    global_batch: int  # sequences per step: peers × data.batch_size
    lr: float  # the peak learning rate of the schedule used
    final_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The curve as a JSON-serialisable document (without the weights)."""
        return {
            "steps": list(self.steps),
            "eval_loss": list(self.eval_loss),
            "global_batch": self.global_batch,
            "lr": self.lr,
        }


def ddp_inner(inner: InnerConfig, lr: float | None = None) -> InnerConfig:
    """The run's inner optimizer settings for DDP: AdamW state kept across training chunks,
    and the peak learning rate `lr` in place of ``inner.lr`` when given."""
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"the learning rate must be a positive number, not {lr}")
    update: dict[str, Any] = {"optimizer_state": "kept"}
    if lr is not None:
        update["lr"] = float(lr)
    return inner.model_copy(update=update)


def global_batches(
    config: RunConfig,
    peers: int,
    shards: Mapping[str, np.ndarray],
    train_ids: Sequence[str],
    *,
    rank_prefix: str = "ddp-rank-",
) -> Iterator[Batch]:
    """DDP's global batches: batch i of every rank's sampler over all training shards,
    concatenated in rank order (``peers × data.batch_size`` sequences); never ends. Rank r
    samples as the peer named ``f"{rank_prefix}{r}"``."""
    samplers = [
        BatchSampler(
            shards,
            train_ids,
            seed=config.seed,
            round=0,
            peer=f"{rank_prefix}{r}",
            batch_size=config.data.batch_size,
            context=config.model.context,
        )
        for r in range(peers)
    ]
    i = 0
    while True:
        xs, ys = zip(*(s.batch(i) for s in samplers), strict=True)
        yield torch.cat(xs), torch.cat(ys)
        i += 1


def _positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive whole number, not {value!r}")


def train_ddp(
    config: RunConfig,
    peers: int,
    *,
    max_steps: int,
    eval_every: int,
    eval_batches: int,
    eval_batch_size: int,
    lr: float | None = None,
    stop_below: float | None = None,
    on_eval: Callable[[int, float], None] | None = None,
) -> DdpCurve:
    """Train the proxy model of `config` with synchronous data parallelism over `peers` ranks.

    Evaluates on the run's held-out batches at step 0, every `eval_every` steps and after
    `max_steps`; stops early after an evaluation at or below `stop_below`. `on_eval` gets
    (steps done, eval loss) after each evaluation. Deterministic for a given config.
    """
    for name, value in (
        ("peers", peers),
        ("max_steps", max_steps),
        ("eval_every", eval_every),
        ("eval_batches", eval_batches),
        ("eval_batch_size", eval_batch_size),
    ):
        _positive_int(name, value)
    inner = ddp_inner(config.inner, lr)
    data = RunData.load(config, eval_batches, eval_batch_size)
    batches = global_batches(config, peers, data.shards, data.manifest.train_ids)
    trainer = LocalTrainer(config.model, inner)
    state = initial_state(config.model)
    curve = DdpCurve([], [], peers * config.data.batch_size, inner.lr)

    def record(done: int) -> bool:
        loss = evaluate(config.model, state, data.evals)
        curve.steps.append(done)
        curve.eval_loss.append(loss)
        if on_eval is not None:
            on_eval(done, loss)
        return stop_below is not None and loss <= stop_below

    done = 0
    stop = record(done)
    while done < max_steps and not stop:
        chunk = min(eval_every, max_steps - done)
        trainer.train(state, batches, step_offset=done, max_steps=chunk)
        done += chunk
        state = trainer.current_state()
        stop = record(done)
    curve.final_state = state
    return curve


# --- clocks --------------------------------------------------------------------------------


def _check_population(population: Sequence[PeerSpec]) -> None:
    if not population:
        raise ValueError("the data-parallel baseline needs at least one peer in the population")
    ids = [p.peer_id for p in population]
    if len(set(ids)) != len(ids):
        raise ValueError("peer ids in the population must be unique")


def _effective(population: Sequence[PeerSpec]) -> FloatArray:
    """Each peer's effective speed, FLOP/s × MFU."""
    return np.array([p.flops * p.mfu for p in population], dtype=np.float64)


def datacenter_step_s(population: Sequence[PeerSpec], target: Target) -> float:
    """Seconds of one proxy step of the datacenter ideal: ``len(population)`` identical machines
    of the population's mean effective speed, each doing `target.tokens_per_step` tokens per
    target step, communication free: k × 6 · P · tokens_per_step / mean(flops · mfu)."""
    _check_population(population)
    return target.flops_per_proxy_step / float(_effective(population).mean())


def _check_steps(steps: Sequence[int]) -> list[int]:
    out: list[int] = []
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 0:
            raise ValueError(f"proxy step counts must be non-negative whole numbers, not {s!r}")
        if out and s < out[-1]:
            raise ValueError(
                f"proxy step counts must be in ascending order, but {s} follows {out[-1]}"
            )
        out.append(int(s))
    return out


class _Membership:
    """Who is online when: each peer's intervals, and all starts and ends in time order."""

    def __init__(
        self, population: Sequence[PeerSpec], online: Mapping[str, Sequence[Interval]] | None
    ) -> None:
        schedule = dict(online or {})
        ids = [p.peer_id for p in population]
        strangers = sorted(set(schedule) - set(ids))
        if strangers:
            raise ValueError(f"the online schedule names peers not in the population: {strangers}")
        always: list[Interval] = [(0.0, math.inf)]
        self.intervals = [list(schedule.get(pid, always)) for pid in ids]
        counts = [len(x) for x in self.intervals]
        flat = np.fromiter(
            itertools.chain.from_iterable(itertools.chain.from_iterable(self.intervals)),
            np.float64,
            count=2 * sum(counts),
        )
        starts, ends = flat[0::2], flat[1::2]
        owner = np.repeat(np.arange(len(ids)), counts)
        bad = ~(np.isfinite(starts) & (starts >= 0) & (starts < ends))
        bad[1:] |= (owner[1:] == owner[:-1]) & (ends[:-1] > starts[1:])
        if bad.any():
            pid = ids[int(owner[int(np.argmax(bad))])]
            raise ValueError(
                f"peer {pid}'s online intervals must be non-empty, start at 0 or later, "
                "and be in time order without overlap"
            )
        self.starts: list[float] = np.sort(starts).tolist()
        self.ends: list[float] = np.sort(ends[np.isfinite(ends)]).tolist()

    def count(self, t: float) -> tuple[int, float]:
        """How many peers are online at `t`, and when that can next change (inf: never)."""
        i = bisect.bisect_right(self.starts, t)
        k = bisect.bisect_right(self.ends, t)
        nxt = min(
            self.starts[i] if i < len(self.starts) else math.inf,
            self.ends[k] if k < len(self.ends) else math.inf,
        )
        return i - k, nxt

    def is_online(self, peer: int, t: float) -> bool:
        """Whether peer number `peer` is online at `t` (intervals are half-open)."""
        intervals = self.intervals[peer]
        j = bisect.bisect_right(intervals, (t, math.inf)) - 1
        return j >= 0 and t < intervals[j][1]

    def first_online(self, order: list[int], t: float) -> int:
        """The first peer in `order` online at `t` (someone must be)."""
        return next(p for p in order if self.is_online(p, t))


class _StepClock:
    """Seconds of one ddp-wan proxy step for the membership at a time."""

    def __init__(
        self,
        population: Sequence[PeerSpec],
        target: Target,
        membership: _Membership,
        allreduce_bytes_per_param: float,
    ) -> None:
        self.membership = membership
        self.target = target
        self.ranks = len(population)
        self.bits = target.params * allreduce_bytes_per_param * 8.0
        self.eff: list[float] = _effective(population).tolist()
        self.bw: list[float] = [min(p.up_bps, p.down_bps) for p in population]
        self.rtt: list[float] = [p.rtt_s for p in population]
        # Peers from the worst to the best in each respect: the first one online paces a step.
        self.by_eff: list[int] = np.argsort(self.eff, kind="stable").tolist()
        self.by_bw: list[int] = np.argsort(self.bw, kind="stable").tolist()
        self.by_rtt: list[int] = np.argsort(np.negative(self.rtt), kind="stable").tolist()

    def step_s(self, n: int, t: float) -> float:
        """k × max(t_compute, t_allreduce) with the `n` (≥ 1) peers online at `t`."""
        m = self.membership
        if n == self.ranks:  # everyone: no need to look for the slowest online peer
            slowest, narrowest, farthest = self.by_eff[0], self.by_bw[0], self.by_rtt[0]
        else:
            slowest = m.first_online(self.by_eff, t)
            narrowest = m.first_online(self.by_bw, t)
            farthest = m.first_online(self.by_rtt, t)
        compute = self.target.flops_per_step * (self.ranks / n) / self.eff[slowest]
        ring = 0.0
        if n > 1:  # 2(n-1) ring hops of one one-way latency (rtt / 2) each
            bandwidth = 2 * (n - 1) / n * self.bits / self.bw[narrowest]
            ring = bandwidth + 2 * (n - 1) * self.rtt[farthest] / 2
        return self.target.steps_per_proxy_step * max(compute, ring)


def ddp_wan_times(
    population: Sequence[PeerSpec],
    target: Target,
    steps: Sequence[int],
    *,
    online: Mapping[str, Sequence[Interval]] | None = None,
    allreduce_bytes_per_param: float = 2.0,
) -> list[float]:
    """Virtual time at which ddp-wan reaches each proxy step count in `steps` (ascending).

    `online` maps a peer id to its online intervals ``[start, end)`` in time order, as in
    `sim.des.simulate` (a peer it leaves out, or every peer when None, is always online). Each
    proxy step lasts k × max(t_compute, t_allreduce) with the peers online at its start (see
    the module docstring); with nobody online the run waits until someone is. Raises ValueError
    for an empty population, a bad step list or schedule, or a step that is never reached.
    """
    _check_population(population)
    if not (math.isfinite(allreduce_bytes_per_param) and allreduce_bytes_per_param > 0):
        raise ValueError(
            f"allreduce_bytes_per_param must be a positive number, not {allreduce_bytes_per_param}"
        )
    wanted = _check_steps(steps)
    membership = _Membership(population, online)
    clock = _StepClock(population, target, membership, allreduce_bytes_per_param)
    times = [0.0] * len(wanted)
    q = bisect.bisect_right(wanted, 0)  # step 0 is reached at time 0
    t, done = 0.0, 0
    last = wanted[-1] if wanted else 0
    while q < len(wanted):
        n, change = membership.count(t)
        if n == 0:
            if math.isinf(change):
                raise ValueError(
                    f"nobody is online from {t:.1f} s on, so proxy step {wanted[q]} is never "
                    "reached; give the peers online time past it"
                )
            t = change
            continue
        d = clock.step_s(n, t)
        # Every step that starts before `change` has the membership of `t`.
        more = last - done if math.isinf(change) else max(1, math.ceil((change - t) / d))
        more = min(more, last - done)
        while q < len(wanted) and wanted[q] <= done + more:
            times[q] = t + (wanted[q] - done) * d
            q += 1
        done += more
        t += more * d
    return times
