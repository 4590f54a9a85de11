"""Validate the discrete-event simulator against the real networked system (issue 5, item 5).

Runs the networked demo (`crowdtrain.demo.run_network`: a coordinator process and volunteer
processes, each behind its own user-space WAN proxy) and then the simulator
(`crowdtrain.sim.des.simulate`) with matching parameters, and compares what both say about the
run: the median round duration (from one round's close to the next) and each volunteer's
compute utilization (the fraction of wall time spent training, from its first step to the end).
Both sides must agree within 20%. It is done with overlap of communication and computation off
and on, since the simulator models both (Streaming DiLoCo's one-step-delayed update, Douillard
et al. 2025, arXiv:2501.18512; rounds of DiLoCo, Douillard et al. 2023, arXiv:2311.08105).

What the simulation is given, all measured on the real run or set by its proxies:

* each volunteer's seconds per inner step (its compute seconds over the steps it trained,
  spot-check replays included), as FLOP/s at MFU 1 for a target of the real model's size;
* its proxy's link rates, and a round-trip time of twice the proxy's one-way latency (the proxy
  delays each direction by that latency, pipelined, so a request and its response cost one
  round trip; a new connection pays one more for the handshake);
* the real payload sizes: the weights blob θ each volunteer downloads (fp32 safetensors) and the
  median int8 pseudo-gradient it uploads;
* the coordinator's time per close (screening, aggregation, outer step, persistence and
  evaluation): the time from the arrival of the round's last accepted payload (the mtime of its
  blob, written when its last byte came in) to the version row of the closed round;
* the same `RunConfig`.

Where the real round durations come from: the coordinator writes one version row per closed
round to its SQLite store (`versions.created_at`, wall-clock seconds), after the new weights are
persisted and evaluated; round r's duration is the time between the rows of rounds r−1 and r.

Each setting runs twice: as `run_network` runs it, where a volunteer downloads the data shards
its work orders name when it first needs them (1 MiB each, 4 per order, drawn anew each round),
and with every training shard put in the volunteers' caches beforehand; the simulator is run
the same way (it charges a volunteer the shards it has not cached, one request each, or none
with ``shards_cached``). The simulated volunteers' ids differ from the real ones, so their
shards are drawn differently, but as many per order. Without
overlap a round is download, compute and upload in turn, so the document also sets each
volunteer's measured time from a close to its next upload against what the simulator charges
for those three (`round_paths`), next to the shard bytes it fetched in each round (`new_shards`).
The verification pipeline is off in both runs (see `validation_config`).
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import statistics
import time
from collections.abc import Mapping, Sequence, Set
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from crowdtrain.benchmarks.overlap import overlap_config
from crowdtrain.config import RunConfig
from crowdtrain.data import ShardRef, ShardStore, assign_shards, ensure_packed_for
from crowdtrain.demo import Link, VolunteerSpec, run_network
from crowdtrain.models import count_params
from crowdtrain.sim.des import SimResult, Target, simulate
from crowdtrain.sim.network import transfer_time
from crowdtrain.sim.population import PeerSpec, step_seconds
from crowdtrain.store import DirBlobStore, SqliteStateStore

__all__ = [
    "TOLERANCE",
    "RealRun",
    "VolunteerRecord",
    "build_population",
    "build_target",
    "close_seconds",
    "close_to_upload",
    "compare",
    "model_path",
    "new_shards",
    "peer_spec",
    "prefill_shards",
    "read_run",
    "real_side",
    "relative_error",
    "round_durations",
    "round_paths",
    "run_validation",
    "sim_side",
    "validation_config",
    "verdict",
    "volunteer_records",
]

TOLERANCE = 0.2
"""Largest relative error of the simulator against the measured value that counts as agreement."""

#: The volunteers' links: the same rate both ways, one of them half as fast (heterogeneity).
FULL_LINKS = (
    ("v0", Link(up_mbps=20.0, down_mbps=20.0, latency_ms=50.0)),
    ("v1", Link(up_mbps=20.0, down_mbps=20.0, latency_ms=100.0)),
    ("v2-slow-link", Link(up_mbps=10.0, down_mbps=10.0, latency_ms=75.0)),
)
QUICK_LINKS = (
    ("v0", Link(up_mbps=20.0, down_mbps=20.0, latency_ms=50.0)),
    ("v1-slow-link", Link(up_mbps=10.0, down_mbps=10.0, latency_ms=100.0)),
)


def validation_config(overlap: bool, rounds: int, round_seconds: float) -> RunConfig:
    """The run both sides train: the overlap benchmark's ~0.87M-parameter GPT with time-budgeted
    rounds and int8 uploads, without the verification pipeline (format checks only): spot-checks
    are drawn with the coordinator's random secret, so real and simulated runs would replay
    different contributions, and a ban ends a short run."""
    config = overlap_config(overlap, rounds, round_seconds)
    return config.model_copy(
        update={
            "name": f"bench-sim-validation-overlap-{'on' if overlap else 'off'}",
            "defence": config.defence.model_copy(update={"enabled": False}),
        }
    )


# --- what the real run measured ------------------------------------------------------------


@dataclass(frozen=True)
class VolunteerRecord:
    """What one real volunteer did, from `run_network`'s summary and its proxy's counters."""

    name: str
    link: Link
    compute_s: float  # seconds spent in training calls (replays and overlapped steps included)
    steps: int  # inner steps of its contributions plus those of its spot-check replays
    utilization: float  # compute_s / (end − first training step), as the client reports it
    bytes_up: int
    bytes_down: int
    contributions: int

    @property
    def step_s(self) -> float:
        """Measured seconds per inner step."""
        if self.steps < 1:
            raise ValueError(f"volunteer {self.name} trained no step, so its speed is unknown")
        return self.compute_s / self.steps

    def to_json(self) -> dict[str, Any]:
        """This record as JSON, with its seconds per step."""
        return {**asdict(self), "link": asdict(self.link), "step_s": self.step_s}


@dataclass(frozen=True)
class RealRun:
    """What the coordinator's store says about a finished run."""

    close_times: list[float]  # wall-clock time of each round's close (its version row), by round
    close_s: list[float]  # the coordinator's time per close: last payload in → version row
    upload_bytes: int  # median size of an accepted pseudo-gradient payload
    download_bytes: int  # size of the weights blob θ a volunteer downloads each round
    peer_ids: dict[str, str] = field(default_factory=dict)  # volunteer name → peer id
    uploads: dict[str, list[float | None]] = field(default_factory=dict)  # name → arrival by round

    @property
    def round_durations(self) -> list[float]:
        """Seconds from each round's close to the next one's."""
        return round_durations(self.close_times)

    def close_to_upload(self, name: str) -> list[float]:
        """For volunteer `name`, seconds from each round's close to its next payload's arrival."""
        return close_to_upload(self.close_times, self.uploads.get(name, []))


