"""Coordinator cost per round, phase by phase, against the physical floor of reading the payloads.

Drives the real `Coordinator` (the HTTP handlers' code path without the socket) with K int8
contributions of a GPT of about 10M, 100M or 1B parameters per round, and times each phase:

- **receive**: writing each uploaded payload to the blob store with fsync (what the upload
  handler streams into);
- **accept**: every payload check (`crowdtrain.codec.validate`), the claims, the protocol's
  decision and the SQLite commit that makes the receipt durable;
- **on-arrival work**: what `RoundProtocol.analysis_job` computes for each accepted
  contribution on the coordinator's worker threads while the next upload arrives (norm,
  fingerprint, and the usefulness score of those that rank among the first to be scored);
  the seconds are the jobs' own, all threads together;
- **close**: what needs the last contribution: the rest of the screening, robust aggregation
  (centered clipping with bucketing, Karimireddy et al. 2021/2022, two passes over the int8
  payloads, fragments on `workers` threads), the outer step, the compressed weight broadcast
  and the moments of the next base (derived, the default: the round's mean steps, no model
  pass; with ``--state published``: gradients at the new θ on the coordinator's own batches),
  each timed (`RoundProtocol.close_timing`);
- **persist**: writing θ, the outer state, the aggregate, moments and broadcast as blobs
  (part of the close: the version is committed after it);
- **eval**: the new θ's loss on the held-out batches, on a worker thread after the commit.

In the same run, the **floor**: one vectorized pass that reads every stored payload (mapped
from disk) and adds it into an fp32 accumulator: the least any aggregation of these bytes can
cost on this machine. `close_after_last_s` is the wall time from the last payload's arrival
(its blob written, the previous upload's on-arrival work done) to its receipt, with the round
closed and committed; `total_s` adds every phase's seconds. `workers` is also the number of
torch threads for the model passes (scoring, moments, evaluation); 0 and 1 mean one core.

`workers=0` keeps the coordinator's older behaviour for comparison: no on-arrival work, the
whole screening at the close, on one thread (the evaluation still follows the commit).
"""

from __future__ import annotations

import mmap
import os
import resource
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from crowdtrain import codec
from crowdtrain.config import RunConfig, parse_config
from crowdtrain.models import count_params, param_shapes
from crowdtrain.server.admission import AdmissionConfig
from crowdtrain.server.coordinator import ContributionMeta, Coordinator

#: The benchmark's seed invite key (``--established``): registering with it starts a peer
#: established.
SEED_KEY = "bench-coordinator-seed-key"

