"""Recomputation spot-checks: compare a submitted update with an independent replay of it.

Training steps are deterministic given (base weights, data seed, config), so another party can
replay a peer's work order from the same base and seed and obtain Δ'. This module is the
comparison half of that check and the rule for how often to run it, after BOINC's adaptive
replication (Anderson 2004, "BOINC: A System for Public-Resource Computing and Storage"; Kondo,
Araujo, Malecot et al. 2007, "Characterizing Result Errors in Internet Desktop Grids"): a
newcomer is checked often, and every consecutive passed check halves the rate, down to a floor.

``compare`` reads both updates fragment by fragment (``plan_fragments``/``read_fragment``), so
its memory is one fragment per source whatever the model's size. It accumulates the four
needed sums in float64, which cannot overflow for values the codec accepts (|x| ≤ 2^100).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from crowdtrain.robust.fragments import plan_fragments, read_fragment
from crowdtrain.robust.sources import DeltaSource

__all__ = ["Comparison", "check_probability", "compare", "mismatch"]


@dataclass(frozen=True)
class Comparison:
    """How a submitted update Δ relates to the replay Δ' of the same work.

    ``rel_error`` = ‖Δ − Δ'‖ / ‖Δ'‖, ``cosine`` = ⟨Δ, Δ'⟩ / (‖Δ‖ ‖Δ'‖) and
    ``norm_ratio`` = ‖Δ‖ / ‖Δ'‖. Zero norms: both zero gives (0, 1, 1); a zero replay with a
    nonzero submission gives (inf, 0, inf); a zero submission with a nonzero replay gives
    (1, 0, 0), which is what the formulas give without the cosine's division by zero.
    """

    rel_error: float
    cosine: float
    norm_ratio: float


def compare(
    submitted: DeltaSource,
    replay: DeltaSource,
    shapes: Mapping[str, tuple[int, ...]],
    fragment_numel: int = 1 << 20,
) -> Comparison:
    """Compare the submitted update with its replay over every parameter of ``shapes``.

    Raises ValueError (one sentence) when either source lacks a parameter of ``shapes``, has
    the wrong size, or holds a non-finite value.
    """
    sub_sq = rep_sq = dot = diff_sq = 0.0
    for fragment in plan_fragments(shapes, fragment_numel):
        s = read_fragment(submitted, fragment, "the submitted update").to(torch.float64)
        r = read_fragment(replay, fragment, "the replayed update").to(torch.float64)
        sub_sq += float(torch.dot(s, s))
        rep_sq += float(torch.dot(r, r))
        dot += float(torch.dot(s, r))
        diff_sq += float(torch.dot(s - r, s - r))
    return _comparison(sub_sq, rep_sq, dot, diff_sq)


def _comparison(sub_sq: float, rep_sq: float, dot: float, diff_sq: float) -> Comparison:
    """The comparison from ‖Δ‖², ‖Δ'‖², ⟨Δ, Δ'⟩ and ‖Δ − Δ'‖² (float64 sums)."""
    sub_norm, rep_norm, diff_norm = math.sqrt(sub_sq), math.sqrt(rep_sq), math.sqrt(diff_sq)
    if rep_norm == 0.0:
        if sub_norm == 0.0:
            return Comparison(rel_error=0.0, cosine=1.0, norm_ratio=1.0)
        return Comparison(rel_error=math.inf, cosine=0.0, norm_ratio=math.inf)
    if sub_norm == 0.0:
        return Comparison(rel_error=diff_norm / rep_norm, cosine=0.0, norm_ratio=0.0)
    # sqrt of the product (not a product of roots): exactly 1 for identical updates
    cosine = max(-1.0, min(1.0, dot / math.sqrt(sub_sq * rep_sq)))
    return Comparison(rel_error=diff_norm / rep_norm, cosine=cosine, norm_ratio=sub_norm / rep_norm)


def mismatch(c: Comparison, *, tolerance: float) -> str | None:
    """``None`` when the submission matches its replay within ``tolerance``, else why not.

    ``tolerance`` is the largest relative error accepted (0.05 = 5%); lossy wire codecs and
    floating-point differences between machines need some. A non-finite comparison (a zero
    replay against a nonzero submission, or values too large to measure) is a mismatch.
    """
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a finite number > 0, got {tolerance}")
    limit = f"tolerance {tolerance * 100:g}%"
    if not all(math.isfinite(v) for v in (c.rel_error, c.cosine, c.norm_ratio)):
        if c.rel_error == math.inf and c.norm_ratio == math.inf:
            return "the submitted update cannot be matched: the replay is zero but it is not"
        return (
            "the submitted update cannot be matched: its comparison with the replay is not"
            f" finite (relative error {c.rel_error}, {limit})"
        )
    if c.rel_error > tolerance:
        return f"the replay differs from the submitted update by {c.rel_error:.1%} ({limit})"
    return None


def check_probability(passed_checks: int, *, p_new: float, p_min: float) -> float:
    """The chance of spot-checking a peer's next contribution (BOINC's adaptive replication).

    A newcomer (``passed_checks = 0``) is checked with probability ``p_new``; each consecutive
    passed check halves it, and it never drops below ``p_min``. A failed check should reset
    ``passed_checks`` to 0.
    """
    if isinstance(passed_checks, bool) or passed_checks < 0:
        raise ValueError(f"passed_checks must be a non-negative integer, got {passed_checks}")
    for label, p in (("p_new", p_new), ("p_min", p_min)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{label} must be a probability between 0 and 1, got {p}")
    return max(p_min, math.ldexp(p_new, -min(passed_checks, 2000)))
