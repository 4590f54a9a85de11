"""Analytic steady-state throughput of DiLoCo rounds, for swarms too large for the simulator.

The discrete-event simulator (`sim.des`) runs the real protocol and numerics for every peer,
which is too costly for a folding@home-sized swarm of 10,000 volunteers. Where that is so, the
throughput is extrapolated with this closed-form model of the same rounds (DiLoCo, Douillard et
al. 2023, arXiv:2311.08105; overlap as Streaming DiLoCo's one-step-delayed outer update,
Douillard et al. 2025, arXiv:2501.18512), and the result says so (``extrapolated = True``).
It is validated against the simulator on populations the simulator can run
(``bench/analytic_vs_des.py``).

**A peer's round.** Peer i trains the whole proxy steps that fit its budget
(`des.fitted_steps`): ``C_i = steps_i × step_s_i`` seconds of compute, ``step_s_i`` = the
target's FLOPs per proxy step / (FLOP/s × MFU). It downloads θ (``target.download_bytes``; a
peer that holds the last version, the compressed broadcast's ``target.update_bytes`` when the
run has one: a joiner's first round pays the whole θ) and uploads Δ (``target.upload_bytes``),
each in ``1.5 × rtt + bytes × 8 / rate`` (`network.transfer_time`), at the rate ``min(its link,
the max-min fair share of the coordinator's side)`` when every peer holding an order transfers
at once. Its upload arrives ``x_i`` seconds after the round opens: ``x_i = down_i + C_i + up_i``
without overlap; with overlap the transfers and the coordinator's close (``close_s``) run while
it trains on, but never for more than one round's budget, so ``x_i = max(C_i − close_s, down_i +
up_i)`` (its period is ``max(C_i, down_i + up_i + close_s)``, the steady state of ``e_{r+1} =
max(e_r + C_i, open_{r+1} + down_i)``).

**The round** lasts ``R = X + close_s``, where X runs from its opening until every peer holding
an order has submitted or the deadline, whichever is first (the protocol closes early when all
assigned peers have contributed). X is at least the time the coordinator's egress needs for
every download of the round and its ingress for every upload (``n × bytes × 8 / bps``, n the
peers holding orders). A peer's useful compute is reckoned over ``max(R, x_i + close_s)``: an
online peer holds the round at least that long. A peer with ``x_i`` beyond
the deadline holds every round to the deadline and contributes nothing (its compute is lost).
When fewer contributions than ``rounds.quorum`` can make the deadline, the round runs on until
the quorum's can (the effective deadline is raised until the expected contributions reach it).
E[X] is computed from its distribution, ``E[X] = ∫₀ᴰ (1 − P(X ≤ s)) ds``, with each peer
holding an order independently with probability w = f × min(1, max_peers_per_round / (f × N)):
``P(X ≤ s) = P(every x_i > s is offline) × P(no hold beyond s)``, the first factor
``(1 − w)^#{x_i > s}`` conditioned on at least one peer holding an order.

**Churn** (online fraction f, mean session S; sessions taken as exponential, i.e. memoryless):

* f × N peers are online on average; each is online with probability f, independently.
* A peer online at a round's opening loses that round's work when its session ends before its
  upload arrives: it survives with probability ``exp(−E_i / S)``, where the exposure E_i is
  ``x_i`` without overlap and ``R + up_i`` with overlap (its compute started a whole period
  earlier, on speculation, and two rounds' work are in flight at any time).
* Per online second a synced peer starts 1/R rounds (the online time per round started is
  ``S (1 − e^{−R/S})``, and a fraction ``(S/R)(1 − e^{−R/S})`` of a session is synced; the
  product is 1/R), so its useful compute per online second is ``C_i exp(−E_i/S) / R``. For
  R ≪ S that is ``(C_i/R)(1 − E_i/S)``: without overlap a departure comes with probability
  ≈ R/S per round and costs on average half a round (the loss ``(x_i − R/2)/S`` of a session
  that starts synced, plus the ``R/(2S)`` a joining peer waits on average, see next).
* A peer that comes online during a round's join window (``RunConfig.join_window_s`` with the
  orders out at the opening) gets an
  order at once; it contributes in that round only if ``u + q_i`` (its join time plus a round
  without overlap, ``q_i = down_i + C_i + up_i``) makes the deadline. Peers come online at the
  rate ``f N / S``, and each such joiner holds the round until its upload or the deadline.
* A peer that leaves silently while holding an order holds the round until the heartbeat
  timeout (``rounds.peer_timeout_s``) passes; the coordinator ticks continuously. Orders are
  held at time u by the peers with ``x_i > u``, and each leaves at the rate 1/S.
* Joins and departures are Poisson processes, independent of each other and of who is online
  (terms of order (R/S)² and the joiners' own departures are dropped).

**The coordinator** is the bound (`Throughput.coordinator_bound`) when its links lengthen the
round or, where the deadline caps the round, cost more than 1% of the tokens per second (peers
its fair share pushes past the deadline); both compared with the same swarm and an unlimited
coordinator.

**Utilization** of a peer is its useful compute (that of accepted contributions) per online
second; `Throughput.utilization` is the plain mean over peers, `useful_flop_fraction` weights
each peer by its effective FLOP/s (FLOP/s × MFU): FLOPs landing in accepted contributions over
the FLOPs the online peers could deliver. Late contributions (``rounds.late = "accept"``),
verification (spot-check replays, scoring), data-shard downloads, memory limits and failures
other than leaving are not modelled, except that a work order crashing part-way with
probability ``fail_mid_round`` loses its work, and its peer, restarting to redo the order,
holds the round to the deadline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from crowdtrain.config import RunConfig
from crowdtrain.sim.des import Target
from crowdtrain.sim.network import LATENCY_RTTS
from crowdtrain.sim.population import PeerSpec

__all__ = ["PeerRounds", "Throughput", "extrapolate", "extrapolate_peers"]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

_GRID = 4096  # points of the grid E[X] is integrated on (plus every peer's x_i)
_BISECTIONS = 60  # steps of the search for the deadline a quorum needs
_BOUND_LOSS = 0.01  # the throughput lost to the coordinator's links that makes it the bound


@dataclass(frozen=True)
class Throughput:
    """What a swarm delivers in steady state, extrapolated analytically (not simulated)."""

    round_s: float  # mean seconds from a round's opening to the next's, close included
    online_peers: float  # expected peers online: f × N
    contributors_per_round: float  # expected accepted contributions per round
    utilization: float  # mean over peers of useful compute seconds per online second
    useful_flop_fraction: float  # FLOPs in accepted contributions / FLOPs available online
    bytes_per_peer_per_round: float  # bytes an online peer moves per round (θ down, Δ up)
    coordinator_bound: bool  # the coordinator's links lengthen rounds or cut tokens/s by > 1%
    tokens_per_s: float  # target tokens in accepted contributions per second
    extrapolated: bool = True
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON-serialisable document."""
        return {
            "round_s": self.round_s,
            "online_peers": self.online_peers,
            "contributors_per_round": self.contributors_per_round,
            "utilization": self.utilization,
            "useful_flop_fraction": self.useful_flop_fraction,
            "bytes_per_peer_per_round": self.bytes_per_peer_per_round,
            "coordinator_bound": self.coordinator_bound,
            "tokens_per_s": self.tokens_per_s,
            "extrapolated": self.extrapolated,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class PeerRounds:
    """Each peer's part of the steady state; arrays follow the population's order."""

    peer_ids: tuple[str, ...]
    steps: FloatArray  # proxy steps per round (fitted to the budget)
    compute_s: FloatArray  # C_i: seconds of compute per round
    download_s: FloatArray  # seconds to download θ, latency included
    upload_s: FloatArray  # seconds to upload Δ, latency included
    submit_s: FloatArray  # x_i: from a round's opening to its upload's arrival, when synced
    keeps_pace: BoolArray  # whether x_i makes the (effective) deadline
    survival: FloatArray  # probability a round it starts synced is not lost to churn
    utilization: FloatArray  # useful compute seconds per online second


@dataclass(frozen=True)
class _Inputs:
    """The validated inputs, as arrays."""

    run: RunConfig
    ids: tuple[str, ...]
    eff: FloatArray  # effective FLOP/s: FLOP/s × MFU
    up_bps: FloatArray
    down_bps: FloatArray
    rtt_s: FloatArray
    steps: FloatArray
    compute_s: FloatArray
    tokens: FloatArray  # target tokens per contribution
    down_bytes: float  # a whole θ (a joiner's first download)
    update_bytes: float  # what a peer that held the last version downloads
    up_bytes: float
    f: float
    session_s: float
    close_s: float
    fail: float  # the chance that a work order's training crashes part-way


@dataclass(frozen=True)
class _State:
    """One evaluation of the model at an effective deadline."""

    round_s: float
    x_s: float  # E[X] after the coordinator's floor and the cap
    contributions: float
    tokens_per_s: float
    down_s: FloatArray
    up_s: FloatArray
    submit_s: FloatArray
    keeps: BoolArray
    survival: FloatArray
    utilization: FloatArray


def _positive(name: str, value: float, *, inf_ok: bool = True) -> None:
    if not (value > 0 and (inf_ok or math.isfinite(value))):  # also rejects NaN
        raise ValueError(f"{name} must be a positive number, not {value!r}")


def _inputs(
    run: RunConfig,
    population: list[PeerSpec],
    target: Target,
    f: float,
    session_s: float,
    close_s: float,
    fail: float,
) -> _Inputs:
    if not population:
        raise ValueError("the analytic model needs at least one peer")
    if not 0 < f <= 1:  # also rejects NaN
        raise ValueError(f"online_fraction must be in (0, 1], not {f!r}")
    _positive("mean_session_s (seconds; inf: peers never leave)", session_s)
    if not (math.isfinite(close_s) and close_s >= 0):
        raise ValueError(f"close_s must be zero or more seconds, not {close_s!r}")
    if not 0 <= fail <= 1:
        raise ValueError(f"fail_mid_round must be a probability in [0, 1], not {fail!r}")
    cols = np.array(
        [(p.flops, p.mfu, p.up_bps, p.down_bps, p.rtt_s) for p in population], dtype=np.float64
    )
    flops, mfu, up, down, rtt = cols.T
    finite = np.isfinite(cols).all(axis=1)
    bad = ~finite | (flops <= 0) | (mfu <= 0) | (mfu > 1) | (up <= 0) | (down <= 0) | (rtt < 0)
    if bad.any():
        p = population[int(np.argmax(bad))]
        raise ValueError(
            f"peer {p.peer_id} needs finite positive FLOP/s and links, an MFU in (0, 1] and a "
            f"round trip of zero or more seconds, not {p}"
        )
    eff = flops * mfu
    step_s = target.flops_per_proxy_step / eff
    inner = run.inner
    if inner.budget == "steps":
        steps = np.full(len(population), float(inner.steps))
    else:  # until the budget is reached, the crossing step included (des.fitted_steps)
        steps = np.maximum(1.0, np.ceil(inner.seconds / step_s * (1 - 1e-9)))
    return _Inputs(
        run=run,
        ids=tuple(p.peer_id for p in population),
        eff=eff,
        up_bps=up,
        down_bps=down,
        rtt_s=rtt,
        steps=steps,
        compute_s=steps * step_s,
        tokens=steps * target.steps_per_proxy_step * target.tokens_per_step,
        down_bytes=float(target.download_bytes),
        update_bytes=float(target.update_bytes or target.download_bytes),
        up_bytes=float(target.upload_bytes),
        f=float(f),
        session_s=float(session_s),
        close_s=float(close_s),
        fail=float(fail),
    )


def _fair_share(demand: FloatArray, weight: float, capacity: float) -> float:
    """The max-min fair rate cap c with ``weight × Σ min(demand_i, c) = capacity`` (each peer
    taking part with probability `weight`); inf when every demand fits."""
    if math.isinf(capacity) or weight * float(demand.sum()) <= capacity:
        return math.inf
    d = np.sort(demand)
    n = len(d)
    below = np.concatenate(([0.0], np.cumsum(d)[:-1]))  # the k smallest demands, uncapped
    level = (capacity / weight - below) / (n - np.arange(n))
    return float(level[int(np.argmax(level <= d))])


def _sum_min(sorted_v: FloatArray, prefix: FloatArray, s: FloatArray) -> FloatArray:
    """Σ_i min(v_i, s) for every s, given the sorted values and their prefix sums."""
    s = np.maximum(s, 0.0)
    k = np.searchsorted(sorted_v, s, side="right")
    return prefix[k] + s * (len(sorted_v) - k)


def _mean_x(
    x: FloatArray,
    q: FloatArray,
    d_e: float,
    w: float,
    join_rate: float,
    session_s: float,
    timeout_s: float,
    join_end: float,
    fail: float,
) -> float:
    """E[min(X, d_e)]: from a round's opening to its last awaited upload, lapse or deadline."""
    n = len(x)
    xs = np.sort(x)
    grid = np.unique(np.concatenate((np.linspace(0.0, d_e, _GRID + 1), xs[xs < d_e])))
    above = n - np.searchsorted(xs, grid, side="right")
    none = (1.0 - w) ** n  # no peer holds an order: no round happens, so condition it away
    cdf = (np.power(1.0 - w, above) - none) / (1.0 - none)
    # A crashed peer restarts and redoes its order (the simulator's crash): the round waits for
    # it until the deadline.
    cdf = cdf * (1.0 - w * fail) ** n
    if math.isfinite(session_s):
        # Silent departures: order holders still pending at u leave at 1/S each and hold the
        # round until u + timeout. Joins: at join_rate during the join window, each holding it
        # until its upload, u + q_j.
        x_prefix = np.concatenate(([0.0], np.cumsum(xs)))
        pending = _sum_min(xs, x_prefix, grid) - _sum_min(xs, x_prefix, grid - timeout_s)
        qs = np.sort(q)
        q_prefix = np.concatenate(([0.0], np.cumsum(qs)))
        window = np.minimum(grid, join_end)
        joining = (_sum_min(qs, q_prefix, grid) - _sum_min(qs, q_prefix, grid - window)) / n
        cdf = cdf * np.exp(-(w / session_s) * pending - join_rate * joining)
    widths = np.diff(grid)
    return float(np.sum((1.0 - cdf[:-1]) * widths))  # P(X ≤ s) is right-continuous: left sums


def _state(
    inp: _Inputs, d_e: float, coordinator_in_bps: float, coordinator_out_bps: float
) -> _State:
    run, f, S, close = inp.run, inp.f, inp.session_s, inp.close_s
    n = len(inp.ids)
    online = f * n
    order_p = min(1.0, run.rounds.max_peers_per_round / online)
    w = f * order_p  # the probability that a peer holds an order at a round's opening
    share_out = _fair_share(inp.down_bps, w, coordinator_out_bps)
    share_in = _fair_share(inp.up_bps, w, coordinator_in_bps)
    latency = LATENCY_RTTS * inp.rtt_s
    down_rate = np.minimum(inp.down_bps, share_out)
    down_s = latency + inp.update_bytes * 8 / down_rate
    up_s = latency + inp.up_bytes * 8 / np.minimum(inp.up_bps, share_in)
    c = inp.compute_s
    q = latency + inp.down_bytes * 8 / down_rate + c + up_s  # a joiner's first round
    x = np.maximum(c - close, down_s + up_s) if run.inner.overlap else down_s + c + up_s
    per_order_s = max(
        inp.update_bytes * 8 / coordinator_out_bps, inp.up_bytes * 8 / coordinator_in_bps
    )
    floor = w * n * per_order_s  # the coordinator's own transfers of the round
    join_end = run.join_window_s(run.rounds.deadline_s, max(1, round(w * n)))
    joins = order_p >= 1.0  # a round that took max_peers_per_round at its opening takes no one
    join_rate = online / S if joins and math.isfinite(S) else 0.0
    timeout = run.rounds.peer_timeout_s
    mean_x = _mean_x(x, q, d_e, w, join_rate, S, timeout, join_end, inp.fail)
    x_s = min(d_e, max(mean_x, floor))
    round_s = x_s + close
    keeps = x <= d_e * (1 + 1e-12)
    held = np.maximum(round_s, x + close)  # an online peer's round lasts at least its own x_i
    exposure = held + up_s if run.inner.overlap else x
    survival = np.exp(-exposure / S) * (1.0 - inp.fail)
    util = np.where(keeps, c * survival / held, 0.0)
    if join_rate > 0:  # joiners that make the deadline in their first round
        chance = np.clip(np.minimum(min(join_end, x_s), d_e - q), 0.0, None) / round_s
        util = util + c * np.exp(-q / S) * (1.0 - inp.fail) * chance / S
    util = order_p * util
    per_s = f * util / c  # contributions per second from each peer
    return _State(
        round_s=round_s,
        x_s=x_s,
        contributions=float(per_s.sum() * round_s),
        tokens_per_s=float((per_s * inp.tokens).sum()),
        down_s=down_s,
        up_s=up_s,
        submit_s=x,
        keeps=keeps,
        survival=survival,
        utilization=util,
    )


def _solve(inp: _Inputs, coordinator_in_bps: float, coordinator_out_bps: float) -> _State:
    """The state at the deadline, or at the later effective deadline a quorum needs."""
    rounds = inp.run.rounds
    quorum = rounds.quorum
    state = _state(inp, rounds.deadline_s, coordinator_in_bps, coordinator_out_bps)
    if state.contributions >= quorum * (1 - 1e-9):
        return state
    lo, hi = rounds.deadline_s, rounds.deadline_s
    for _ in range(64):  # grow the effective deadline until every peer makes it
        hi *= 2
        top = _state(inp, hi, coordinator_in_bps, coordinator_out_bps)
        if top.contributions >= quorum or top.keeps.all():
            break
    if top.contributions < quorum * (1 - 1e-9):
        raise ValueError(
            f"rounds.quorum ({quorum}) is more than the {top.contributions:.1f} contributions a "
            f"round can expect from {inp.f * len(inp.ids):.1f} online peers; lower the quorum, "
            "add peers or online time, or widen the coordinator's links"
        )
    for _ in range(_BISECTIONS):
        if hi - lo <= 1e-6 * hi:
            break
        mid = (lo + hi) / 2
        if _state(inp, mid, coordinator_in_bps, coordinator_out_bps).contributions >= quorum:
            hi = mid
        else:
            lo = mid
    return _state(inp, hi, coordinator_in_bps, coordinator_out_bps)


def _notes(inp: _Inputs, state: _State, free: _State, coordinator_bound: bool) -> tuple[str, ...]:
    run = inp.run
    notes = [
        "extrapolated analytically from a steady-state model of the rounds, not simulated: "
        "neither the protocol nor the numerics ran",
        f"each of the {len(inp.ids)} peers is online with probability {inp.f:.3f}, "
        "independently of the others",
        "sessions are taken as exponential (memoryless) with the given mean"
        if math.isfinite(inp.session_s)
        else "peers never leave (no churn)",
        "a transfer takes 1.5 round trips plus bytes at the smaller of the peer's link and its "
        "max-min fair share of the coordinator's side when every order holder transfers at once",
        "communication overlaps compute for at most one round's budget (inner.overlap)"
        if run.inner.overlap
        else "communication adds to compute (inner.overlap is off)",
        "a peer that cannot make the deadline contributes nothing; late contributions, "
        "verification, data-shard downloads and memory limits are not modelled",
        "a peer leaving silently holds the round until rounds.peer_timeout_s passes (the "
        "coordinator ticks continuously); joiners in the join window hold it until their upload",
        "available FLOPs are each online peer's FLOP/s × MFU",
    ]
    if inp.fail > 0:
        notes.append(
            f"{inp.fail:.1%} of work orders crash part-way and lose their work; the crashed "
            "peer restarts to redo its order and holds the round to the deadline"
        )
    if inp.close_s > 0:
        notes.append(f"the coordinator's close (aggregation, evaluation) takes {inp.close_s:g} s")
    if coordinator_bound:
        notes.append(
            f"the coordinator's links are the bound: rounds of {state.round_s:.0f} s and "
            f"{state.tokens_per_s:.4g} tokens/s against {free.round_s:.0f} s and "
            f"{free.tokens_per_s:.4g} tokens/s with unlimited coordinator bandwidth"
        )
    if state.x_s > run.rounds.deadline_s * (1 + 1e-9):
        notes.append(
            f"the quorum of {run.rounds.quorum} holds rounds past the deadline, to "
            f"{state.x_s:.0f} s"
        )
    return tuple(notes)


def extrapolate_peers(
    run: RunConfig,
    population: list[PeerSpec],
    target: Target,
    *,
    online_fraction: float,
    mean_session_s: float,
    coordinator_in_bps: float,
    coordinator_out_bps: float,
    close_s: float = 0.0,
    fail_mid_round: float = 0.0,
) -> tuple[Throughput, PeerRounds]:
    """`extrapolate`, together with each peer's part of the steady state."""
    _positive("coordinator_in_bps (bits per second)", coordinator_in_bps)
    _positive("coordinator_out_bps (bits per second)", coordinator_out_bps)
    inp = _inputs(run, population, target, online_fraction, mean_session_s, close_s, fail_mid_round)
    state = _solve(inp, coordinator_in_bps, coordinator_out_bps)
    unlimited = math.isinf(coordinator_in_bps) and math.isinf(coordinator_out_bps)
    free = state if unlimited else _solve(inp, math.inf, math.inf)
    longer = state.round_s > free.round_s * (1 + 1e-9) + 1e-9
    bound = longer or state.tokens_per_s < free.tokens_per_s * (1 - _BOUND_LOSS)
    n = len(inp.ids)
    order_p = min(1.0, run.rounds.max_peers_per_round / (inp.f * n))
    throughput = Throughput(
        round_s=state.round_s,
        online_peers=inp.f * n,
        contributors_per_round=state.contributions,
        utilization=float(state.utilization.mean()),
        useful_flop_fraction=float((state.utilization * inp.eff).sum() / inp.eff.sum()),
        bytes_per_peer_per_round=order_p * (inp.update_bytes + inp.up_bytes),
        coordinator_bound=bool(bound),
        tokens_per_s=state.tokens_per_s,
        notes=_notes(inp, state, free, bound),
    )
    peers = PeerRounds(
        peer_ids=inp.ids,
        steps=inp.steps,
        compute_s=inp.compute_s,
        download_s=state.down_s,
        upload_s=state.up_s,
        submit_s=state.submit_s,
        keeps_pace=state.keeps,
        survival=state.survival,
        utilization=state.utilization,
    )
    return throughput, peers


def extrapolate(
    run: RunConfig,
    population: list[PeerSpec],
    target: Target,
    *,
    online_fraction: float,
    mean_session_s: float,
    coordinator_in_bps: float,
    coordinator_out_bps: float,
    close_s: float = 0.0,
    fail_mid_round: float = 0.0,
) -> Throughput:
    """The steady-state throughput of `run`'s rounds with `population`, extrapolated
    analytically (see the module docstring for the model and its assumptions).

    `online_fraction` (f) is the fraction of time a peer is online and `mean_session_s` (S)
    the mean length of its sessions (``inf``: peers never leave); the coordinator's ingress
    and egress are in bit/s (``inf``: unlimited), and its close of a round (aggregation and
    evaluation) takes `close_s` seconds. A work order's training crashes part-way, losing its
    work, with probability `fail_mid_round`. Raises ValueError (one sentence) on bad input or a
    quorum no round can reach.
    """
    throughput, _ = extrapolate_peers(
        run,
        population,
        target,
        online_fraction=online_fraction,
        mean_session_s=mean_session_s,
        coordinator_in_bps=coordinator_in_bps,
        coordinator_out_bps=coordinator_out_bps,
        close_s=close_s,
        fail_mid_round=fail_mid_round,
    )
    return throughput
