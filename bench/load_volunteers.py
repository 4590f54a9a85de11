"""Load on the coordinator's control plane from N concurrent simulated volunteers.

    PYTHONPATH=src .venv/bin/python bench/load_volunteers.py --volunteers 1000 --seconds 60 \
        [--json bench/results/load-1000.json]
    PYTHONPATH=src .venv/bin/python bench/load_volunteers.py --sweep 100,250,500,1000,2000 \
        [--seconds 60] [--json PATH]

Starts a real `crowdtrain serve` (a subprocess on 127.0.0.1, a free port, state and corpus in a
temporary directory) for the smallest model the server tests use (GPT width 32, depth 1, 30k
parameters: an int8 contribution is 35 KB), with rounds that close often with many
contributions: no cap on peers per round, a join window of the whole round, a quorum of at most
16, a short deadline. The registration limits are off (`--register-burst 0 --admit-burst 0`):
every volunteer registers from 127.0.0.1. The verification stages beyond the format check are
off (`defence.enabled = false`), since the contributions are random.

Then N simulated volunteers (asyncio and httpx, one connection pool each, started over
`--ramp` seconds) each register, read the manifest and loop until the time is up, as the
volunteer client does: ask for work (`POST /v1/work`); given work, download the base weights
and the order's shards it does not have yet (`GET /v1/blobs/...`, cached per volunteer),
"train" for a time drawn from a log-normal distribution (median `--train-s`), upload a valid
int8 contribution in the project's wire format (fresh codes for every upload, so no two
uploads are the same bytes) and ask again; told to wait, sleep `retry_after` (at most 5 s, as
the client does). Every `--heartbeat-s` seconds a volunteer sends `POST /v1/heartbeat`.

Recorded: each request's latency by route (from sending to the whole answer read, so a
saturated load generator adds to it: its event-loop lag is reported too), answers by status,
errors (connection errors, timeouts, 5xx), the coordinator's peak RSS (psutil, every 50 ms) and
CPU. An upload refused with 409 `closed` (the round closed while it trained) is a late upload,
not an error; any other 4xx is listed as unexpected. A sweep runs each level on a fresh
coordinator and reports the knee: the first level at which the p99 of a control-plane route
(register, manifest, heartbeat, work, contribution; not blob downloads) passes 1 s.

The load generator shares the machine with the coordinator: `--clients K` spreads the
volunteers over K processes when one cannot keep up (its loop lag and CPU say so).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import os
import random
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import safetensors.numpy
import torch

from crowdtrain import codec
from crowdtrain.codec import wire
from crowdtrain.config import load_config, parse_config

CONTROL_ROUTES = ("register", "manifest", "heartbeat", "work", "contribution")
ROUTES = (*CONTROL_ROUTES, "blob")
KNEE_MS = 1000.0
BATCH_SIZE, CONTEXT, STEPS = 4, 32, 2

CONFIG = """
name = "load"
[model]
arch = "gpt"
width = 32
depth = 1
heads = 2
context = {context}
[data]
source = "{corpus}"
dir = "{data}"
shard_bytes = 8192
val_fraction = 0.1
batch_size = {batch_size}
[inner]
steps = {steps}
[rounds]
total = 1000000
quorum = {quorum}
deadline_s = {deadline}
join_window = 1.0
max_peers_per_round = 1000000
[defence]
enabled = false
"""

ADMISSION = ["--register-burst", "0", "--admit-burst", "0"]
ADMISSION_NOTE = (
    "registration limits off for the benchmark (--register-burst 0 --admit-burst 0): "
    "every volunteer registers from 127.0.0.1"
)

WORDS = ["def", "class", "return", "import", "self", "if", "else", "for", "in", "None", "(", ")"]


@dataclass(frozen=True)
class Settings:
    """One load level."""

    volunteers: int
    seconds: float
    ramp_s: float = 5.0  # volunteers start uniformly over this many seconds
    train_s: float = 5.0  # median "training" time of a work order
    train_sigma: float = 0.5  # log-normal sigma of the training time
    deadline_s: float = 15.0  # rounds.deadline_s
    heartbeat_s: float = 15.0  # the client's interval for the default peer_timeout_s (60 s)
    timeout_s: float = 30.0  # per request; a timeout is an error
    clients: int = 1  # load-generator processes
    blobs: bool = True  # download weights and shards as a client does
    seed: int = 0

    @property
    def quorum(self) -> int:
        return max(1, min(16, self.volunteers // 4))


# --- the coordinator --------------------------------------------------------------------------


def write_corpus(path: Path, n_bytes: int = 100_000) -> Path:
    """About N_BYTES of deterministic Python-like lines (as the server tests' corpus)."""
    rng = random.Random(1)
    lines, size, i = [], 0, 0
    while size < n_bytes:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7)))
        line = f"{'    ' * rng.randint(0, 2)}{words} v{i % 23} = {rng.randint(0, 999)}\n"
        lines.append(line)
        size += len(line)
        i += 1
    path.write_text("".join(lines))
    return path


