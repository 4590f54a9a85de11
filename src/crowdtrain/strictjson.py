"""Strict JSON for bytes that crossed a trust boundary: no duplicate keys, no NaN/Infinity.

Python's `json` accepts `{"a": 1, "a": 2}` (last wins) and the non-standard constants NaN and
Infinity. Two parsers that disagree on such input can be made to see different documents, so
every manifest and header that crowdtrain reads from another party goes through `loads`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any


class StrictJsonError(ValueError):
    """The text is not strict JSON; the message names what is wrong."""


def _no_duplicate_keys(pairs: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise StrictJsonError(f"the key {key[:64]!r} appears twice")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise StrictJsonError(f"{name} is not allowed in JSON")


def loads(text: str | bytes, *, parse_int: Callable[[str], Any] | None = None) -> Any:
    """Parse strict JSON; raise StrictJsonError (a ValueError) for anything else."""
    try:
        return json.loads(
            text,
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_no_constants,
            parse_int=parse_int,
        )
    except StrictJsonError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise StrictJsonError(f"not valid JSON ({exc})") from None


def finite_or_none(value: Any) -> float | None:
    """`value` as a float when it is a finite number, else None (JSON has no NaN)."""
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None
