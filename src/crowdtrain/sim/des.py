"""Discrete-event simulation of a volunteer swarm: the real protocol and numerics, virtual time.

Every volunteer is a process on an `EventLoop`. It joins, asks the `RoundProtocol` for work,
downloads θ, computes, uploads its pseudo-gradient and asks again, exactly as the networked
client does: each is a `VolunteerMachine` (`client/machine.py`), the very state machine the
HTTP client drives, whose decisions this driver carries out in virtual time. The protocol core,
the `LocalTrainer` numerics and the codec are the real ones; only time is simulated. This
measures DiLoCo-style rounds (Douillard et al., "DiLoCo: Distributed Low-Communication Training
of Language Models", 2023, arXiv:2311.08105) on volunteer links and machines.

What is modelled:

* **Real-world scaling.** The numerics run on the small proxy model of the run config, but the
  clock charges the costs of a `Target` model: a download of ``params × bytes_per_param_down``
  bytes, an upload of ``params × bytes_per_param_up`` bytes, and, for every proxy step,
  ``steps_per_proxy_step`` (k) inner steps of ``6 × params × tokens`` FLOPs each at the peer's
  FLOP/s × MFU. A proxy round of H_proxy inner steps thus stands for a target round of
  H_target = k × H_proxy steps. A "seconds" budget trains proxy steps (each costing k target
  steps) until ``max_seconds`` is reached, the step that crosses it included, as
  `LocalTrainer` does.

Why the proxy is a fair stand-in: what decides DiLoCo's efficiency on slow links is the compute
time of a round against its communication time (the seconds a peer trains versus the seconds
its download and upload take, and how both compare with the deadline). Those times are set here
by the target's size, tokens, FLOP/s, MFU and bandwidth, never by the proxy, so the round
structure is the target's: how many rounds fit in an hour, which peers make the deadline or
lapse, how the coordinator's links queue, what each peer's utilization is. The loss curve is the
proxy's, not the target's. The similarity fails where the target's own numerics matter: how its
loss responds to a longer H (a larger model often tolerates more local steps than a small proxy
with k × fewer steps), memory (whether a 1B model fits the peer's GPU at the assumed batch, and
the optimizer state it holds between rounds), and how stragglers' stale or missing
contributions slow a large model's convergence, which the proxy reproduces only qualitatively.
* **Links** (`network.Network`): latency + bytes / bandwidth per transfer, FIFO per peer link,
  the coordinator's ingress and egress as shared capacities.
* **Churn**: each peer is online during its intervals. Going offline drops its transfers and
  pending work silently, as a closed laptop does: the coordinator learns of it only when
  `rounds.peer_timeout_s` passes without a heartbeat (the coordinator ticks and online peers
  heartbeat every ``tick_s``), so its order lapses at the next tick; with ``goodbye=True`` the
  peer says `PeerLeft` instead. Coming back online, it joins again and asks for work.
* **Deadlines**: a `Tick` at every round's deadline lets the protocol close on its quorum.
* **Spot-checks**: a peer replays a `VerifyOrder` for the virtual time of its steps; a replay
  the coordinator runs itself costs no virtual time. A slow peer's replay of a fast peer's
  steps can outlast the check's lapse (``rounds.deadline_s``); the coordinator then turns it
  away, as the check went to another peer (counted in `SimResult.late_checks`).
* **Overlap** (Streaming DiLoCo, Douillard et al. 2025, arXiv:2501.18512), when the run's
  ``inner.overlap`` is on, as the volunteer client does it: after uploading round r's Δ a peer
  goes on training round r's order from θ_r − Δ_sent until its next base arrives (a step under
  way is finished first), at most one round's budget, and rebases that progress onto the new
  base (the machine's own overlap, so spot-checks replay it exactly). A spot-check replay
  pauses it for the replay's steps. Its steps are counted in virtual time and their numerics
  run when it is stopped, from where the machine said it starts.
* **Downloads**: a peer fetches the data shards of an order and θ of its base version unless
  it has them cached (it keeps the last few versions), one request each; a replay of overlapped
  work also fetches the prior θ and payload.
* **The coordinator's close** takes ``coordinator_close_s``; no new base goes out before it.
* **Crashes**: a work order's training fails part-way with probability ``fail_mid_round``.

What is not modelled: the coordinator's verification of uploads delaying other requests, GPU
memory, and the polling delay of a waiting peer (a peer told to wait is woken as soon as a
round closes, as with a long poll; the networked client polls every 0.25 s).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from crowdtrain import codec
from crowdtrain import protocol as pr
from crowdtrain.client import events as ve
from crowdtrain.client import machine as vm
from crowdtrain.client.work import CheckLike, Params, ScoreLike, WorkLike
from crowdtrain.config import CodecConfig, RunConfig, scores_on_peers
from crowdtrain.models import initial_state
from crowdtrain.robust import DictSource, read_all
from crowdtrain.robust.usefulness import Scorers
from crowdtrain.sim.events import EventLoop, Handle
from crowdtrain.sim.network import Link, Network
from crowdtrain.sim.population import PeerSpec, flops_per_step, step_seconds
from crowdtrain.sim.swarm import RunData, as_steps, decode_submission, replay, trainer_for
from crowdtrain.train import Contribution, LocalTrainer, evaluate

__all__ = [
    "SimResult",
    "Target",
    "budget_steps",
    "bytes_per_param",
    "fitted_steps",
    "online_seconds",
    "simulate",
]

Interval = tuple[float, float]
_BASES_KEPT = 5  # versions of θ kept for replays (spot-checks lapse after 3 rounds)


@dataclass(frozen=True)
class Target:
    """The real-world run whose costs the virtual clock charges (real-world scaling)."""

    params: int  # P of the target model (e.g. 1e9)
    tokens_per_step: int  # tokens per inner step per peer (batch × context of the target)
    bytes_per_param_up: float  # wire bytes per parameter of an upload (int8: about 1)
    bytes_per_param_down: float  # wire bytes per parameter of a weights download (fp32: 4)
    steps_per_proxy_step: float = 1.0  # k: target inner steps one proxy step stands for
    # Wire bytes per parameter of a compressed broadcast update (``protocol.broadcast``), which
    # a peer holding the previous version downloads instead of θ and the moments; None: none.
    bytes_per_param_update: float | None = None

    def __post_init__(self) -> None:
        if self.params < 1 or self.tokens_per_step < 1:
            raise ValueError(
                f"the target needs at least one parameter and one token per step, not "
                f"params={self.params} and tokens_per_step={self.tokens_per_step}"
            )
        names = ["bytes_per_param_up", "bytes_per_param_down", "steps_per_proxy_step"]
        if self.bytes_per_param_update is not None:
            names.append("bytes_per_param_update")
        for name in names:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"the target's {name} must be a positive number, not {value}")

    @property
    def upload_bytes(self) -> int:
        """Bytes of one pseudo-gradient upload."""
        return round(self.params * self.bytes_per_param_up)

    @property
    def download_bytes(self) -> int:
        """Bytes of one download of the global weights."""
        return round(self.params * self.bytes_per_param_down)

    @property
    def update_bytes(self) -> int | None:
        """Bytes of one compressed broadcast update (None: θ always travels whole)."""
        up = self.bytes_per_param_update
        return None if up is None else max(1, round(self.params * up))

    @property
    def flops_per_step(self) -> float:
        """Training FLOPs of one inner step of the target on one peer."""
        return flops_per_step(self.params, self.tokens_per_step)

    @property
    def flops_per_proxy_step(self) -> float:
        """FLOPs the clock charges for one proxy step: ``steps_per_proxy_step`` target steps."""
        return self.flops_per_step * self.steps_per_proxy_step


def bytes_per_param(spec: CodecConfig, numel: int = 1 << 20) -> float:
    """Wire bytes per parameter of `spec`'s payload, measured on one tensor of `numel` values."""
    return codec.max_payload_bytes({"x": (numel,)}, spec) / numel