#: The model sizes, as (width, depth, heads) of the byte-level GPT with context 128.
SIZES: dict[str, tuple[int, int, int]] = {
    "10m": (464, 4, 8),  # 10.66M parameters
    "100m": (768, 14, 12),  # 99.6M
    "1b": (2048, 20, 16),  # 1.01B
    "tiny": (32, 1, 2),  # 0.03M: the benchmark's own test
}
PHASES = ("receive", "accept", "arrival", "close", "persist", "eval")


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class _Rss:
    """The process's resident memory, sampled every 5 ms by a thread, its peak kept per phase."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}
        self.phase = "setup"
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _now_mb(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page / 2**20

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.sample()

    def sample(self) -> None:
        mb = self._now_mb()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), mb)

    @contextmanager
    def during(self, phase: str) -> Iterator[None]:
        previous, self.phase = self.phase, phase
        self.sample()
        try:
            yield
        finally:
            self.sample()
            self.phase = previous

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def bench_config(
    params: str,
    contributions: int,
    rounds: int,
    defended: bool = True,
    state: str = "derived",
) -> RunConfig:
    """The run the benchmark drives: the default pipeline on a GPT of size PARAMS, its bases'
    moments `state` (``inner.optimizer_state``)."""
    width, depth, heads = SIZES[params]
    # Random deltas carry no signal, so usefulness scoring runs (its cost is measured) but may
    # not refuse them. Spot-checks are replayed by volunteers; here they would only turn work
    # orders into verify orders.
    return parse_config(
        {
            "name": "bench-coordinator",
            "model": {
                "arch": "gpt",
                "width": width,
                "depth": depth,
                "heads": heads,
                "context": 128,
            },
            "codec": {"name": "int8"},
            "inner": {"steps": 8, "optimizer_state": state},
            "rounds": {
                "total": rounds + 1,
                "quorum": contributions,
                "deadline_s": 1e6,
                "max_peers_per_round": contributions,
            },
            "defence": {
                "enabled": defended,
                "spot_check": "off",
                "score_min_gain": -1e9,
                "score_rel_gain": 0.0,
                "score_heldout_tol": 1e9,
            },
        }
    )


def floor_pass(paths: list[Path], numel: int, chunk: int = 1 << 20) -> float:
    """Seconds to read every payload file (mapped) as int8 and add it into an fp32
    accumulator of `numel` elements, chunk by chunk: the physical floor of an aggregation."""
    acc = torch.zeros(chunk, dtype=torch.float32)
    t0 = time.perf_counter()
    for path in paths:
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            data = torch.frombuffer(mapped, dtype=torch.int8)
            n = min(numel, data.numel())
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                acc[: stop - start].add_(data[start:stop])
            del data
        finally:
            mapped.close()
    return time.perf_counter() - t0


def run_coordinator_bench(
    params: str = "10m",
    contributions: int = 32,
    workers: int = 1,
    rounds: int = 3,
    log: Callable[[str], None] = print,
    state: str = "derived",
    established: bool = False,
) -> dict[str, Any]:
    """Time `rounds` rounds of `contributions` int8 uploads of a PARAMS model with the full
    verification pipeline, bases carrying `state` moments; the benchmark's JSON (medians over
    the rounds). With `established` every peer registers as a seed volunteer, in good standing
    from its first round (a run's steady state); else all are newcomers, whose contributions
    are all scored (``defence.score_newcomers``) until they are established."""
    if params not in SIZES:
        raise ValueError(f"--params must be one of {', '.join(SIZES)}, not {params!r}")
    torch.set_num_threads(max(1, workers))  # model passes (scoring, moments, eval) too
    config = bench_config(params, contributions, rounds, state=state)
    shapes = param_shapes(config.model)
    numel = count_params(config.model)
    gen = torch.Generator().manual_seed(0)
    rss = _Rss()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="crowdtrain-bench-") as tmp:
            coord = Coordinator(
                config,
                Path(tmp) / "state",
                clock=_Clock(),
                eval_batch_count=2,
                workers=workers,
                # no rate limits; the seed key makes registered peers established
                admission=AdmissionConfig(address_burst=0, global_burst=0, seed_invite=SEED_KEY),
            )
            invite = SEED_KEY if established else None
            peers = [
                coord.register(f"peer-{i}", {}, invite=invite)["peer_id"]
                for i in range(contributions)
            ]
            for r in range(rounds):
                rows.append(_round(coord, peers, r, shapes, numel, gen, rss, log))
            coord.shutdown()
    finally:
        rss.stop()
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0] if k != "round"}
    phases = {
        p: {
            "s": round(med[f"{p}_s"], 4),
            # on-arrival work runs on other threads during the accepts (its memory is counted
            # there), persisting inside the close's span
            "peak_rss_mb": round(max(rss.peaks[f"{p}@{r}"] for r in range(rounds)), 1)
            if p in ("receive", "accept", "close", "eval")
            else None,
        }
        for p in PHASES
    }
    doc = {
        "params": numel,
        "size": params,
        "contributions": contributions,
        "workers": workers,
        "optimizer_state": state,
        "established": established,
        "rounds": rows,
        "phases": phases,
        "close_steps": {k[5:]: round(v, 4) for k, v in med.items() if k.startswith("step_")},
        "close_after_last_s": round(med["close_after_last_s"], 4),
        "total_s": round(med["total_s"], 4),
        "floor_s": round(med["floor_s"], 4),
        "ratio_to_floor": round(med["total_s"] / med["floor_s"], 2),
        "close_ratio_to_floor": round(med["close_s"] / med["floor_s"], 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "model_fp32_mb": round(numel * 4 / 2**20, 1),
        "codec": "int8",
        "aggregation": config.aggregation.model_dump(mode="json"),
        "defence": config.defence.model_dump(mode="json"),
    }
    log(
        f"median per round: total {doc['total_s']:.2f} s, floor {doc['floor_s']:.3f} s "
        f"(ratio {doc['ratio_to_floor']}), close after the last arrival "
        f"{doc['close_after_last_s']:.2f} s; peak RSS {doc['peak_rss_mb']:.0f} MB "
        f"(the model in fp32: {doc['model_fp32_mb']:.0f} MB)"
    )
    return doc


def _round(
    coord: Coordinator,
    peers: list[str],
    r: int,
    shapes: dict[str, tuple[int, ...]],
    numel: int,
    gen: torch.Generator,
    rss: _Rss,
    log: Callable[[str], None],
) -> dict[str, Any]:
    orders = [coord.work(p) for p in peers]
    assert all(o["kind"] == "work" and o["round"] == r for o in orders)
    receive = accept = 0.0
    arrival0 = coord.arrival_s
    paths = []
    close_after_last = 0.0
    for i, peer in enumerate(peers):
        delta = {
            k: torch.randn(s, generator=gen) * 1e-3 * (1 + i / len(peers))
            for k, s in shapes.items()
        }
        payload = codec.encode(delta, coord.config.codec)
        del delta
        # 8 steps of batch 16 with context 128: a claim the claims stage accepts, and enough
        # steps for usefulness scoring (defence.score_min_steps).
        meta = ContributionMeta(orders[i]["base_version"], 128, 16384, 8, 2.0)
        with rss.during(f"receive@{r}"):
            t0 = time.perf_counter()
            sha = coord.blobs.put_bytes(payload)
            t1 = time.perf_counter()
        receive += t1 - t0
        paths.append(coord.blobs.local_path(sha))
        last = i == len(peers) - 1
        with rss.during(f"{'close' if last else 'accept'}@{r}"):
            # Without a network, the previous upload's on-arrival work has had no receive to
            # overlap with: wait for it here so that it is counted as neither.
            coord.settle()
            t1 = time.perf_counter()
            coord.submit(peer, r, meta, sha, len(payload))
        if last:
            close_after_last = time.perf_counter() - t1
        else:
            accept += time.perf_counter() - t1
        del payload
    assert coord.protocol.version == r + 1, "the round did not close"
    with rss.during(f"eval@{r}"):
        coord.settle()  # the new version's evaluation, after its commit
    steps = dict(coord.protocol.close_timing)
    persist = coord.last_close_timing.get("persist_s", 0.0)
    eval_s = coord.last_close_timing.get("eval_s", 0.0)
    close = close_after_last - persist
    with rss.during(f"floor@{r}"):
        floor = floor_pass(paths, numel)
    arrival = coord.arrival_s - arrival0
    row = {
        "round": r,
        "receive_s": receive,
        "accept_s": accept,
        "arrival_s": arrival,
        "close_s": close,
        "persist_s": persist,
        "eval_s": eval_s,
        "close_after_last_s": close_after_last,
        "total_s": receive + accept + arrival + close_after_last + eval_s,
        "floor_s": floor,
        **{f"step_{k}": v for k, v in steps.items()},
    }
    log(
        f"round {r}: receive {receive:.2f} s, accept {accept:.2f} s, on arrival {arrival:.2f} s, "
        f"close {close:.2f} s ("
        + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in steps.items())
        + f"), persist {persist:.2f} s, eval {eval_s:.2f} s; close after the last arrival "
        f"{close_after_last:.2f} s; floor {floor:.3f} s"
    )
    return row
