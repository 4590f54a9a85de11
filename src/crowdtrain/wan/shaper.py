"""One direction of an emulated internet link, as a pure function of the clock it is given.

``LinkShaper`` is the model behind the WAN-emulating proxy (``crowdtrain.wan.proxy``): a FIFO
bottleneck that serialises bytes at a fixed rate, followed by a fixed one-way propagation delay.
It is the ``rate`` + ``delay`` pair of Linux netem (Hemminger 2005, "Network Emulation with
NetEm", linux.conf.au) and the bandwidth/delay pipe of Dummynet (Rizzo 1997, "Dummynet: a simple
approach to the evaluation of network protocols", ACM SIGCOMM CCR 27(1)).

It is sans-IO: it never reads a clock and never sleeps. The caller passes ``now`` and gets back
the time at which the chunk will have been delivered; the proxy (or a simulator, or a test)
decides what to do with that time. Transmission and delivery are kept apart: the link is busy
until the last byte has been *sent* (``transmit``), and it is *delivered* one propagation delay
later (``schedule``). Because only transmission occupies the link, bytes may be in flight while
the next chunk is already being sent, so a sender that keeps the pipe full gets the full rate
whatever the latency: the pipe holds up to rate × delay bytes, its bandwidth-delay product
(Jacobson 1988, "Congestion Avoidance and Control", SIGCOMM; RFC 7323 §1.1 "long, fat pipes").

One shaper stands for one direction of one volunteer's access link, so every TCP connection of
that volunteer shares it, as they share the real uplink. A lock makes that sharing safe even
across threads (several proxies, each on its own event loop); it is the only state guard and it
is never held while waiting.
"""

from __future__ import annotations

import math
import threading

__all__ = ["LinkShaper"]


class LinkShaper:
    """A FIFO link direction: ``rate_bps`` bits/s of serialisation, then ``latency_s`` of delay.

    ``rate_bps=None`` means unlimited bandwidth (delay only). Times are in seconds on whatever
    monotonic clock the caller uses; the shaper only compares and adds them.
    """

    def __init__(self, rate_bps: float | None, latency_s: float) -> None:
        if rate_bps is not None and not (math.isfinite(rate_bps) and rate_bps > 0):
            raise ValueError(
                f"The link rate must be a positive number of bits per second or None for "
                f"unlimited, not {rate_bps!r}."
            )
        if not (math.isfinite(latency_s) and latency_s >= 0):
            raise ValueError(
                f"The link latency must be a non-negative number of seconds, not {latency_s!r}."
            )
        self.rate_bps = rate_bps
        self.latency_s = latency_s
        self._busy_until = -math.inf
        self._lock = threading.Lock()

    @property
    def busy_until(self) -> float:
        """When the link finishes sending everything scheduled so far (-inf if never used)."""
        return self._busy_until

    def serialization_s(self, nbytes: int) -> float:
        """Seconds the link needs to put ``nbytes`` on the wire (0 when the rate is unlimited)."""
        if nbytes < 0:
            raise ValueError(f"A chunk cannot have a negative size ({nbytes} bytes).")
        if self.rate_bps is None:
            return 0.0
        return nbytes * 8.0 / self.rate_bps

    def transmit(self, now: float, nbytes: int) -> float:
        """Queue ``nbytes`` offered at ``now``; return when their last byte has been sent.

        Sending starts when the link is free (after every chunk queued earlier, FIFO) or at
        ``now`` if it is idle, so an idle gap resets the queue. The link is busy until then.
        """
        duration = self.serialization_s(nbytes)
        with self._lock:
            start = max(now, self._busy_until)
            end = start + duration
            self._busy_until = end
        return end

    def schedule(self, now: float, nbytes: int) -> float:
        """Queue ``nbytes`` offered at ``now``; return when their last byte reaches the far end.

        That is ``transmit(now, nbytes) + latency_s``: the propagation delay is added once per
        chunk and does not occupy the link. A zero-byte chunk (an end-of-stream marker) is
        delivered after everything queued before it, one latency after the link frees.
        """
        return self.transmit(now, nbytes) + self.latency_s

    def __repr__(self) -> str:
        rate = "unlimited" if self.rate_bps is None else f"{self.rate_bps:g} bit/s"
        return f"LinkShaper(rate={rate}, latency={self.latency_s:g} s)"
