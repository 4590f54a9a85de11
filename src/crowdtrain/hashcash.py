"""Hashcash proof of work (Back 2002, "Hashcash - A Denial of Service Counter-Measure").

A challenge string and a bit count `bits` are given; a solution is a decimal nonce such that
sha256(challenge ":" nonce) starts with `bits` zero bits. Finding one takes 2^bits hashes on
average, checking it takes one. The coordinator uses it to put a price on each new identity of
an open run (``server.admission``); the volunteer client solves it (``solve``).
"""

from __future__ import annotations

import hashlib
import threading

MAX_BITS = 32  # 2^32 hashes: hours of one core; more would be a denial of service on honest peers


def _digest_prefix(challenge: str) -> hashlib._Hash:
    h = hashlib.sha256()
    h.update(challenge.encode("utf-8"))
    h.update(b":")
    return h


def leading_zero_bits(digest: bytes) -> int:
    """How many zero bits `digest` starts with."""
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def check(challenge: str, nonce: str, bits: int) -> bool:
    """Whether `nonce` solves `challenge` at `bits` (a nonce is 1 to 20 decimal digits)."""
    if not (1 <= len(nonce) <= 20 and nonce.isascii() and nonce.isdigit()):
        return False
    h = _digest_prefix(challenge)
    h.update(nonce.encode("ascii"))
    return leading_zero_bits(h.digest()) >= bits


class Stopped(Exception):
    """The search was stopped before it found a solution."""


def solve(challenge: str, bits: int, stop: threading.Event | None = None) -> str:
    """The first nonce 0, 1, 2, ... that solves `challenge` at `bits`; `Stopped` when STOP is
    set during the search (checked every 65,536 hashes)."""
    if not 0 <= bits <= MAX_BITS:
        raise ValueError(f"a proof of work of {bits} bits is outside 0..{MAX_BITS}")
    prefix = _digest_prefix(challenge)
    shift = 256 - bits
    n = 0
    while True:
        if stop is not None and n & 0xFFFF == 0 and stop.is_set():
            raise Stopped("stopped while solving the proof of work")
        h = prefix.copy()
        h.update(str(n).encode("ascii"))
        if int.from_bytes(h.digest(), "big") >> shift == 0:
            return str(n)
        n += 1