def round_durations(close_times: Sequence[float]) -> list[float]:
    """Durations of rounds 1, 2, ... from the close times of rounds 0, 1, 2, ...: the time
    between consecutive closes. Round 0 has none: it opened before the volunteers joined."""
    if any(b < a for a, b in itertools.pairwise(close_times)):
        raise ValueError("round close times must not decrease")
    return [b - a for a, b in itertools.pairwise(close_times)]


def close_seconds(close_times: Sequence[float], arrivals: Sequence[Sequence[float]]) -> list[float]:
    """The coordinator's time per close: for each round, its close time minus the arrival of
    its last payload that came in before it closed (rounds with none such are left out)."""
    if len(close_times) != len(arrivals):
        raise ValueError(
            f"{len(close_times)} close times but arrivals for {len(arrivals)} rounds; "
            "give one list of arrivals per round"
        )
    gaps = []
    for closed, came in zip(close_times, arrivals, strict=True):
        before = [t for t in came if t <= closed]
        if before:
            gaps.append(closed - max(before))
    return gaps


def close_to_upload(close_times: Sequence[float], arrivals: Sequence[float | None]) -> list[float]:
    """Seconds from the close of round r − 1 to the arrival of a volunteer's round-r payload,
    for rounds r ≥ 1 it contributed to (`arrivals[r]`, None where it did not): the time its
    download, training and upload took, with every wait in between."""
    return [
        came - close_times[r - 1]
        for r, came in enumerate(arrivals)
        if r >= 1 and came is not None and r - 1 < len(close_times)
    ]