def budget_steps(budget: str, max_steps: int, max_seconds: float, step_s: float) -> int:
    """Proxy steps a peer taking `step_s` seconds per step trains on a budget: `max_steps` for
    a "steps" budget; for a "seconds" budget, as `LocalTrainer` checks the clock after each
    step, the steps until `max_seconds` is reached (the step that crosses it included)."""
    if budget == "steps":
        return max_steps
    if not step_s > 0:
        return 1
    return max(1, math.ceil(max_seconds / step_s * (1 - 1e-9)))


def fitted_steps(order: pr.WorkOrder, step_s: float) -> int:
    """The proxy steps a peer taking `step_s` seconds per step trains for `order`."""
    return budget_steps(order.budget, order.max_steps, order.max_seconds, step_s)


@dataclass
class SimResult:
    """What a simulated run produced, in virtual time."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    per_peer: dict[str, dict[str, float]] = field(default_factory=dict)
    final_eval_loss: float = math.nan
    initial_eval_loss: float = math.nan
    virtual_time_s: float = 0.0
    events: int = 0  # how many events the loop ran
    late_checks: int = 0  # spot-check replays turned away because their check had lapsed
    verdicts: dict[str, int] = field(default_factory=dict)  # "stage:outcome" → how many
    # Every verdict but a passed spot-check, with its reason, for audit.
    refusals: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON-serialisable document."""
        return {
            "rounds": [dict(r) for r in self.rounds],
            "per_peer": {k: dict(v) for k, v in self.per_peer.items()},
            "final_eval_loss": self.final_eval_loss,
            "initial_eval_loss": self.initial_eval_loss,
            "virtual_time_s": self.virtual_time_s,
            "events": self.events,
            "late_checks": self.late_checks,
            "verdicts": dict(self.verdicts),
            "refusals": [dict(r) for r in self.refusals],
        }


def online_seconds(intervals: Sequence[Interval] | None, end: float) -> float:
    """Seconds of ``[0, end)`` inside the online `intervals` (None: online throughout)."""
    if intervals is None:
        return end
    return sum(max(0.0, min(b, end) - min(a, end)) for a, b in intervals)