def _die_with_parent() -> None:
    """In the coordinator's process: SIGTERM when the benchmark dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    """`crowdtrain serve` in a subprocess with its state in TMP; stopped on exit."""

    def __init__(self, tmp: Path, settings: Settings) -> None:
        corpus = write_corpus(tmp / "corpus.py")
        config = tmp / "run.toml"
        config.write_text(
            CONFIG.format(
                corpus=corpus,
                data=tmp / "data",
                context=CONTEXT,
                batch_size=BATCH_SIZE,
                steps=STEPS,
                quorum=settings.quorum,
                deadline=settings.deadline_s,
            )
        )
        self.config = load_config(config)
        self.state = tmp / "state"
        self.log_path = tmp / "server.log"
        src = Path(__file__).resolve().parents[1] / "src"
        env = {**os.environ, "COLUMNS": "200"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "crowdtrain.cli", "serve", "--config", str(config)]
        cmd += ["--state", str(self.state), "--host", "127.0.0.1", "--port", "0", *ADMISSION]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        deadline = time.monotonic() + 180
        while not (self.state / "server.json").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the coordinator did not start:\n{self.log_tail()}")
            time.sleep(0.1)
        self.url: str = json.loads((self.state / "server.json").read_text())["url"]
        self.pid = self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def logged_errors(self) -> int:
        """Lines of the coordinator's log at ERROR level or tracebacks (a 500 logs one)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return sum(("ERROR" in ln or ln.startswith("Traceback")) for ln in text.splitlines())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Sampler:
    """Samples a process's RSS every 50 ms in the background: `peak` since the start or the
    last `reset`."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = self.start_rss = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    def reset(self) -> int:
        """The peak since the start or the last reset; the next peak counts from now."""
        peak, self.peak = self.peak, int(self.proc.memory_info().rss)
        return int(peak)

    def cpu_s(self) -> float:
        t = self.proc.cpu_times()
        return float(t.user + t.system)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# --- contributions ----------------------------------------------------------------------------


class Payloads:
    """Valid int8 contributions for the run's model, fresh bytes each time.

    One delta is encoded with `crowdtrain.codec.encode` (tens of milliseconds); every upload
    then gets new random int8 codes under that encoding's block scales and its own digest
    (`crowdtrain.codec.wire`), which costs well under a millisecond, so the load generator
    does not spend its time quantizing."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], spec: Any) -> None:
        gen = torch.Generator().manual_seed(0)
        delta = {k: torch.randn(s, generator=gen) * 1e-3 for k, s in shapes.items()}
        template = codec.encode(delta, spec)
        header = codec.read_header(template)
        self.core = wire.metadata_core(header.codec, header.params, header.shapes)
        self.tensors: dict[str, np.ndarray] = dict(safetensors.numpy.load(template))
        self.codes = [k for k in sorted(self.tensors) if k.endswith("::q")]

    def make(self, rng: np.random.Generator) -> bytes:
        tensors = dict(self.tensors)
        for name in self.codes:
            tensors[name] = rng.integers(-127, 128, size=tensors[name].shape, dtype=np.int8)
        views = [
            (n, memoryview(np.ascontiguousarray(tensors[n]).tobytes())) for n in sorted(tensors)
        ]
        text = wire.metadata_text(self.core, wire.compute_digest(self.core, views))
        return bytes(safetensors.numpy.save(tensors, metadata={wire.METADATA_KEY: text}))


# --- the simulated volunteers -----------------------------------------------------------------


