"""Transfer-time model of volunteer links and the coordinator, with per-link queueing.

The model, chosen to be simple, deterministic and computable when a transfer is requested (so
`upload` and `download` can return the arrival time at once):

* **Time of one transfer** without contention: ``1.5 × rtt + nbytes × 8 / rate``. Latency is one
  round trip for the request (the HTTP request and its response headers) plus half a round trip
  for the last byte to propagate. It is a pure delay: it occupies no bandwidth, so the next
  transfer on a link may start transmitting while the previous one's latency elapses (as with
  a pipelined connection). ``rate`` is the bottleneck ``min(peer direction, coordinator side)``.
* **Peer links** (each peer's uplink and downlink separately) are FIFO queues: a transfer starts
  transmitting when the one booked before it on that link finished, and holds the link alone.
* **The coordinator's ingress and egress** are shared capacities. A transfer reserves its rate
  (the bottleneck rate) on the coordinator side for the time it transmits; it starts at the
  earliest moment, no earlier than its peer link allows, at which that rate fits under the
  coordinator's capacity for the whole transmission. Bookings are first-come first-served and
  never moved, so a later transfer never delays an earlier one, but it may use capacity left
  idle between earlier bookings. Two peers that each could fill the coordinator therefore
  serialize; ten peers at a tenth of its capacity run side by side. An infinite coordinator
  capacity makes the peers independent.

Bytes and busy time are counted when a transfer arrives. `cancel_peer` (churn) drops a peer's
queued and in-flight transfers: their callbacks never fire and the coordinator capacity they
had not yet used is released (bookings of other transfers are not moved earlier).

This is the bandwidth model behind the simulator of DiLoCo-style volunteer training (Douillard
et al., "DiLoCo", 2023; Jaghouar et al., "OpenDiLoCo", 2024), where the ratio of communication
to computation time decides the efficiency a swarm reaches.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from crowdtrain.sim.events import EventLoop, Handle

__all__ = ["LATENCY_RTTS", "Link", "Network", "PeerStats", "transfer_time"]

LATENCY_RTTS = 1.5
"""One-way latency of a transfer in round trips: one for the request, a half for the data."""

_EPS = 1e-9


def _positive_rate(name: str, value: float) -> None:
    if not value > 0:  # also rejects NaN
        raise ValueError(f"{name} must be a positive number of bits per second, not {value!r}")


@dataclass(frozen=True)
class Link:
    """One peer's connection: uplink and downlink bandwidth (bit/s) and round-trip time (s)."""

    up_bps: float
    down_bps: float
    rtt_s: float

    def __post_init__(self) -> None:
        _positive_rate("a link's up_bps", self.up_bps)
        _positive_rate("a link's down_bps", self.down_bps)
        if not (math.isfinite(self.rtt_s) and self.rtt_s >= 0):
            raise ValueError(f"a link's rtt_s must be zero or more seconds, not {self.rtt_s!r}")


def transfer_time(nbytes: int, rate_bps: float, rtt_s: float) -> float:
    """Seconds one transfer takes without contention: 1.5 × rtt + nbytes × 8 / rate."""
    return LATENCY_RTTS * rtt_s + _transmit(nbytes, rate_bps)


def _transmit(nbytes: int, rate_bps: float) -> float:
    return 0.0 if nbytes == 0 or math.isinf(rate_bps) else nbytes * 8 / rate_bps


@dataclass
class PeerStats:
    """What one peer moved: bytes each way and seconds each link spent transmitting."""

    bytes_up: int = 0
    bytes_down: int = 0
    busy_up_s: float = 0.0
    busy_down_s: float = 0.0


class _Capacity:
    """The committed rate of a shared resource over future time, as a step function.

    Segment i covers [times[i], times[i + 1]) (the last one runs to infinity and is always 0)
    and has `used[i]` bits per second reserved.
    """

    def __init__(self, capacity_bps: float) -> None:
        self.capacity = capacity_bps
        self.times: list[float] = [-math.inf]
        self.used: list[float] = [0.0]

    def earliest(self, ready: float, duration: float, rate: float) -> float:
        """The earliest start ≥ ready at which `rate` fits for `duration` seconds."""
        limit = self.capacity * (1 + _EPS) - rate
        times, used = self.times, self.used
        i = bisect.bisect_right(times, ready) - 1
        start = ready
        while True:
            end = times[i + 1] if i + 1 < len(times) else math.inf
            if used[i] > limit:
                start = end  # the last segment is empty, so this is always finite
            elif end - start >= duration:
                return start
            i += 1

    def add(self, start: float, end: float, rate: float) -> None:
        """Reserve `rate` (negative to release) over [start, end)."""
        if end <= start:
            return
        a = self._split(start)
        b = self._split(end)
        for k in range(a, b):
            self.used[k] = max(0.0, self.used[k] + rate)

    def prune(self, now: float) -> None:
        """Forget segments that ended before `now`."""
        k = bisect.bisect_right(self.times, now) - 1
        if k > 0:
            del self.times[:k]
            del self.used[:k]

    def _split(self, t: float) -> int:
        """Make `t` a breakpoint; return its segment index."""
        k = bisect.bisect_left(self.times, t)
        if k < len(self.times) and self.times[k] == t:
            return k
        self.times.insert(k, t)
        self.used.insert(k, self.used[k - 1])
        return k


