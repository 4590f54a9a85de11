"""Prometheus metrics of one coordinator's run, and an ASGI middleware counting HTTP body bytes.

`RunMetrics` owns its own `prometheus_client.CollectorRegistry` (never the process-wide default),
so many coordinators can live in one process, as they do in the tests. The coordinator calls its
methods as the run moves (contributions judged, rounds closed, peers seen) and serves `render()`
at `/metrics` in the Prometheus text exposition format. The round structure being measured is
DiLoCo's (Douillard et al. 2023, arXiv:2311.08105): aggregation time covers screening,
aggregation and the outer optimizer step of one round.

`ByteCounter` is pure ASGI (not Starlette's `BaseHTTPMiddleware`), so streamed bodies pass
through message by message and are never buffered: it only adds up the sizes of the
`http.request` bodies received and the `http.response.body` bodies sent.
"""

from __future__ import annotations

import math
import re
import threading

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "AGGREGATION_BUCKETS",
    "MAX_REASONS",
    "ROUND_DURATION_BUCKETS",
    "ByteCounter",
    "RunMetrics",
]

#: Histogram buckets for the time to screen, aggregate and outer-step a round: 1 ms … 60 s.
AGGREGATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
#: Histogram buckets for the wall time of a round from open to close: 1 s … 2 h.
ROUND_DURATION_BUCKETS = (
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
    3600.0,
    7200.0,
)
#: At most this many distinct rejection reasons get their own label; later ones count as "other".
MAX_REASONS = 32
_REASON_CHARS = re.compile(r"[^a-z0-9_]+")


def _reason_code(reason: str) -> str:
    """A short label value from a reason: lower case, [a-z0-9_] only, at most 32 characters."""
    code = _REASON_CHARS.sub("_", reason.strip().lower()).strip("_")[:32]
    return code or "unknown"