class Stats:
    """What one load-generator process saw."""

    def __init__(self) -> None:
        self.latency_ms: dict[str, list[float]] = {r: [] for r in ROUTES}
        self.status: Counter[tuple[str, str]] = Counter()  # (route, "200" | exception name)
        self.refusals: Counter[tuple[str, int, str]] = Counter()  # (route, status, error code)
        self.orders: Counter[str] = Counter()
        self.uploads = Counter[str]()  # accepted, late
        self.loop_lag_ms: list[float] = []
        self.registered = 0
        self.first_at: float | None = None
        self.last_at = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "latency_ms": self.latency_ms,
            "status": [[r, s, n] for (r, s), n in self.status.items()],
            "refusals": [[r, s, c, n] for (r, s, c), n in self.refusals.items()],
            "orders": dict(self.orders),
            "uploads": dict(self.uploads),
            "loop_lag_ms": self.loop_lag_ms,
            "registered": self.registered,
        }


class Volunteer:
    """One simulated volunteer: its own connection pool, token, cache and random stream."""

    def __init__(
        self,
        index: int,
        url: str,
        settings: Settings,
        stats: Stats,
        payloads: Payloads,
        tls: ssl.SSLContext,
        end: float,
    ) -> None:
        self.index, self.settings, self.stats, self.payloads, self.end = (
            index,
            settings,
            stats,
            payloads,
            end,
        )
        self.rng = random.Random(settings.seed * 1_000_003 + index)
        self.np_rng = np.random.default_rng([settings.seed, index])
        self.http = httpx.AsyncClient(
            base_url=url,
            timeout=settings.timeout_s,
            verify=tls,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )
        self.auth: dict[str, str] = {}
        self.cached: set[str] = set()
        self.next_beat = math.inf  # no heartbeats before registering

    async def call(
        self, route: str, method: str, path: str, **kw: Any
    ) -> tuple[int, dict[str, Any] | None]:
        """One request, timed and counted; (status, JSON body or None). Status 0: no answer."""
        t0 = time.perf_counter()
        try:
            r = await self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            self.stats.status[(route, type(exc).__name__)] += 1
            self.stats.latency_ms[route].append(1000 * (time.perf_counter() - t0))
            return 0, None
        self.stats.latency_ms[route].append(1000 * (time.perf_counter() - t0))
        self.stats.status[(route, str(r.status_code))] += 1
        body: dict[str, Any] | None = None
        if r.headers.get("content-type", "").startswith("application/json"):
            with contextlib.suppress(ValueError):
                body = r.json()
        if r.status_code >= 400:
            code = str(body.get("error", "")) if body else ""
            self.stats.refusals[(route, r.status_code, code)] += 1
        return r.status_code, body

    async def sleep(self, seconds: float) -> None:
        """Sleep (never past the end), sending heartbeats when they are due."""
        until = min(time.monotonic() + seconds, self.end)
        while (now := time.monotonic()) < until:
            if now >= self.next_beat:
                self.next_beat = now + self.settings.heartbeat_s
                await self.call("heartbeat", "POST", "/v1/heartbeat", headers=self.auth)
                continue
            await asyncio.sleep(min(until, self.next_beat) - now)

    async def fetch(self, sha: str) -> None:
        if self.settings.blobs and sha not in self.cached:
            status, _ = await self.call("blob", "GET", f"/v1/blobs/{sha}", headers=self.auth)
            if status == 200:
                self.cached.add(sha)

    async def run(self) -> None:
        try:
            await asyncio.sleep(self.rng.uniform(0.0, self.settings.ramp_s))
            await self._run()
        finally:
            await self.http.aclose()

    async def _run(self) -> None:
        body = {
            "name": f"load-{self.settings.seed}-{self.index}",
            "device": {"kind": "cpu", "threads": 1, "name": "simulated"},
        }
        while True:  # registration: retried only after a 429 (the limits are off)
            if time.monotonic() >= self.end:
                return
            status, doc = await self.call("register", "POST", "/v1/register", json=body)
            if status == 200 and doc is not None:
                break
            if status == 409:  # an earlier attempt that timed out did register
                return
            await asyncio.sleep(1.0 if status != 429 else 5.0)
        self.stats.registered += 1
        self.auth = {"Authorization": f"Bearer {doc['token']}"}
        await self.call("manifest", "GET", "/v1/manifest")
        self.next_beat = time.monotonic() + self.settings.heartbeat_s
        while time.monotonic() < self.end:
            status, order = await self.call("work", "POST", "/v1/work", headers=self.auth)
            if status != 200 or order is None:
                await self.sleep(1.0)
                continue
            kind = str(order.get("kind"))
            self.stats.orders[kind] += 1
            if kind == "work":
                await self.work(order)
            elif kind == "wait":
                await self.sleep(min(float(order["retry_after"]), 5.0))
            elif kind == "finished":
                return
            else:  # verify / score: not given with the defence off
                await self.sleep(1.0)

    async def work(self, order: dict[str, Any]) -> None:
        t0 = time.monotonic()
        await self.fetch(order["weights"])
        for sha in order["shard_ids"]:
            await self.fetch(sha)
        s = self.settings
        train_s = s.train_s * math.exp(self.rng.gauss(0.0, s.train_sigma))
        await self.sleep(train_s)
        if time.monotonic() >= self.end:
            return
        steps = int(order["max_steps"])
        meta = {
            "base_version": order["base_version"],
            "samples": steps * BATCH_SIZE,
            "tokens": steps * BATCH_SIZE * CONTEXT,
            "steps": steps,
            "train_loss": 5.0,
            "compute_s": round(train_s, 3),
            "wall_s": round(time.monotonic() - t0, 3),
        }
        headers = {
            **self.auth,
            "Content-Type": "application/octet-stream",
            "X-Crowdtrain-Meta": json.dumps(meta),
        }
        payload = self.payloads.make(self.np_rng)
        path = f"/v1/contributions/{order['round']}"
        status, doc = await self.call("contribution", "PUT", path, content=payload, headers=headers)
        if status == 200:
            self.stats.uploads["accepted"] += 1
        elif status == 409 and doc is not None and doc.get("error") == "closed":
            self.stats.uploads["late"] += 1


