"""Registration cost against the number of peers already registered, and the hashcash rate.

    .venv/bin/python bench/registration_cost.py [PEERS] [--pow-bits 16,18,20]

Registers PEERS volunteers (default 10,000) with one coordinator of the demo's run (no rate
limits, no HTTP: the coordinator's own cost), timing each call, and prints the median and p99
milliseconds of the registrations around 100, 1,000 and 10,000 peers (or the marks below
PEERS). Then solves hashcash challenges (`crowdtrain.hashcash`) at each given difficulty and
prints the hashes per second of this machine and the median seconds per solution. JSON on the
last line. Runs at an older commit too (`register(name, invite, device)` there).
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from crowdtrain.demo import demo_config
from crowdtrain.server.coordinator import Coordinator


def _register(coord: Coordinator, name: str) -> None:
    try:
        coord.register(name, {})
    except TypeError:  # before the door: register(name, invite, device)
        coord.register(name, None, {})  # type: ignore[call-arg, arg-type]


def registration(peers: int) -> dict[str, Any]:
    marks = [m for m in (100, 1_000, 10_000) if m <= peers]
    with tempfile.TemporaryDirectory() as tmp:
        kwargs: dict[str, Any] = {}
        try:
            from crowdtrain.server.admission import AdmissionConfig

            kwargs["admission"] = AdmissionConfig(address_burst=0, global_burst=0)
        except ImportError:
            pass
        coord = Coordinator(demo_config(2, 10.0), Path(tmp) / "state", **kwargs)
        times = []
        for n in range(peers):
            t0 = time.perf_counter()
            _register(coord, f"peer-{n}")
            times.append(time.perf_counter() - t0)
        coord.shutdown()
    out = {}
    for m in marks:
        window = sorted(times[max(0, m - 50) : m])
        out[str(m)] = {
            "median_ms": round(1000 * statistics.median(window), 3),
            "p99_ms": round(1000 * window[int(0.99 * (len(window) - 1))], 3),
        }
    return out


def pow_rate(bits_list: list[int], tries: int = 5) -> dict[str, Any]:
    from crowdtrain import hashcash

    out: dict[str, Any] = {}
    for bits in bits_list:
        seconds, hashes = [], 0
        for _ in range(tries):
            challenge = secrets.token_hex(16)
            t0 = time.perf_counter()
            nonce = hashcash.solve(challenge, bits)
            seconds.append(time.perf_counter() - t0)
            hashes += int(nonce) + 1
        out[str(bits)] = {
            "median_s": round(statistics.median(seconds), 3),
            "hashes_per_s": round(hashes / sum(seconds)),
            "expected_s": round(2**bits / (hashes / sum(seconds)), 3),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("peers", type=int, nargs="?", default=10_000)
    parser.add_argument("--pow-bits", default="16,18,20")
    args = parser.parse_args()
    doc: dict[str, Any] = {"registration": registration(args.peers)}
    for mark, row in doc["registration"].items():
        print(f"at {mark:>6} peers: {row['median_ms']:.2f} ms median, {row['p99_ms']:.2f} ms p99")
    try:
        doc["hashcash"] = pow_rate([int(b) for b in args.pow_bits.split(",") if b])
        for bits, row in doc["hashcash"].items():
            print(
                f"hashcash {bits} bits: {row['hashes_per_s']:,} hashes/s, median "
                f"{row['median_s']} s a solution (expected {row['expected_s']} s)"
            )
    except ImportError:  # an older commit without hashcash
        pass
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