@dataclass(eq=False)
class _Transfer:
    peer_id: str
    up: bool
    nbytes: int
    start: float
    end: float
    rate: float
    handle: Handle | None = None


@dataclass
class _Peer:
    link: Link
    stats: PeerStats = field(default_factory=PeerStats)
    up_free: float = -math.inf
    down_free: float = -math.inf
    inflight: dict[int, _Transfer] = field(default_factory=dict)


class Network:
    """Peers' links and the coordinator's bandwidth; schedules transfer completions on a loop."""

    def __init__(
        self,
        loop: EventLoop,
        *,
        coordinator_in_bps: float = math.inf,
        coordinator_out_bps: float = math.inf,
    ) -> None:
        _positive_rate("coordinator_in_bps", coordinator_in_bps)
        _positive_rate("coordinator_out_bps", coordinator_out_bps)
        self.loop = loop
        self.coordinator_in_bps = coordinator_in_bps
        self.coordinator_out_bps = coordinator_out_bps
        self._ingress = _Capacity(coordinator_in_bps)
        self._egress = _Capacity(coordinator_out_bps)
        self._peers: dict[str, _Peer] = {}
        self._next_id = 0
        self.coordinator_bytes_in = 0
        self.coordinator_bytes_out = 0

    def add_peer(self, peer_id: str, link: Link) -> None:
        """Connect a peer; a peer already connected gets the new link for later transfers."""
        if peer_id in self._peers:
            self._peers[peer_id].link = link
        else:
            self._peers[peer_id] = _Peer(link)

    def link(self, peer_id: str) -> Link:
        """The link of a connected peer."""
        return self._peer(peer_id).link

    def stats(self, peer_id: str) -> PeerStats:
        """Bytes moved and busy seconds of a peer's links (completed transfers only)."""
        return self._peer(peer_id).stats

    @property
    def peers(self) -> list[str]:
        """Connected peers, in the order they were added."""
        return list(self._peers)

    def in_flight(self, peer_id: str) -> int:
        """How many of a peer's transfers are queued or under way."""
        return len(self._peer(peer_id).inflight)

    def upload(self, peer_id: str, nbytes: int, on_done: Callable[[], None]) -> float:
        """Send `nbytes` from the peer to the coordinator; `on_done` runs on arrival (returned)."""
        return self._transfer(peer_id, nbytes, on_done, up=True)

    def download(self, peer_id: str, nbytes: int, on_done: Callable[[], None]) -> float:
        """Send `nbytes` from the coordinator to the peer; `on_done` runs on arrival (returned)."""
        return self._transfer(peer_id, nbytes, on_done, up=False)

    def cancel_peer(self, peer_id: str) -> int:
        """Drop the peer's queued and in-flight transfers (churn); return how many were dropped.

        Their callbacks never run, nothing of them is counted, the peer's links are free at
        once, and the coordinator capacity they had not yet used is released.
        """
        peer = self._peer(peer_id)
        now = self.loop.now
        for t in peer.inflight.values():
            if t.handle is not None:
                self.loop.cancel(t.handle)
            if t.end > now and not math.isinf(t.rate):
                side = self._ingress if t.up else self._egress
                if not math.isinf(side.capacity):
                    side.add(max(now, t.start), t.end, -t.rate)
        dropped = len(peer.inflight)
        peer.inflight.clear()
        peer.up_free = peer.down_free = -math.inf
        return dropped

    def _peer(self, peer_id: str) -> _Peer:
        try:
            return self._peers[peer_id]
        except KeyError:
            raise ValueError(f"unknown peer {peer_id!r}: connect it with add_peer first") from None

    def _transfer(
        self, peer_id: str, nbytes: int, on_done: Callable[[], None], *, up: bool
    ) -> float:
        peer = self._peer(peer_id)
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"a transfer size must be a whole number of bytes, not {nbytes!r}")
        now = self.loop.now
        side = self._ingress if up else self._egress
        rate = min(peer.link.up_bps if up else peer.link.down_bps, side.capacity)
        duration = _transmit(nbytes, rate)
        ready = max(now, peer.up_free if up else peer.down_free)
        if duration > 0 and not math.isinf(side.capacity):
            side.prune(now)
            start = side.earliest(ready, duration, rate)
            side.add(start, start + duration, rate)
        else:
            start = ready
        end = start + duration
        if up:
            peer.up_free = end
        else:
            peer.down_free = end
        arrival = end + LATENCY_RTTS * peer.link.rtt_s
        transfer = _Transfer(peer_id, up, nbytes, start, end, rate)
        key = self._next_id
        self._next_id += 1
        peer.inflight[key] = transfer

        def done() -> None:
            del peer.inflight[key]
            stats = peer.stats
            if up:
                stats.bytes_up += nbytes
                stats.busy_up_s += duration
                self.coordinator_bytes_in += nbytes
            else:
                stats.bytes_down += nbytes
                stats.busy_down_s += duration
                self.coordinator_bytes_out += nbytes
            on_done()

        label = f"{'upload' if up else 'download'} {peer_id} {nbytes}B"
        transfer.handle = self.loop.schedule(arrival, done, label=label)
        return arrival