def read_run(state: Path) -> RealRun:
    """Round closes, close costs and payload sizes from a coordinator's state directory."""
    store = SqliteStateStore(state / "state.sqlite")
    blobs = DirBlobStore(state / "blobs", fsync=False)
    try:
        versions = [v for v in store.list_versions() if v.version > 0]
        if not versions:
            raise ValueError(f"the run in {state} closed no round")
        closes = [v.created_at for v in versions]
        names = {p.peer_id: p.name for p in store.list_peers()}
        uploads: dict[str, list[float | None]] = {n: [None] * len(versions) for n in names.values()}
        arrivals: list[list[float]] = []
        sizes: list[int] = []
        for r, v in enumerate(versions):
            rows = store.contributions_for_round(v.round, status="accepted")
            came = []
            for row in rows:
                sizes.append(row.payload_bytes)
                if row.blob_sha is not None and blobs.has(row.blob_sha):
                    at = os.stat(blobs.local_path(row.blob_sha)).st_mtime
                    came.append(at)
                    uploads[names[row.peer_id]][r] = at
            arrivals.append(came)
        if not sizes:
            raise ValueError(f"the run in {state} accepted no contribution")
        download = blobs.size(versions[0].weights_sha)
    finally:
        store.close()
    return RealRun(
        close_times=closes,
        close_s=close_seconds(closes, arrivals),
        upload_bytes=round(statistics.median(sizes)),
        download_bytes=download,
        peer_ids={name: pid for pid, name in names.items()},
        uploads=uploads,
    )


def volunteer_records(
    doc: Mapping[str, Any], links: Mapping[str, Link], batch_size: int
) -> list[VolunteerRecord]:
    """The volunteers of `run_network`'s summary document as records."""
    records = []
    for v in doc["volunteers"]:
        name = str(v["name"])
        records.append(
            VolunteerRecord(
                name=name,
                link=links[name],
                compute_s=float(v["compute_s"]),
                steps=int(v["samples"]) // batch_size + int(v.get("verify_steps", 0)),
                utilization=float(v["utilization"]),
                bytes_up=int(v["bytes_up"]),
                bytes_down=int(v["bytes_down"]),
                contributions=int(v["rounds"]),
            )
        )
    return records


# --- the matching simulation ----------------------------------------------------------------


def build_target(config: RunConfig, upload_bytes: int, download_bytes: int) -> Target:
    """The real model as the simulator's target: its parameters, tokens per step and the real
    payload sizes; one simulated step is one real step."""
    params = count_params(config.model)
    return Target(
        params=params,
        tokens_per_step=config.data.batch_size * config.model.context,
        bytes_per_param_up=upload_bytes / params,
        bytes_per_param_down=download_bytes / params,
        steps_per_proxy_step=1.0,
    )


def peer_spec(name: str, link: Link, step_s: float, target: Target) -> PeerSpec:
    """A simulated peer that takes `step_s` per step of `target` (MFU 1) on its proxy's link;
    its round trip is twice the proxy's one-way latency."""
    if not (math.isfinite(step_s) and step_s > 0):
        raise ValueError(f"volunteer {name}'s seconds per step must be positive, not {step_s}")
    return PeerSpec(
        peer_id=name,
        flops=target.flops_per_step / step_s,
        mfu=1.0,
        up_bps=link.up_mbps * 1e6,
        down_bps=link.down_mbps * 1e6,
        rtt_s=2 * link.latency_ms / 1e3,
    )


