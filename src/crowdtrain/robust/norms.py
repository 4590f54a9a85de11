"""Norm screening: flag pseudo-gradients whose size is far from the round's typical size.

The second stage of the coordinator's verification pipeline (docs/SECURITY.md), after the
format checks. A scaled-up update is the cheapest attack on averaging, and an update that is
(nearly) zero is the cheapest free-ride, so before aggregation every contribution's global norm
‖Δ_i‖ is compared with the median norm of the round: norm bounding as a defence follows Sun et
al., "Can You Really Backdoor Federated Learning?" (2019, arXiv:1911.07963), here made relative
to the round's median so that it needs no absolute threshold for a model and learning rate. The
norms themselves come from ``crowdtrain.robust.aggregate.global_norms`` (read fragment by
fragment, so this stage never holds a whole contribution).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["screen_norms"]


def screen_norms(
    norms: Sequence[float],
    *,
    low: float,
    high: float,
    reference: Sequence[bool] | None = None,
    reference_name: str = "established peers' updates",
) -> list[str | None]:
    """Screen each contribution's global norm against a median norm of its round.

    Contribution i is flagged when ‖Δ_i‖ > ``high`` × median or ‖Δ_i‖ < ``low`` × median. The
    median is taken over the norms marked in `reference` (the contributions of established
    peers, which fresh identities cannot outvote; `reference_name` names them in the reasons)
    when at least two are marked, else over all
    the given norms (the mean of the two middle ones for an even count; a non-finite norm
    counts as larger than every finite one). A norm that is zero, negative or not finite is
    always flagged. With a single norm to take the median of there is nothing to compare with,
    so only those invalid norms are flagged; likewise when the median itself is zero or not
    finite (at least half of it is invalid), only the invalid norms are.

    Returns, in the order given, ``None`` for a norm that passes or a one-sentence reason. The
    reasons name the configured limits but not the median or the norm's ratio to it, which
    would let a sender learn where the bar is (they are public: docs/SECURITY.md).
    ``DefenceConfig.norm_low`` and ``norm_high`` are the usual ``low`` and ``high``.
    Raises ValueError when the limits are not 0 ≤ low < 1 < high, both finite, or when
    `reference` does not mark every norm.
    """
    if not (math.isfinite(low) and math.isfinite(high) and 0.0 <= low < 1.0 < high):
        raise ValueError(
            f"norm screening limits low={low} and high={high} are unusable; "
            "they must satisfy 0 <= low < 1 < high"
        )
    values = [float(n) for n in norms]
    if reference is not None and len(reference) != len(values):
        raise ValueError(f"{len(reference)} reference marks for {len(values)} norms")
    reasons: list[str | None] = [_invalid(n) for n in values]
    marked = [n for n, m in zip(values, reference or [], strict=False) if m]
    basis = marked if len(marked) >= 2 else values
    whose = reference_name if basis is marked else "updates"
    if len(basis) < 2:
        return reasons
    median = statistics.median(n if math.isfinite(n) else math.inf for n in basis)
    if not (math.isfinite(median) and median > 0.0):
        return reasons
    for index, norm in enumerate(values):
        if reasons[index] is not None:
            continue
        ratio = norm / median
        if ratio > high:
            reasons[index] = (
                f"the update's norm is more than {high:g}× the median norm of the round's {whose}"
            )
        elif ratio < low:
            reasons[index] = (
                f"the update's norm is less than {low:g}× the median norm of the round's {whose}"
            )
    return reasons


def _invalid(norm: float) -> str | None:
    """The reason a norm is unusable on its own (zero, negative or not finite), else None."""
    if math.isnan(norm) or math.isinf(norm):
        return f"the update's norm is not a finite number ({norm}); it holds NaN or infinity"
    if norm == 0.0:
        return "the update's norm is zero, so it would change nothing (a free ride)"
    if norm < 0.0:
        return f"the update's norm {norm:.4g} is negative, which no real norm can be"
    return None