def simulate(
    config: RunConfig,
    population: list[PeerSpec],
    target: Target,
    *,
    online: Mapping[str, list[Interval]] | None = None,
    coordinator_in_bps: float = math.inf,
    coordinator_out_bps: float = math.inf,
    coordinator_close_s: float | Callable[[int], float] = 0.0,
    eval_batches: int = 8,
    eval_batch_size: int = 16,
    goodbye: bool = False,
    tick_s: float | None = None,
    fail_mid_round: float = 0.0,
    restart_s: float = 60.0,
    shards_cached: bool = False,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> SimResult:
    """Run `config.rounds.total` rounds of the protocol with `population` in virtual time.

    `online` maps a peer id to its online intervals ``[start, end)`` in time order (a peer it
    leaves out, or every peer when it is None, is always online). `goodbye` makes a peer that
    goes offline say so (`PeerLeft`) instead of going silent. `coordinator_close_s` is the
    coordinator's own time to close a round (seconds, or seconds as a function of the round's
    contributions: `sim.coordinator_cost`): the next base goes out that long after the last
    awaited upload. The coordinator ticks, and online peers send
    heartbeats, every `tick_s` (default: the networked client's heartbeat interval,
    ``peer_timeout_s / 4`` within 1–15 s). A work order's training crashes part-way with
    probability `fail_mid_round` (its work is lost; the volunteer is back after `restart_s`).
    A volunteer downloads the data shards of its orders that it has not cached, unless
    `shards_cached` (the whole corpus is in every volunteer's cache from the start).
    `on_round` gets each round's row. Raises RuntimeError when the run stalls before its last
    round.
    """
    ids = [p.peer_id for p in population]
    if not ids:
        raise ValueError("the simulation needs at least one peer")
    if len(set(ids)) != len(ids):
        raise ValueError("peer ids in the population must be unique")
    tick = vm.heartbeat_interval(config) if tick_s is None else tick_s
    close = (
        coordinator_close_s if callable(coordinator_close_s) else _fixed(float(coordinator_close_s))
    )
    for name, value in (
        ("coordinator_close_s", close(1)),
        ("restart_s", restart_s),
    ):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value}")
    if not (math.isfinite(tick) and tick > 0):
        raise ValueError(f"tick_s must be a positive number of seconds, not {tick}")
    if not 0.0 <= fail_mid_round <= 1.0:
        raise ValueError(f"fail_mid_round must be a probability in [0, 1], not {fail_mid_round}")
    schedule = dict(online or {})
    strangers = sorted(set(schedule) - set(ids))
    if strangers:
        raise ValueError(f"the online schedule names peers not in the population: {strangers}")
    for pid, intervals in schedule.items():
        if any(not 0 <= a < b for a, b in intervals) or any(
            b1 > a2 for (_, b1), (a2, _) in itertools.pairwise(intervals)
        ):
            raise ValueError(
                f"peer {pid}'s online intervals must be non-empty, start at 0 or later, "
                "and be in time order without overlap"
            )

    if config.defence.scoring == "auto":  # decided by the target's size, not the proxy's
        scoring = "peer" if scores_on_peers(config.defence, target.params) else "coordinator"
        defence = config.defence.model_copy(update={"scoring": scoring})
        config = config.model_copy(update={"defence": defence})
    data = RunData.load(config, eval_batches, eval_batch_size)
    manifest, shards, evals = data.manifest, data.shards, data.evals
    loop = EventLoop()
    network = Network(
        loop, coordinator_in_bps=coordinator_in_bps, coordinator_out_bps=coordinator_out_bps
    )
    protocol = pr.RoundProtocol(
        config, initial_state(config.model), manifest.train_ids, loop.clock, probe=data.probe
    )
    shared = LocalTrainer(config.model, config.inner)
    peers: list[_Peer] = []
    for spec in population:
        network.add_peer(spec.peer_id, Link(spec.up_bps, spec.down_bps, spec.rtt_s))
        trainer = trainer_for(config, shared)
        intervals = list(schedule.get(spec.peer_id, [(0.0, math.inf)]))
        step_s = step_seconds(target.flops_per_proxy_step, spec)  # one proxy step
        machine = vm.VolunteerMachine(spec.peer_id, config, protocol.shapes)
        peer = _Peer(spec, machine, trainer, step_s, intervals)
        if shards_cached:
            peer.shards.update(shards)
        peers.append(peer)

    def evaluate_now() -> float:
        return evaluate(config.model, protocol.params, evals)

    options = _Options(
        goodbye=goodbye,
        close_s=close,
        tick_s=tick,
        fail_mid_round=fail_mid_round,
        restart_s=restart_s,
        seed=config.seed,
    )
    sim = _Sim(
        config, protocol, loop, network, peers, shards, target, evaluate_now, options, on_round
    )
    sim.val_ids = list(manifest.val_ids)
    for p in peers:
        for start, end in p.intervals:
            loop.schedule(start, functools.partial(sim.come_online, p), label="online")
            if math.isfinite(end):
                loop.schedule(end, functools.partial(sim.go_offline, p), label="offline")
    sim.schedule_tick()
    result = SimResult(initial_eval_loss=evaluate_now())
    while not (sim.finished or sim.stalled) and loop.run(max_events=1):
        result.events += 1

    end = loop.now
    if not sim.finished:
        r = protocol.round
        waiting = ", ".join(sorted(protocol.assigned())) or "no peer"
        raise RuntimeError(
            f"the run stalled at round {r}: {len(protocol.submitted())} of the quorum of "
            f"{config.rounds.quorum} contributed by {end:.1f} s (virtual) and nothing is left to "
            f"happen (orders held by: {waiting}); add peers or online time, or lower the quorum"
        )
    end = max(end, sim.ready_at)  # the last close's aggregation and evaluation
    for p in peers:
        sim.stop(p)  # counts the compute of peers busy at the end
        online_s = online_seconds(p.intervals, end)
        stats = network.stats(p.peer_id)
        result.per_peer[p.peer_id] = {
            "compute_s": p.compute_s,
            "online_s": online_s,
            "utilization": p.compute_s / online_s if online_s > 0 else 0.0,
            "first_compute_s": math.nan if p.first_compute_s is None else p.first_compute_s,
            "bytes_up": stats.bytes_up,
            "bytes_down": stats.bytes_down,
            "contributions": p.contributions,
            "steps": p.steps,
            "failures": p.failures,
        }
    result.rounds = sim.rounds
    result.final_eval_loss = sim.rounds[-1]["eval_loss"]
    result.virtual_time_s = end
    result.late_checks = sim.late_checks
    result.verdicts = dict(Counter(f"{v.stage}:{v.outcome}" for v in protocol.verdicts))
    result.refusals = [
        {
            "round": v.round,
            "peer_id": v.peer_id,
            "stage": v.stage,
            "outcome": v.outcome,
            "reason": v.reason,
        }
        for v in protocol.verdicts
        if v.outcome != "check_passed"
    ]
    return result


