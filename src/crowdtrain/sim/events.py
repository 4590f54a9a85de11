"""Discrete-event engine with a virtual clock: the time base of the simulator.

Events are (time, action) pairs kept in a binary heap and run in time order; events scheduled
for the same time run in the order they were scheduled (FIFO), so a run is a deterministic
function of what was scheduled. Time is virtual: it jumps from one event to the next and only
the loop moves it. `VirtualClock` is the clock the sans-IO protocol core is given, so the
protocol reads simulated time exactly as it reads wall time in the networked coordinator.

This is the classic next-event time-advance scheme of discrete-event simulation (Law & Kelton,
"Simulation Modeling and Analysis", ch. 1), used here to measure DiLoCo-style volunteer training
(Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models", 2023)
without HTTP and without wall-clock waits.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["EventLoop", "Handle", "VirtualClock"]


class VirtualClock:
    """The current virtual time in seconds; call it to read the time. Only its loop moves it."""

    __slots__ = ("_now",)

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    def __call__(self) -> float:
        return self._now

    @property
    def now(self) -> float:
        """The current virtual time in seconds (the same as calling the clock)."""
        return self._now

    def _advance(self, to: float) -> None:
        # Called by EventLoop only; time never runs backwards.
        if to > self._now:
            self._now = to


@dataclass(eq=False)
class Handle:
    """A scheduled event: when it runs, its label, and whether it ran or was cancelled."""

    at: float
    seq: int
    label: str = ""
    action: Callable[[], None] | None = field(default=None, repr=False)
    cancelled: bool = False
    done: bool = False

    @property
    def pending(self) -> bool:
        """Whether the event will still run (it neither ran nor was cancelled)."""
        return not (self.cancelled or self.done)


class EventLoop:
    """Runs scheduled actions in (time, scheduling order) order on a virtual clock.

    Actions may schedule and cancel events, including at the current time; such events run in
    the same `run` call. An action that raises stops the loop: the exception propagates with the
    clock at the failing event's time, that event counts as done, and the remaining events stay
    scheduled.
    """

    def __init__(self, start: float = 0.0) -> None:
        if not math.isfinite(start):
            raise ValueError(f"the loop's start time must be a finite number, not {start!r}")
        self.clock = VirtualClock(start)
        self._heap: list[tuple[float, int, Handle]] = []
        self._seq = 0
        self._pending = 0
        self._running = False

    @property
    def now(self) -> float:
        """The current virtual time in seconds."""
        return self.clock.now

    @property
    def pending(self) -> int:
        """How many scheduled events have neither run nor been cancelled."""
        return self._pending

    def schedule(self, at: float, action: Callable[[], None], *, label: str = "") -> Handle:
        """Run `action` at virtual time `at` (which must not be in the past)."""
        if not math.isfinite(at):
            raise ValueError(f"an event time must be a finite number, not {at!r}")
        if at < self.now:
            raise ValueError(
                f"cannot schedule {label or 'an event'} at {at} before now ({self.now})"
            )
        handle = Handle(at=float(at), seq=self._seq, label=label, action=action)
        self._seq += 1
        heapq.heappush(self._heap, (handle.at, handle.seq, handle))
        self._pending += 1
        return handle

    def after(self, delay: float, action: Callable[[], None], *, label: str = "") -> Handle:
        """Run `action` `delay` seconds (zero or more) from now."""
        if not delay >= 0:
            raise ValueError(f"an event delay must be zero or more seconds, not {delay!r}")
        return self.schedule(self.now + delay, action, label=label)

    def cancel(self, handle: Handle) -> bool:
        """Stop a scheduled event from running; False if it already ran or was cancelled."""
        if not handle.pending:
            return False
        handle.cancelled = True
        handle.action = None  # drop the closure now; the heap entry is skipped lazily
        self._pending -= 1
        return True

    def peek(self) -> float | None:
        """The time of the next pending event, or None when nothing is scheduled."""
        self._drop_cancelled()
        return self._heap[0][0] if self._heap else None

    def run(self, until: float | None = None, max_events: int | None = None) -> int:
        """Run events in order; return how many ran.

        Stops when no events are left, when the next one is later than `until`, or after
        `max_events` events. If it stopped for lack of events at or before `until`, the clock
        then reads `until` (time passes even when nothing happens).
        """
        if self._running:
            raise RuntimeError("EventLoop.run was called from inside an event; schedule instead")
        if until is not None and (math.isnan(until) or until < self.now):
            raise ValueError(f"run(until={until!r}) must not be before now ({self.now})")
        if max_events is not None and max_events < 0:
            raise ValueError(f"max_events must be zero or more, not {max_events}")
        ran = 0
        self._running = True
        try:
            while max_events is None or ran < max_events:
                self._drop_cancelled()
                if not self._heap or (until is not None and self._heap[0][0] > until):
                    if until is not None and math.isfinite(until):
                        self.clock._advance(until)
                    break
                at, _, handle = heapq.heappop(self._heap)
                self.clock._advance(at)
                action = handle.action
                handle.action = None
                handle.done = True
                self._pending -= 1
                ran += 1
                assert action is not None
                action()
        finally:
            self._running = False
        return ran

    def _drop_cancelled(self) -> None:
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