async def _loop_lag(stats: Stats, end: float) -> None:
    """How late the event loop wakes a 50 ms sleep: the load generator's own saturation."""
    while time.monotonic() < end:
        t0 = time.perf_counter()
        await asyncio.sleep(0.05)
        stats.loop_lag_ms.append(max(0.0, 1000 * (time.perf_counter() - t0) - 50.0))


async def _drive(url: str, settings: Settings, indices: list[int], start_at: float) -> Stats:
    config_doc = httpx.get(f"{url}/v1/manifest", timeout=30).json()["manifest"]
    shapes = {k: tuple(v) for k, v in config_doc["param_shapes"].items()}
    spec = parse_config(config_doc["run"]).codec
    payloads = Payloads(shapes, spec)
    tls = ssl.create_default_context()  # one context for every pool (plain HTTP: unused)
    stats = Stats()
    while time.time() < start_at:  # processes start together
        await asyncio.sleep(min(0.05, start_at - time.time()))
    end = time.monotonic() + settings.seconds
    volunteers = [Volunteer(i, url, settings, stats, payloads, tls, end) for i in indices]
    lag = asyncio.create_task(_loop_lag(stats, end))
    await asyncio.gather(*(v.run() for v in volunteers))
    await lag
    return stats


def drive(url: str, settings: Settings, indices: list[int], start_at: float) -> dict[str, Any]:
    """Run the volunteers INDICES against URL (one process); their statistics as JSON."""
    t0 = time.process_time()
    stats = asyncio.run(_drive(url, settings, indices, start_at))
    doc = stats.to_json()
    doc["cpu_s"] = time.process_time() - t0
    return doc


# --- one level, a sweep, the report -----------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values), q))


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "count": len(values),
        "p50_ms": _round(_pct(values, 50)),
        "p99_ms": _round(_pct(values, 99)),
        "max_ms": _round(max(values) if values else None),
    }


def run_level(settings: Settings) -> dict[str, Any]:
    """Start a coordinator, run SETTINGS.volunteers volunteers for SETTINGS.seconds, stop it;
    the level's numbers (see `main` for the fields)."""
    with tempfile.TemporaryDirectory(prefix="crowdtrain-load-") as tmp:
        server = Server(Path(tmp), settings)
        try:
            return _measure(server, settings)
        finally:
            server.stop()