@dataclass(eq=False)
class _VirtualSpeculation:
    """Overlapped training in virtual time: the machine's `Speculate` segment (round r's order
    from θ_r − Δ_sent, Streaming DiLoCo, Douillard et al. 2025, arXiv:2501.18512), started at
    `started`, for at most its budget (`cap` steps). Its numerics run when it is stopped."""

    segment: ve.Segment
    round: int
    started: float
    paused: bool = False  # a spot-check replay runs meanwhile
    paused_s: float = 0.0  # time spent on spot-check replays meanwhile

    @property
    def cap(self) -> int:
        assert self.segment.max_steps is not None  # simulated orders have steps budgets
        return self.segment.max_steps

    def steps_by(self, now: float, step_s: float) -> int:
        """Steps trained by `now`; a step under way is finished first (as `stop` does)."""
        if step_s <= 0:
            return self.cap
        elapsed = max(0.0, now - self.started - self.paused_s)
        return min(self.cap, math.ceil(elapsed / step_s - 1e-9))

    def ends(self, steps: int, step_s: float) -> float:
        """When `steps` speculative steps are done."""
        return self.started + self.paused_s + steps * step_s


@dataclass(eq=False)
class _Peer:
    """One simulated volunteer's state in the loop: its machine, and what time it takes."""

    spec: PeerSpec
    machine: vm.VolunteerMachine
    trainer: LocalTrainer
    step_s: float
    intervals: list[Interval]
    online: bool = False
    stopped: bool = False  # banned or the run finished
    pending: list[Handle] = field(default_factory=list)  # compute end, retries
    waiting: Handle | None = None  # the retry of a Wait
    computing_since: float | None = None
    free_at: float = 0.0  # when a step under way of stopped overlapped training ends
    base: dict[str, torch.Tensor] | None = None  # θ of the order being fetched
    scored: dict[str, torch.Tensor] | None = None  # Δ of the score order being fetched
    compute_s: float = 0.0
    first_compute_s: float | None = None
    steps: int = 0
    contributions: int = 0
    failures: int = 0  # work orders lost to a crash mid-round
    shards: set[str] = field(default_factory=set)  # data shards in its cache
    versions: set[int] = field(default_factory=set)  # versions of θ in its cache
    speculation: _VirtualSpeculation | None = None  # overlapped training while transfers run

    @property
    def peer_id(self) -> str:
        return self.spec.peer_id

    def keep(self, version: int) -> None:
        """θ of `version` is downloaded; the cache keeps the last few versions."""
        self.versions.add(version)
        for old in [v for v in self.versions if v <= version - _BASES_KEPT]:
            self.versions.discard(old)

    def comes_back(self, now: float) -> bool:
        """Whether an online interval starts after `now`."""
        return any(start > now for start, _ in self.intervals)


def _fixed(seconds: float) -> Callable[[int], float]:
    """A close that takes the same seconds whatever it aggregates."""
    return lambda k: seconds


@dataclass(frozen=True)
class _Options:
    """How the simulated coordinator and volunteers behave beyond the run config."""

    goodbye: bool = False  # a leaving peer says PeerLeft instead of going silent
    # The coordinator's compute per close of K contributions: no new base before it is done.
    close_s: Callable[[int], float] = lambda k: 0.0
    tick_s: float = 15.0  # how often the coordinator ticks and online peers heartbeat
    fail_mid_round: float = 0.0  # chance that a work order's training crashes part-way
    restart_s: float = 60.0  # how long a crashed volunteer takes to come back
    seed: int = 0