class RunMetrics:
    """The Prometheus metrics of one run, in a registry of their own. Thread-safe."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._rounds = Counter("crowdtrain_rounds", "Rounds closed.", registry=r)
        self._round = Gauge("crowdtrain_round", "Number of the round that is open.", registry=r)
        self._version = Gauge(
            "crowdtrain_model_version", "Version of the global weights.", registry=r
        )
        self._contributions = Counter(
            "crowdtrain_contributions",
            "Contributions judged, by outcome (accepted/rejected) and rejection reason.",
            ["outcome", "reason"],
            registry=r,
        )
        self._samples = Counter(
            "crowdtrain_contribution_samples",
            "Training samples claimed by accepted contributions.",
            registry=r,
        )
        self._bytes_received = Counter(
            "crowdtrain_bytes_received", "HTTP request body bytes received.", registry=r
        )
        self._bytes_sent = Counter(
            "crowdtrain_bytes_sent", "HTTP response body bytes sent.", registry=r
        )
        self._peers_online = Gauge(
            "crowdtrain_peers_online", "Peers seen recently (online).", registry=r
        )
        self._peers_banned = Gauge("crowdtrain_peers_banned", "Peers banned.", registry=r)
        self._peers_registered = Gauge(
            "crowdtrain_peers_registered", "Peers registered in the run.", registry=r
        )
        self._eval_loss = Gauge(
            "crowdtrain_eval_loss", "Held-out loss after the last closed round.", registry=r
        )
        self._train_loss = Gauge(
            "crowdtrain_train_loss",
            "Mean training loss reported in the last closed round.",
            registry=r,
        )
        self._aggregation = Histogram(
            "crowdtrain_aggregation_seconds",
            "Time to screen, aggregate and outer-step a round.",
            buckets=AGGREGATION_BUCKETS,
            registry=r,
        )
        self._round_duration = Histogram(
            "crowdtrain_round_duration_seconds",
            "Wall time of a round from open to close.",
            buckets=ROUND_DURATION_BUCKETS,
            registry=r,
        )
        self._paused = Gauge("crowdtrain_run_paused", "1 while the run is paused.", registry=r)
        self._finished = Gauge("crowdtrain_run_finished", "1 once the run is finished.", registry=r)
        self._lock = threading.Lock()
        self._reasons: set[str] = set()
        # The byte totals again as plain numbers: the coordinator reads them at every tick,
        # where a registry lookup would collect every metric (ByteCounter is the one writer).
        self._in = self._out = 0

    # -- events ------------------------------------------------------------------------------

    def contribution(self, accepted: bool, reason: str = "", samples: int = 0) -> None:
        """Count one judged contribution; `reason` is a short code for a rejection ("norm").

        Accepted contributions add their `samples`. Reasons are normalised to [a-z0-9_] and,
        to keep the number of label values bounded, only the first `MAX_REASONS` distinct
        ones are labelled as themselves; later ones count as "other".
        """
        if accepted:
            self._contributions.labels(outcome="accepted", reason="").inc()
            if samples > 0:
                self._samples.inc(samples)
            return
        code = _reason_code(reason)
        with self._lock:
            if code not in self._reasons:
                if len(self._reasons) >= MAX_REASONS:
                    code = "other"
                self._reasons.add(code)
        self._contributions.labels(outcome="rejected", reason=code).inc()

    def round_closed(
        self,
        *,
        round: int,
        version: int,
        eval_loss: float,
        train_loss: float,
        aggregation_s: float,
        duration_s: float,
    ) -> None:
        """Record the close of round `round` (the next one, `round + 1`, is now open).

        A loss that is not finite (NaN when no contribution reported one) leaves its gauge as
        it was; negative durations are recorded as zero.
        """
        self._rounds.inc()
        self._round.set(round + 1)
        self._version.set(version)
        if math.isfinite(eval_loss):
            self._eval_loss.set(eval_loss)
        if math.isfinite(train_loss):
            self._train_loss.set(train_loss)
        if math.isfinite(aggregation_s):
            self._aggregation.observe(max(0.0, aggregation_s))
        if math.isfinite(duration_s):
            self._round_duration.observe(max(0.0, duration_s))

    def bytes_received(self, n: int) -> None:
        """Add `n` HTTP body bytes received."""
        if n > 0:
            self._bytes_received.inc(n)
            self._in += n

    def bytes_sent(self, n: int) -> None:
        """Add `n` HTTP body bytes sent."""
        if n > 0:
            self._bytes_sent.inc(n)
            self._out += n

    def bytes_totals(self) -> tuple[int, int]:
        """HTTP body bytes received and sent so far (cheap: no registry lookup)."""
        return self._in, self._out

    def peers(self, online: int, registered: int, banned: int) -> None:
        """Set the peer counts."""
        self._peers_online.set(online)
        self._peers_registered.set(registered)
        self._peers_banned.set(banned)

    def state(self, round: int, paused: bool, finished: bool) -> None:
        """Set the open round and whether the run is paused or finished."""
        self._round.set(round)
        self._paused.set(1 if paused else 0)
        self._finished.set(1 if finished else 0)

    # -- reading -----------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _value(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def _rejected_total(self) -> float:
        total = 0.0
        for family in self._contributions.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("outcome") == "rejected":
                    total += sample.value
        return total

    def snapshot(self) -> dict[str, float]:
        """The current numbers as a flat dict (for the dashboard), names without the prefix."""
        v = self._value
        return {
            "rounds_total": v("crowdtrain_rounds_total"),
            "round": v("crowdtrain_round"),
            "model_version": v("crowdtrain_model_version"),
            "contributions_accepted_total": v(
                "crowdtrain_contributions_total", {"outcome": "accepted", "reason": ""}
            ),
            "contributions_rejected_total": self._rejected_total(),
            "contribution_samples_total": v("crowdtrain_contribution_samples_total"),
            "bytes_received_total": v("crowdtrain_bytes_received_total"),
            "bytes_sent_total": v("crowdtrain_bytes_sent_total"),
            "peers_online": v("crowdtrain_peers_online"),
            "peers_registered": v("crowdtrain_peers_registered"),
            "peers_banned": v("crowdtrain_peers_banned"),
            "eval_loss": v("crowdtrain_eval_loss"),
            "train_loss": v("crowdtrain_train_loss"),
            "run_paused": v("crowdtrain_run_paused"),
            "run_finished": v("crowdtrain_run_finished"),
        }


class ByteCounter:
    """ASGI middleware adding HTTP request and response body sizes to `RunMetrics`.

    Pure ASGI: each message is counted as it passes, so streamed bodies stay streamed. Scopes
    other than "http" (lifespan, websocket) pass through untouched.
    """

    def __init__(self, app: ASGIApp, metrics: RunMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.metrics

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                metrics.bytes_received(len(message.get("body", b"")))
            return message

        async def counting_send(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body":
                metrics.bytes_sent(len(message.get("body", b"")))

        await self.app(scope, counting_receive, counting_send)
