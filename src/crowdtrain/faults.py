"""Test-only fault injection: kill this process at a named point (the chaos suite, tests/chaos).

TEST-ONLY. ``CROWDTRAIN_CRASH_AT=<point>[:<n>]`` in a coordinator's environment makes the
``n``-th call (default the first) of ``crash_point("<point>")`` send SIGKILL to the process
itself, with no clean-up of any kind, as a power cut or the OOM killer would. The variable is
read once, when this module is first imported; unset (always, outside the chaos tests),
``crash_point`` returns at once and costs one comparison. docs/RELIABILITY.md ("Chaos suite")
lists the points and the tests that kill the coordinator at each of them.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

ENV = "CROWDTRAIN_CRASH_AT"


def _parse(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    name, _, nth = value.partition(":")
    return name, int(nth) if nth else 1


_TARGET = _parse(os.environ.get(ENV))
_hits = 0
_lock = threading.Lock()


def crash_point(name: str) -> None:
    """TEST-ONLY: SIGKILL this process if NAME is the armed point and this is its n-th hit.

    Does nothing unless ``CROWDTRAIN_CRASH_AT`` was set when the process started."""
    if _TARGET is None or name != _TARGET[0]:
        return
    global _hits
    with _lock:
        _hits += 1
        if _hits < _TARGET[1]:
            return
        sys.stderr.write(f"crowdtrain: CROWDTRAIN_CRASH_AT={name}:{_hits}: killing myself\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
