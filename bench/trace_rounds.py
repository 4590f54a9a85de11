"""Trace a discrete-event scenario's rounds: what the protocol decided for every peer, when.

    .venv/bin/python bench/trace_rounds.py SCENARIO ROUNDS OUT.log

Runs `crowdtrain simulate --scenario SCENARIO --rounds ROUNDS` in this process with the round
protocol's `handle` wrapped, and writes one line per event that decided something: the virtual
time, the event, the peer, the round it names and the decisions (work and verify orders, score
orders, waits with their reasons, acceptances, refusals, closes with their contribution
counts). Heartbeats and ticks are left out unless they close a round. How docs/SIMULATIONS.md
found where consumer-1b's volunteers' compute went ("consumer-1b: every volunteer's compute
lands in a round").
"""

from __future__ import annotations

import sys
from typing import Any

import crowdtrain.protocol.core as core
import crowdtrain.sim.des as des
from crowdtrain.cli import app
from crowdtrain.protocol import RoundClosed, WorkOrder


def main(scenario: str, rounds: str, out: str) -> None:
    log = open(out, "w")  # noqa: SIM115 (closed when the run is over)
    clock: dict[str, Any] = {}
    handle, init = core.RoundProtocol.handle, des._Sim.__init__

    def traced(self: core.RoundProtocol, event: Any) -> Any:
        decisions = handle(self, event)
        kind = type(event).__name__
        if kind in ("PeerSeen", "Tick") and not any(isinstance(d, RoundClosed) for d in decisions):
            return decisions
        parts = []
        for d in decisions:
            if isinstance(d, WorkOrder):
                parts.append(f"WorkOrder(r{d.round}, {d.max_seconds:g} s)")
            elif isinstance(d, RoundClosed):
                parts.append(f"RoundClosed(r{d.round}, {len(d.contributors)} contributions)")
            else:
                parts.append(f"{type(d).__name__}({getattr(d, 'reason', '')})")
        now = clock["loop"].now if "loop" in clock else 0.0
        peer, rnd = getattr(event, "peer_id", ""), getattr(event, "round", "")
        print(f"{now:9.1f} {kind:24s} {peer:8s} {rnd} -> {'; '.join(parts)}", file=log)
        return decisions

    def traced_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        clock["loop"] = self.loop

    core.RoundProtocol.handle = traced  # type: ignore[method-assign]
    des._Sim.__init__ = traced_init  # type: ignore[method-assign]
    sys.argv = ["crowdtrain", "simulate", "--scenario", scenario, "--rounds", rounds]
    try:
        app()
    except SystemExit:
        pass
    finally:
        log.close()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