def _measure(server: Server, settings: Settings) -> dict[str, Any]:
    sampler = Sampler(server.pid)
    round0 = httpx.get(f"{server.url}/v1/status", timeout=30).json()["round"]
    clients = max(1, min(settings.clients, settings.volunteers))
    parts = [list(range(settings.volunteers))[k::clients] for k in range(clients)]
    if clients == 1:
        cpu0, start_at = sampler.cpu_s(), time.time()
        docs = [drive(server.url, settings, parts[0], start_at)]
    else:
        with ProcessPoolExecutor(clients, mp_context=get_context("spawn")) as pool:
            start_at = time.time() + 5.0  # time for the processes to start and import
            futures = [pool.submit(drive, server.url, settings, p, start_at) for p in parts]
            while time.time() < start_at:
                time.sleep(0.01)
            cpu0 = sampler.cpu_s()
            docs = [f.result() for f in futures]
    wall = time.time() - start_at  # the level's seconds and the requests still in flight
    cpu = sampler.cpu_s() - cpu0
    sampler.stop()
    status_doc = httpx.get(f"{server.url}/v1/status", timeout=30).json()
    latency: dict[str, list[float]] = {r: [] for r in ROUTES}
    statuses: Counter[tuple[str, str]] = Counter()
    refusals: Counter[tuple[str, int, str]] = Counter()
    orders: Counter[str] = Counter()
    uploads: Counter[str] = Counter()
    lag: list[float] = []
    for doc in docs:
        for route, values in doc["latency_ms"].items():
            latency[route].extend(values)
        for route, status, n in doc["status"]:
            statuses[(route, status)] += n
        for route, status, code, n in doc["refusals"]:
            refusals[(route, status, code)] += n
        orders.update(doc["orders"])
        uploads.update(doc["uploads"])
        lag.extend(doc["loop_lag_ms"])
    errors: Counter[str] = Counter()
    for (route, status), n in statuses.items():
        if not status.isdigit() or int(status) >= 500:
            errors[f"{route} {status}"] += n
    unexpected = {
        f"{route} {status} {code}": n
        for (route, status, code), n in refusals.items()
        if status < 500 and not (route == "contribution" and status == 409 and code == "closed")
    }
    every = [x for values in latency.values() for x in values]
    control = [x for r in CONTROL_ROUTES for x in latency[r]]
    requests = len(every)
    by_route = {r: _summary(v) for r, v in latency.items() if v}
    worst = max((by_route[r]["p99_ms"] or 0.0 for r in CONTROL_ROUTES if r in by_route), default=0)
    return {
        "volunteers": settings.volunteers,
        "registered": sum(d["registered"] for d in docs),
        "seconds": round(wall, 2),
        "requests": requests,
        "requests_per_s": round(requests / wall, 1),
        "overall": _summary(every),
        "control_plane": _summary(control),
        "worst_control_p99_ms": worst,
        "routes": by_route,
        "statuses": {
            r: {s: n for (rr, s), n in sorted(statuses.items()) if rr == r}
            for r in ROUTES
            if any(rr == r for rr, _ in statuses)
        },
        "errors": {"total": sum(errors.values()), "by_kind": dict(errors)},
        "unexpected_refusals": unexpected,
        "orders": dict(orders),
        "uploads": {"accepted": uploads["accepted"], "late": uploads["late"]},
        "rounds_closed": int(status_doc["round"]) - int(round0),
        "server": {
            "peak_rss_mb": round(sampler.peak / 2**20, 1),
            "start_rss_mb": round(sampler.start_rss / 2**20, 1),
            "cpu_s": round(cpu, 2),
            "cpu_cores": round(cpu / wall, 2),
            "logged_errors": server.logged_errors(),
        },
        "client": {
            "processes": clients,
            "cpu_s": round(sum(d["cpu_s"] for d in docs), 2),
            "loop_lag_p99_ms": None if not lag else round(_pct(lag, 99) or 0.0, 1),
            "loop_lag_max_ms": None if not lag else round(max(lag), 1),
        },
        "settings": {**asdict(settings), "quorum": settings.quorum},
    }


def knee(levels: list[dict[str, Any]]) -> int | None:
    """The first level (volunteers) at which a control-plane route's p99 passes 1 s."""
    for level in levels:
        if level["worst_control_p99_ms"] > KNEE_MS:
            return int(level["volunteers"])
    return None


