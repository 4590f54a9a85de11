"""What the dashboard at `/` shows: the time series a coordinator keeps, and the document it serves.

The page (server/static/) polls `GET /v1/dashboard`; this module turns the coordinator's state
into that one JSON document (docs/API.md, "Dashboard"). Loss per round comes from the stored
versions, so it survives a restart; the peers-online and bandwidth series are sampled at the
coordinator's ticks and kept in memory (bounded, thinned as the run goes on), so they start
afresh after a restart. The generated text is the current model continuing a fixed prompt:
people watch the model learn. No paper is implemented here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from crowdtrain.config import ModelConfig
from crowdtrain.models.generate import generate, printable
from crowdtrain.protocol import Verdict
from crowdtrain.store import VersionRow
from crowdtrain.strictjson import finite_or_none

PROMPT = "def "
SAMPLE_TOKENS = 160
SHOWN_OUTCOMES = ("rejected", "flagged", "banned", "check_failed", "check_expired")


class Timeline:
    """Time series sampled at the coordinator's ticks: peers online and HTTP traffic.

    A peers point is kept when the count changes (and at least every `every_s`, so the line
    reaches the present); a bandwidth point every `every_s`, as the byte rates since the last.
    A series that reaches `max_points` is halved (every other peers point; bandwidth points
    merged in pairs) and its spacing doubled, so it covers the whole run in bounded memory.
    """

    def __init__(self, *, every_s: float = 5.0, max_points: int = 500) -> None:
        self.peers_every = self.bandwidth_every = every_s
        self.max_points = max_points
        self.peers: list[tuple[float, int]] = []
        self.bandwidth: list[tuple[float, float, float]] = []
        self._last_bytes: tuple[float, float, float] | None = None  # (time, in, out)
        self._lock = threading.Lock()

    def sample(self, now: float, online: int, bytes_in: float, bytes_out: float) -> None:
        """Record the state at `now` (called from every tick)."""
        with self._lock:
            last = self.peers[-1] if self.peers else None
            if last is None or last[1] != online or now - last[0] >= self.peers_every:
                self.peers.append((now, online))
                if len(self.peers) >= self.max_points:
                    self.peers = self.peers[::2] + (
                        [self.peers[-1]] if len(self.peers) % 2 == 0 else []
                    )
                    self.peers_every *= 2
            if self._last_bytes is None:
                self._last_bytes = (now, bytes_in, bytes_out)
                return
            t0, in0, out0 = self._last_bytes
            if now - t0 >= self.bandwidth_every:
                dt = now - t0
                self.bandwidth.append((now, (bytes_in - in0) / dt, (bytes_out - out0) / dt))
                self._last_bytes = (now, bytes_in, bytes_out)
                if len(self.bandwidth) >= self.max_points:
                    pairs = zip(self.bandwidth[::2], self.bandwidth[1::2], strict=False)
                    self.bandwidth = [
                        (b[0], (a[1] + b[1]) / 2, (a[2] + b[2]) / 2) for a, b in pairs
                    ]
                    self.bandwidth_every *= 2

    def to_json(self) -> dict[str, list[list[float]]]:
        with self._lock:
            return {
                "peers_online": [[round(t, 3), n] for t, n in self.peers],
                "bandwidth": [
                    [round(t, 3), round(i, 1), round(o, 1)] for t, i, o in self.bandwidth
                ],
            }


@dataclass
class Sample:
    """Text the model of `version` wrote after `prompt`."""

    version: int
    prompt: str
    text: str


class SampleCache:
    """The current model's continuation of a fixed prompt, generated once per version.

    Generation runs on whichever request finds the cache stale; a request that arrives while
    another is generating gets the previous sample instead of waiting.
    """

    def __init__(self, model: ModelConfig, *, prompt: str = PROMPT, tokens: int = SAMPLE_TOKENS):
        self.model, self.prompt, self.tokens = model, prompt, tokens
        self.current: Sample | None = None
        self._busy = threading.Lock()

    def get(self, version: int, params: Callable[[], Mapping[str, torch.Tensor]]) -> Sample | None:
        """The sample for `version`, generating it from `params()` when it is not cached."""
        if self.current is not None and self.current.version == version:
            return self.current
        if not self._busy.acquire(blocking=False):
            return self.current
        try:
            text = generate(self.model, params(), self.prompt, self.tokens, seed=version)
            self.current = Sample(version, self.prompt, printable(text))
        finally:
            self._busy.release()
        return self.current


def device_label(device: Mapping[str, Any]) -> str:
    """'cpu · 4 threads' from what a volunteer said about its machine."""
    kind = str(device.get("kind", "cpu"))
    threads = int(device.get("threads", 1) or 1)
    name = str(device.get("name", "")).strip()
    label = f"{kind} · {threads} thread{'s' if threads != 1 else ''}"
    return f"{label} · {name}" if name else label


def round_rows(versions: Iterable[VersionRow], started_at: float) -> list[dict[str, Any]]:
    """One row per closed round, for the loss, bandwidth and utilization charts."""
    rows = []
    for v in versions:
        if v.version == 0:
            continue
        m = v.metrics
        rows.append(
            {
                "round": v.round,
                "version": v.version,
                "time": v.created_at,
                "elapsed_s": round(v.created_at - started_at, 3),
                "contributors": len(m.get("contributors", [])),
                "samples": m.get("samples", 0),
                "train_loss": finite_or_none(m.get("train_loss")),
                "eval_loss": finite_or_none(m.get("eval_loss")),
                "bytes_up": m.get("bytes_up", 0),
                "aggregation_s": finite_or_none(m.get("aggregation_s")),
                "compute_utilization": finite_or_none(m.get("compute_utilization")),
            }
        )
    return rows


def volunteer_rows(
    peers: Iterable[Mapping[str, Any]], devices: Mapping[str, str]
) -> list[dict[str, Any]]:
    """The volunteers table, most samples first (the leaderboard is its head)."""
    out = [{**p, "device": devices.get(p["peer_id"], device_label({}))} for p in peers]
    out.sort(key=lambda r: (-r["samples"], r["name"]))
    return out


def rejection_rows(verdicts: Iterable[Verdict], names: Mapping[str, str]) -> list[dict[str, Any]]:
    """Refusals, flags, bans and failed checks with their reasons, newest last (at most 100)."""
    shown = [v for v in verdicts if v.outcome in SHOWN_OUTCOMES]
    return [
        {
            "time": v.time,
            "peer": names.get(v.peer_id, v.peer_id),
            "peer_id": v.peer_id,
            "round": v.round,
            "stage": v.stage,
            "outcome": v.outcome,
            "reason": v.reason,
        }
        for v in shown[-100:]
    ]