def build_population(records: Sequence[VolunteerRecord], target: Target) -> list[PeerSpec]:
    """One simulated peer per real volunteer, at its measured speed on its link."""
    return [peer_spec(r.name, r.link, r.step_s, target) for r in records]


def sim_side(result: SimResult, population: Sequence[PeerSpec]) -> dict[str, Any]:
    """Round durations and utilizations of a simulated run, with the real run's definitions:
    utilization is compute seconds over the time from the peer's first compute to the end."""
    closes = [float(r["close_time_s"]) for r in result.rounds]
    end = result.virtual_time_s
    peers: dict[str, dict[str, Any]] = {}
    for spec in population:
        stats = result.per_peer[spec.peer_id]
        first = float(stats["first_compute_s"])
        computed = math.isfinite(first)  # NaN: the peer never computed
        wall = end - first if computed else 0.0
        peers[spec.peer_id] = {
            "compute_s": float(stats["compute_s"]),
            "first_compute_s": first if computed else None,
            "utilization": float(stats["compute_s"]) / wall if wall > 0 else 0.0,
            "steps": int(stats["steps"]),
            "contributions": int(stats["contributions"]),
            "bytes_up": int(stats["bytes_up"]),
            "bytes_down": int(stats["bytes_down"]),
        }
    durations = round_durations(closes)
    return {
        "close_times_s": closes,
        "round_durations_s": durations,
        "median_round_s": _median(durations),
        "virtual_time_s": end,
        "volunteers": peers,
    }


# --- the comparison -------------------------------------------------------------------------


def relative_error(sim: float, real: float) -> float:
    """(sim − real) / real: how far the simulator is from the measurement, signed."""
    if not (math.isfinite(real) and real > 0 and math.isfinite(sim)):
        raise ValueError(
            f"a relative error needs a positive measured value and a finite simulated one, "
            f"not real={real} and sim={sim}"
        )
    return (sim - real) / real