def table(levels: list[dict[str, Any]]) -> str:
    """One row per level: requests/s, p50/p99 (ms) per route and overall, errors, RSS."""
    shown = [r for r in ROUTES if r != "manifest"]
    head = ["volunteers", "req/s", *[f"{r} p50/p99" for r in shown], "all p50/p99"]
    head += ["errors", "late", "rounds", "RSS MB", "srv CPU", "lag p99"]
    rows = [head]
    for lv in levels:

        def cell(s: dict[str, Any] | None) -> str:
            if not s or s["p50_ms"] is None:
                return "-"
            return f"{s['p50_ms']:.0f}/{s['p99_ms']:.0f}"

        rows.append(
            [
                str(lv["volunteers"]),
                f"{lv['requests_per_s']:.0f}",
                *[cell(lv["routes"].get(r)) for r in shown],
                cell(lv["overall"]),
                str(lv["errors"]["total"]),
                str(lv["uploads"]["late"]),
                str(lv["rounds_closed"]),
                f"{lv['server']['peak_rss_mb']:.0f}",
                f"{lv['server']['cpu_cores']:.2f}",
                f"{lv['client']['loop_lag_p99_ms'] or 0:.0f}",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def _settings(args: argparse.Namespace, volunteers: int) -> Settings:
    return Settings(
        volunteers=volunteers,
        seconds=args.seconds,
        ramp_s=args.ramp,
        train_s=args.train_s,
        train_sigma=args.train_sigma,
        deadline_s=args.deadline,
        heartbeat_s=args.heartbeat_s,
        timeout_s=args.timeout,
        clients=args.clients,
        blobs=not args.no_blobs,
        seed=args.seed,
    )


@contextlib.contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the coordinator is stopped on the way out."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--volunteers", type=int, help="one level of N volunteers")
    group.add_argument("--sweep", help="levels, comma-separated (e.g. 100,250,500,1000,2000)")
    ap.add_argument("--seconds", type=float, default=60.0, help="duration of each level")
    ap.add_argument("--ramp", type=float, default=5.0, help="volunteers start over this many s")
    ap.add_argument("--train-s", type=float, default=5.0, help="median training time, s")
    ap.add_argument("--train-sigma", type=float, default=0.5, help="its log-normal sigma")
    ap.add_argument("--deadline", type=float, default=15.0, help="rounds.deadline_s")
    ap.add_argument("--heartbeat-s", type=float, default=15.0, help="heartbeat interval, s")
    ap.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, s")
    ap.add_argument("--clients", type=int, default=1, help="load-generator processes")
    ap.add_argument("--no-blobs", action="store_true", help="skip weight and shard downloads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    if args.volunteers is not None:
        counts = [args.volunteers]
    else:
        counts = [int(x) for x in args.sweep.split(",") if x.strip()]
    if not counts or min(counts) < 1:
        ap.error("volunteer counts must be positive")
    print(ADMISSION_NOTE, flush=True)
    print(
        f"load generator: {args.clients} process(es) on this machine "
        f"({os.cpu_count()} CPUs), sharing it with the coordinator",
        flush=True,
    )
    load_before = os.getloadavg()
    levels = []
    with _exit_on_sigterm():
        for n in counts:
            settings = _settings(args, n)
            print(f"{n} volunteers for {args.seconds:g} s ...", flush=True)
            level = run_level(settings)
            levels.append(level)
            e = level["errors"]
            print(
                f"  {level['requests_per_s']:.0f} req/s, control p99 "
                f"{level['control_plane']['p99_ms']} ms, errors {e['total']} {e['by_kind']}, "
                f"unexpected {level['unexpected_refusals']}, uploads {level['uploads']}, "
                f"rounds {level['rounds_closed']}, peak RSS {level['server']['peak_rss_mb']} MB",
                flush=True,
            )
    print()
    print(table(levels))
    found = knee(levels)
    if args.sweep:
        print(f"knee (a control-plane p99 > 1 s): {found if found else 'not reached'}")
    doc = {
        "benchmark": "load_volunteers",
        "admission": ADMISSION_NOTE,
        "machine": {"cpus": os.cpu_count(), "load_avg_before": load_before},
        "knee": found,
        "levels": levels,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