class _Sim:
    """One simulated run: the loop, the network, the protocol and the peers."""

    def __init__(
        self,
        config: RunConfig,
        protocol: pr.RoundProtocol,
        loop: EventLoop,
        network: Network,
        peers: list[_Peer],
        shards: dict[str, np.ndarray],
        target: Target,
        evaluate_now: Callable[[], float],
        options: _Options,
        on_round: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        self.config = config
        self.protocol = protocol
        self.loop = loop
        self.network = network
        self.peers = {p.peer_id: p for p in peers}
        self.shards = shards
        self.target = target
        self.evaluate_now = evaluate_now
        self.options = options
        self.on_round = on_round
        self.rng = np.random.default_rng(options.seed)
        self.trainer = peers[0].trainer  # the coordinator's own spot-check replays
        self.bases: dict[int, dict[str, torch.Tensor]] = {}
        # ref → (round, θ_r − Δ_sent): where a contribution's overlapped successor began
        self.starts: dict[str, tuple[int, Params]] = {}
        self.rounds: list[dict[str, Any]] = []
        self.opened_at = loop.now
        self.ready_at = loop.now  # when the open round's base is published (after a close)
        self.tick: Handle | None = None
        self.finished = False
        self.stalled = False
        self.late_checks = 0  # spot-check replays turned away: their check lapsed meanwhile
        self.val_ids: list[str] = []  # the validation shards, for score orders

    # --- the coordinator's side ----------------------------------------------------------

    def base(self, version: int) -> dict[str, torch.Tensor]:
        """θ of `version`, copied when first asked for (it must be the current version then)."""
        if version not in self.bases:
            if version != self.protocol.version:
                raise RuntimeError(f"the weights of version {version} are no longer kept")
            self.bases[version] = self.protocol.base()
            for old in [v for v in self.bases if v <= version - _BASES_KEPT]:
                del self.bases[old]
        return self.bases[version]

    def schedule_tick(self) -> None:
        """The next tick: `tick_s` from now, or the open round's deadline if that is sooner."""
        if self.tick is not None:
            self.loop.cancel(self.tick)
        now = self.loop.now
        deadline = self.protocol.deadline
        at = (
            min(deadline, now + self.options.tick_s)
            if deadline > now
            else now + self.options.tick_s
        )
        self.tick = self.loop.schedule(at, self.on_tick, label="tick")

    def on_tick(self) -> None:
        self.tick = None
        for p in self.peers.values():  # online peers heartbeat; offline ones are silent
            if p.online and not p.stopped:
                self.protocol.handle(pr.PeerSeen(p.peer_id))
        self.act(self.protocol.handle(pr.Tick()))
        if self.finished:
            return
        if self.stuck():
            self.stalled = True
            return
        self.schedule_tick()

    def act(self, decisions: list[pr.Decision]) -> None:
        """Follow up on decisions that concern the run rather than the asking peer."""
        for d in decisions:
            if isinstance(d, pr.RoundClosed):
                self.closed(d)
            elif isinstance(d, pr.RunFinished):
                self.finished = True
            elif isinstance(d, pr.Banned):
                self.stop(self.peers[d.peer_id])
            elif isinstance(d, pr.VerifyOrder) and not d.peer_id:  # the coordinator replays it
                base, prior = self.base(d.base_version), self.prior_start_of(d)
                result = replay(self.trainer, d, base, self.shards, self.config, prior)
                event = pr.VerificationSubmitted(
                    d.check_id, "", DictSource(result.delta), result.steps
                )
                self.act(self.protocol.handle(event))
            elif isinstance(d, pr.Unknown):
                raise RuntimeError(f"the protocol does not know peer {d.peer_id}: {d.reason}")

    def prior_start_of(self, order: pr.VerifyOrder) -> Params | None:
        """Where the overlapped steps a replay of `order` redoes began (None: there are none)."""
        return None if order.prior is None else self.starts[order.prior.payload_ref][1]

    def closed(self, d: pr.RoundClosed) -> None:
        # The coordinator closes the round (`close_s`); the new base is out after it.
        close_s = self.options.close_s(len(d.contributors))
        now = self.loop.now + close_s
        self.ready_at = now
        if not self.protocol.finished:
            self.protocol.delay_open(close_s)  # the next round opens once the close is done
        for pid in d.contributors:
            self.peers[pid].contributions += 1
        row: dict[str, Any] = {
            "round": d.round,
            "close_time_s": now,
            "eval_loss": self.evaluate_now(),
            "contributions": len(d.contributors),
            "duration_s": now - self.opened_at,
            "close_s": close_s,
        }
        self.rounds.append(row)
        self.opened_at = now
        for ref in [r for r, (rnd, _) in self.starts.items() if rnd <= d.round - _BASES_KEPT]:
            del self.starts[ref]
        if self.on_round is not None:
            self.on_round(row)
        if self.protocol.finished:
            return
        self.schedule_tick()
        for p in self.peers.values():  # a new round: wake the peers told to wait
            if p.waiting is not None and self.cancel(p, p.waiting):
                p.waiting = None
                self.later(p, now - self.loop.now, self.retry, "wake")

    # --- a peer's process -----------------------------------------------------------------

    def later(self, p: _Peer, delay: float, action: Callable[[_Peer], None], label: str) -> Handle:
        """Run `action(p)` after `delay`; going offline cancels it."""
        handle = self.loop.after(delay, lambda: self.run_pending(p, handle, action), label=label)
        p.pending.append(handle)
        return handle

    def run_pending(self, p: _Peer, handle: Handle, action: Callable[[_Peer], None]) -> None:
        p.pending.remove(handle)
        action(p)

    def cancel(self, p: _Peer, handle: Handle) -> bool:
        if handle in p.pending:
            p.pending.remove(handle)
        return self.loop.cancel(handle)

    def come_online(self, p: _Peer) -> None:
        if p.online or p.stopped or self.finished:
            return
        p.online = True
        self.act(self.protocol.handle(pr.PeerJoined(p.peer_id, p.peer_id)))
        self.start(p)

    def start(self, p: _Peer) -> None:
        """The volunteer's process starts afresh (joining, back online, or restarted)."""
        p.machine.reset()
        self.run(p, p.machine.handle(ve.Start()))

    def go_offline(self, p: _Peer) -> None:
        if not p.online:
            return
        self.halt(p)
        p.online = False
        if self.options.goodbye and not p.stopped:
            self.act(self.protocol.handle(pr.PeerLeft(p.peer_id)))

    def halt(self, p: _Peer) -> None:
        """Drop the peer's transfers, pending events and overlapped work; count its compute."""
        self.network.cancel_peer(p.peer_id)
        for handle in list(p.pending):
            self.cancel(p, handle)
        p.waiting = None
        now = self.loop.now
        if p.computing_since is not None:  # (it may start later: a step under way first)
            p.compute_s += max(0.0, now - p.computing_since)
            p.computing_since = None
        spec, p.speculation = p.speculation, None
        if spec is not None:
            p.compute_s += min(now, spec.ends(spec.cap, p.step_s)) - spec.started - spec.paused_s
        p.free_at = 0.0

    def stop(self, p: _Peer) -> None:
        """The peer stops for good (banned, or the run finished)."""
        if not p.stopped:
            self.halt(p)
            p.stopped = True

    def crash(self, p: _Peer) -> None:
        """The volunteer's process dies mid-round: its work is lost, it is silent until it
        restarts `restart_s` later and asks for work again (its order may have lapsed)."""
        p.failures += 1
        self.halt(p)
        self.later(p, self.options.restart_s, self.restart, "restart")

    def restart(self, p: _Peer) -> None:
        self.act(self.protocol.handle(pr.PeerJoined(p.peer_id, p.peer_id)))
        self.start(p)

    def retry(self, p: _Peer) -> None:
        """Ask again: the wait the coordinator asked for is over, or the close is done."""
        p.waiting = None
        if p.machine.state is vm.State.WAITING:
            self.run(p, p.machine.handle(ve.Woke()))
        else:
            self.request(p)

    # --- carrying out the machine's decisions in virtual time ------------------------------

    def run(self, p: _Peer, decisions: list[ve.Decision]) -> None:
        """Carry out the machine's decisions in order; the last may take virtual time and
        answer with an event later. What follows stopped overlapped training waits for the
        step under way to end (training a segment accounts for that itself)."""
        now = self.loop.now
        if p.free_at > now and decisions and not isinstance(decisions[0], ve.Train):
            self.later(p, p.free_at - now, lambda q: self.run(q, decisions), "compute")
            return
        for d in decisions:
            self.carry_out(p, d)

    def carry_out(self, p: _Peer, d: ve.Decision) -> None:
        now = self.loop.now
        spec = p.speculation
        if isinstance(d, ve.AskForWork):
            self.request(p)
        elif isinstance(d, ve.Wait):
            p.waiting = self.later(p, d.seconds, self.retry, "retry")
        elif isinstance(d, ve.Fetch):
            base = p.base
            assert base is not None
            self.fetch(p, d.order, lambda: self.inputs_ready(p, d.order, base))
        elif isinstance(d, ve.StopSpeculation):
            self.run(p, p.machine.handle(ve.SpeculationEnded(self.take_speculation(p))))
        elif isinstance(d, ve.Train):
            steps = d.segment.max_steps
            assert steps is not None  # simulated orders have steps budgets
            start, p.free_at = max(now, p.free_at), 0.0
            p.computing_since = start
            self.later(p, start - now + steps * p.step_s, lambda q: self.trained(q, d), "compute")
        elif isinstance(d, ve.Replay):
            steps = d.check.steps
            if spec is not None and spec.paused:  # the replay pauses the overlapped training
                spec.paused_s += steps * p.step_s
            p.computing_since = now
            self.later(p, steps * p.step_s, lambda q: self.trained(q, d), "compute")
        elif isinstance(d, ve.Evaluate):
            # Four forward passes over `score_batch_size` sequences; a training step is about
            # three forward passes' worth (forward and backward) over `batch_size`.
            cfg = self.config
            seconds = p.step_s * 4 * cfg.defence.score_batch_size / (3 * cfg.data.batch_size)
            if spec is not None and spec.paused:
                spec.paused_s += seconds
            p.computing_since = now
            self.later(p, seconds, lambda q: self.evaluated(q, d), "compute")
        elif isinstance(d, ve.UploadScore):
            self.answered(p, pr.ScoreSubmitted(d.check.check_id, p.peer_id, d.score))
        elif isinstance(d, ve.Speculate):
            p.speculation = _VirtualSpeculation(d.segment, d.round, now)
        elif isinstance(d, ve.PauseSpeculation | ve.ResumeSpeculation):
            if spec is not None:
                spec.paused = isinstance(d, ve.PauseSpeculation)
        elif isinstance(d, ve.UploadReplay):
            self.replayed(p, d)
        elif isinstance(d, ve.Upload):
            began = None if spec is None or spec.round != d.order.round else spec.segment.base
            nbytes = self.target.upload_bytes
            self.network.upload(p.peer_id, nbytes, lambda: self.arrived(p, d, began))

    def request(self, p: _Peer) -> None:
        if p.stopped or not p.online or self.finished:
            return
        if self.loop.now < self.ready_at:  # the coordinator is still closing the round
            p.waiting = self.later(p, self.ready_at - self.loop.now, self.retry, "closing")
            return
        (d,) = self.protocol.handle(pr.WorkRequested(p.peer_id))
        if isinstance(d, pr.WorkOrder | pr.VerifyOrder | pr.ScoreOrder):
            p.base = self.base(d.base_version)
            if isinstance(d, pr.WorkOrder):  # exactly the steps that fit its budget
                self.run(p, p.machine.handle(ve.GotWork(as_steps(d, fitted_steps(d, p.step_s)))))
            elif isinstance(d, pr.ScoreOrder):  # the payload it downloads decodes to this
                p.scored = read_all(self.protocol.checks[d.check_id].delta, self.protocol.shapes)
                self.run(p, p.machine.handle(ve.GotScore(d)))
            else:
                self.run(p, p.machine.handle(ve.GotCheck(d)))
        elif isinstance(d, pr.Wait):
            self.run(p, p.machine.handle(ve.GotWait(d.retry_after, d.reason)))
            if p.peer_id in self.protocol.submitted() and self.stuck():
                self.stalled = True
        elif isinstance(d, pr.Banned | pr.RunFinished):
            self.stop(p)
        else:
            self.act([d])

    def fetch(
        self, p: _Peer, order: WorkLike | CheckLike | ScoreLike, then: Callable[[], None]
    ) -> None:
        """Download what `order` needs and the peer has not cached, one request after the
        other as the client makes them, then run `then`: the order's data shards, θ of its base
        version and, for a replay of overlapped work, θ of the prior version and the payload
        (for a score order: the scored payload and the validation shards)."""
        wanted: list[tuple[int, Callable[[], None]]] = []
        prior = order.prior if isinstance(order, pr.VerifyOrder) else None
        scoring = isinstance(order, pr.ScoreOrder)
        shard_ids = [
            *order.shard_ids,
            *(() if prior is None else prior.shard_ids),
            *(self.val_ids if scoring else ()),
        ]
        for sid in dict.fromkeys(shard_ids):
            if sid not in p.shards:
                wanted.append((self.shards[sid].nbytes, functools.partial(p.shards.add, sid)))
        versions = [order.base_version, *(() if prior is None else (prior.base_version,))]
        for version in dict.fromkeys(versions):
            if version not in p.versions:
                update = self.target.update_bytes
                rebuilt = update is not None and version - 1 in p.versions
                nbytes = update if rebuilt and update else self.target.download_bytes
                wanted.append((nbytes, functools.partial(p.keep, version)))
        if prior is not None or scoring:  # the prior payload, or the scored one
            wanted.append((self.target.upload_bytes, lambda: None))

        def next_request() -> None:
            if not wanted:
                then()
                return
            nbytes, done = wanted.pop(0)

            def arrived() -> None:
                done()
                next_request()

            self.network.download(p.peer_id, nbytes, arrived)

        next_request()

    def inputs_ready(
        self, p: _Peer, order: WorkLike | CheckLike | ScoreLike, base: dict[str, torch.Tensor]
    ) -> None:
        """The order's inputs are here: a replay starts (with its overlapped start, while
        still kept) or a score; a work order's training starts, or crashes part-way
        (`fail_mid_round`)."""
        now = self.loop.now
        if p.first_compute_s is None:
            p.first_compute_s = now
        if isinstance(order, pr.ScoreOrder):
            target, p.scored = p.scored, None
            self.run(p, p.machine.handle(ve.InputsReady(base, target=target)))
            return
        if isinstance(order, pr.VerifyOrder):
            self.run(p, p.machine.handle(ve.InputsReady(base, self.prior_start_of(order))))
            return
        assert isinstance(order, pr.WorkOrder)
        if self.options.fail_mid_round > 0 and self.rng.random() < self.options.fail_mid_round:
            done, start = self.end_speculation(p)
            p.computing_since = start
            rest = (order.max_steps - min(done, order.max_steps)) * p.step_s
            self.later(p, start - now + self.rng.random() * rest, self.crash, "crash")
            return
        self.run(p, p.machine.handle(ve.InputsReady(base)))

    def end_speculation(self, p: _Peer) -> tuple[int, float]:
        """End the peer's overlapped training as a new base arrives: the steps done by now (a
        step under way is finished first), counted as compute, and when they end."""
        now = self.loop.now
        spec, p.speculation = p.speculation, None
        if spec is None:
            return 0, now
        done = spec.steps_by(now, p.step_s)
        if done < 1:
            return 0, now
        p.compute_s += done * p.step_s
        p.steps += done
        return done, max(now, spec.ends(done, p.step_s))

    def take_speculation(self, p: _Peer) -> Contribution | None:
        """`end_speculation`, then the numerics of the steps done: the machine's segment for
        exactly that many steps. The rest of the round starts when they end (`free_at`)."""
        spec = p.speculation
        done, p.free_at = self.end_speculation(p)
        if spec is None or done < 1:
            return None
        segment = dataclasses.replace(spec.segment, max_steps=done)
        return segment.run(p.trainer.train, p.machine.batches(segment, self.shards))

    def trained(self, p: _Peer, d: ve.Train | ve.Replay) -> None:
        """A `Train` or `Replay` decision's compute time is over: its numerics, then on."""
        assert p.computing_since is not None
        p.compute_s += self.loop.now - p.computing_since
        p.computing_since = None
        if isinstance(d, ve.Replay):
            p.steps += d.check.steps
            result = d.run(p.trainer.train, self.shards, self.config)
        else:
            assert d.segment.max_steps is not None
            p.steps += d.segment.max_steps
            result = d.segment.run(p.trainer.train, p.machine.batches(d.segment, self.shards))
        self.run(p, p.machine.handle(ve.Trained(result)))

    def evaluated(self, p: _Peer, d: ve.Evaluate) -> None:
        """A score's compute time is over: the score itself, then on."""
        assert p.computing_since is not None
        p.compute_s += self.loop.now - p.computing_since
        p.computing_since = None
        score = d.run(self.scorers, self.shards, self.val_ids, self.config)
        self.run(p, p.machine.handle(ve.Evaluated(score)))

    @functools.cached_property
    def scorers(self) -> Scorers:
        """The models volunteers score with."""
        return Scorers(self.config.model)

    def replayed(self, p: _Peer, d: ve.UploadReplay) -> None:
        """A replay's Δ' reaches the protocol (its upload costs no virtual time here)."""
        check = d.check
        assert isinstance(check, pr.VerifyOrder)
        event = pr.VerificationSubmitted(
            check.check_id, p.peer_id, DictSource(d.result.delta), d.result.steps
        )
        self.answered(p, event)

    def answered(self, p: _Peer, event: pr.VerificationSubmitted | pr.ScoreSubmitted) -> None:
        """A replay or a score reaches the protocol (its upload costs no virtual time here).
        One that took longer than the check's lapse comes back to a check that was handed to
        another peer or is done: the coordinator turns it away, nothing more."""
        decisions = self.protocol.handle(event)
        self.act([x for x in decisions if not isinstance(x, pr.Unknown)])
        late = any(isinstance(x, pr.Unknown) for x in decisions)
        self.late_checks += late
        self.run(p, p.machine.handle(ve.Uploaded(not late)))

    def arrived(self, p: _Peer, d: ve.Upload, start: Params | None) -> None:
        """An upload reaches the coordinator: the format stage, then the protocol. `start` is
        where the overlapped training that followed it began (kept for replays)."""
        order = d.order
        assert isinstance(order, pr.WorkOrder)
        event = decode_submission(p.peer_id, order, d.payload, d.claim, self.protocol.shapes)
        if isinstance(event, pr.ContributionSubmitted):
            ref = f"{p.peer_id}/{order.round}"
            if start is not None:  # a later replay of overlapped work starts from θ_r − sent
                self.starts[ref] = (order.round, start)
            overlap = d.overlap or ve.NO_OVERLAP
            event = dataclasses.replace(
                event,
                ref=ref,
                overlap_steps=overlap.steps,
                overlap_round=overlap.round,
                overlap_first_batch=overlap.first_batch,
            )
        decisions = self.protocol.handle(event)
        self.act(decisions)
        self.run(
            p, p.machine.handle(ve.Uploaded(not any(isinstance(x, pr.Rejected) for x in decisions)))
        )

    def stuck(self) -> bool:
        """Nothing can change any more: the round is past its deadline, and every peer that is
        still in the run has contributed to it and is idle online, with no one left to come back."""
        now = self.loop.now
        if now < self.protocol.deadline:
            return False
        submitted = set(self.protocol.submitted())
        for p in self.peers.values():
            if p.stopped:
                continue
            if p.computing_since is not None or (p.online and p.peer_id not in submitted):
                return False
            if p.pending and not p.online:  # a crashed volunteer restarting
                return False
            if not p.online and p.comes_back(now):
                return False
        return True