def verdict(real: float, sim: float, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Both values, the relative error of the simulator and whether it is within `tolerance`."""
    err = relative_error(sim, real)
    return {"real": real, "sim": sim, "rel_error": err, "within_20pct": abs(err) <= tolerance}


def _median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("a run needs at least two closed rounds to have a round duration")
    return float(statistics.median(values))


def compare(real: Mapping[str, Any], sim: Mapping[str, Any]) -> dict[str, Any]:
    """Median round duration and each volunteer's utilization, real against simulated."""
    rounds = verdict(float(real["median_round_s"]), float(sim["median_round_s"]))
    utils = {
        name: verdict(float(v["utilization"]), float(sim["volunteers"][name]["utilization"]))
        for name, v in real["volunteers"].items()
    }
    ok = bool(rounds["within_20pct"]) and all(u["within_20pct"] for u in utils.values())
    return {"median_round_s": rounds, "utilization": utils, "within_20pct": ok}


def real_side(
    record: RealRun, volunteers: Sequence[VolunteerRecord], wall_s: float
) -> dict[str, Any]:
    """The measured numbers of a real run as JSON."""
    durations = record.round_durations
    return {
        "close_times_s": record.close_times,
        "round_durations_s": durations,
        "median_round_s": _median(durations),
        "close_s": record.close_s,
        "median_close_s": statistics.median(record.close_s) if record.close_s else 0.0,
        "upload_bytes": record.upload_bytes,
        "download_bytes": record.download_bytes,
        "wall_s": wall_s,
        "volunteers": {v.name: v.to_json() for v in volunteers},
    }


# --- where the time goes: costs outside the simulator's model -------------------------------


def new_shards(
    train: Sequence[ShardRef], config: RunConfig, peer_id: str, rounds: int, cached: Set[str]
) -> list[int]:
    """Bytes of data shards a volunteer downloads in each round: those of its work order
    (`assign_shards`, as the protocol assigns them) that it has not cached before."""
    sizes = {ref.sha256: ref.bytes for ref in train}
    ids = [ref.sha256 for ref in train]
    have = set(cached)
    per_round = []
    for r in range(rounds):
        assigned = assign_shards(
            ids,
            seed=config.data.seed,
            round=r,
            peer=peer_id,
            k=min(config.data.shards_per_peer, len(ids)),
        )
        fresh = [sha for sha in assigned if sha not in have]
        have.update(fresh)
        per_round.append(sum(sizes[sha] for sha in fresh))
    return per_round


def model_path(spec: PeerSpec, target: Target, config: RunConfig) -> dict[str, float]:
    """The simulator's charge for one round of a peer without overlap: θ's download, the steps
    that fit the budget and the upload (`network.transfer_time`, `des.fitted_steps`)."""
    step_s = step_seconds(target.flops_per_step, spec)
    steps = max(1, math.floor(config.inner.seconds / step_s * (1 + 1e-9)))
    down = transfer_time(target.download_bytes, spec.down_bps, spec.rtt_s)
    up = transfer_time(target.upload_bytes, spec.up_bps, spec.rtt_s)
    return {"download_s": down, "compute_s": steps * step_s, "upload_s": up}


def round_paths(
    record: RealRun,
    population: Sequence[PeerSpec],
    target: Target,
    config: RunConfig,
    shard_bytes: Mapping[str, Sequence[int]],
) -> dict[str, dict[str, Any]]:
    """Per volunteer: the real time from a round's close to its next payload's arrival against
    the simulator's download + compute + upload, and the shard downloads it does not charge."""
    paths = {}
    for spec in population:
        real = record.close_to_upload(spec.peer_id)
        model = model_path(spec, target, config)
        charged = sum(model.values())
        shards = list(shard_bytes.get(spec.peer_id, []))
        paths[spec.peer_id] = {
            "real_close_to_upload_s": real,
            "median_real_close_to_upload_s": _median(real) if real else None,
            "sim": model,
            "sim_close_to_upload_s": charged,
            "gap_s": _median(real) - charged if real else None,
            "new_shard_bytes": shards,
            "new_shard_s": [b * 8 / spec.down_bps for b in shards],
        }
    return paths


# --- the benchmark --------------------------------------------------------------------------


def prefill_shards(state: Path, names: Sequence[str], config: RunConfig) -> None:
    """Put every training shard into each volunteer's download cache before it starts, as
    after a volunteer's first rounds, so that no round downloads data shards."""
    manifest = ensure_packed_for(config.data)
    store = ShardStore(config.data.dir)
    for name in names:
        cache = state / "volunteers" / name / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        for sha in manifest.train_ids:
            shutil.copyfile(store.path(sha), cache / sha)


def _label(overlap: bool, warm: bool) -> str:
    return f"overlap {'on' if overlap else 'off'}" + (", shards cached" if warm else "")


def _one_setting(
    overlap: bool,
    warm: bool,
    links: Sequence[tuple[str, Link]],
    rounds: int,
    seconds: float,
    console: Console,
    root: Path,
) -> dict[str, Any]:
    label = _label(overlap, warm)
    config = validation_config(overlap, rounds, seconds)
    specs = [VolunteerSpec(name, link) for name, link in links]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tag = f"{'on' if overlap else 'off'}{'-warm' if warm else ''}"
    state = (root / f"bench-sim-validation-{tag}-{stamp}").resolve()
    if warm:
        prefill_shards(state, [name for name, _ in links], config)
    console.print(f"[bold]{label}[/bold]: the real networked run…")
    doc = run_network(config, specs, state, console=console, live=False)
    if not doc["finished"]:
        raise RuntimeError(f"the real run ({label}) stalled; see the logs in {state}")
    record = read_run(state)
    volunteers = volunteer_records(doc, dict(links), config.data.batch_size)
    real = real_side(record, volunteers, float(doc["wall_s"]))
    target = build_target(config, record.upload_bytes, record.download_bytes)
    population = build_population(volunteers, target)
    console.print(f"[bold]{label}[/bold]: the simulation…")
    close_s = float(real["median_close_s"])
    result = simulate(config, population, target, coordinator_close_s=close_s, shards_cached=warm)
    sim = sim_side(result, population)
    train = ensure_packed_for(config.data).train
    cached = {ref.sha256 for ref in train} if warm else set()
    shard_bytes = {
        name: new_shards(train, config, record.peer_ids[name], rounds, cached)
        for name, _ in links
        if name in record.peer_ids
    }
    out: dict[str, Any] = {
        "overlap": overlap,
        "shards_cached": warm,
        "state_dir": str(state),
        "real": real,
        "sim": sim,
        "target": {
            "params": target.params,
            "tokens_per_step": target.tokens_per_step,
            "bytes_per_param_up": target.bytes_per_param_up,
            "bytes_per_param_down": target.bytes_per_param_down,
        },
        "population": [asdict(p) for p in population],
        "comparison": compare(real, sim),
    }
    if overlap:
        out["new_shard_bytes"] = shard_bytes
    else:  # without overlap a round is download, compute, upload: compare them one by one
        out["round_paths"] = round_paths(record, population, target, config, shard_bytes)
    return out


def _table(results: Mapping[str, Mapping[str, Any]]) -> Table:
    table = Table(title="simulator vs real networked run")
    for col in ("setting", "quantity", "real", "sim", "error", "within 20%"):
        table.add_column(col, justify="left" if col in ("setting", "quantity") else "right")
    for res in results.values():
        cmp = res["comparison"]
        rows = [("median round (s)", cmp["median_round_s"], "{:.2f}")]
        rows += [(f"utilization {n}", v, "{:.1%}") for n, v in cmp["utilization"].items()]
        for label, v, fmt in rows:
            table.add_row(
                _label(res["overlap"], res["shards_cached"]),
                label,
                fmt.format(v["real"]),
                fmt.format(v["sim"]),
                f"{v['rel_error']:+.1%}",
                "yes" if v["within_20pct"] else "[red]no[/red]",
            )
    return table


def run_validation(
    quick: bool = False, console: Console | None = None, root: Path = Path("runs")
) -> dict[str, Any]:
    """Run the real system and the simulator with overlap off and on, each as `run_network`
    runs it (volunteers download their data shards as their work orders name them) and with
    the shards cached beforehand (the simulator likewise); compare; return the JSON document
    (`crowdtrain bench sim-validation --json PATH` writes it; nothing else is written)."""
    console = console or Console()
    links = QUICK_LINKS if quick else FULL_LINKS
    rounds, seconds = (5, 4.0) if quick else (8, 5.0)
    results: dict[str, Any] = {}
    for warm in (False, True):
        for overlap in (False, True):
            key = f"{'on' if overlap else 'off'}{'-shards-cached' if warm else ''}"
            results[key] = _one_setting(overlap, warm, links, rounds, seconds, console, root)
    doc: dict[str, Any] = {
        "quick": quick,
        "rounds": rounds,
        "round_seconds": seconds,
        "tolerance": TOLERANCE,
        "volunteers": [{"name": n, **asdict(link)} for n, link in links],
        "runs": results,
        "within_20pct": all(
            r["comparison"]["within_20pct"] for r in results.values() if not r["shards_cached"]
        ),
        "within_20pct_shards_cached": all(
            r["comparison"]["within_20pct"] for r in results.values() if r["shards_cached"]
        ),
    }
    console.print(_table(results))
    return doc
