"""The claimed-samples check: a contribution's claimed work must be consistent and plausible.

The fourth stage of the coordinator's verification pipeline (docs/SECURITY.md). Aggregation
weights each DiLoCo pseudo-gradient by the samples its volunteer processed (Douillard et al.
2023, arXiv:2311.08105), so inflating the claim is a cheap way to gain weight, a "weight
inflation" attack on sample-weighted averaging. Every inner step trains one batch of
``batch_size`` sequences of ``context`` tokens, so the claim must be arithmetically consistent;
the step count must fit the work order's budget: at most ``max_steps`` for a step budget, and
for a time budget at most ``slack`` × the peer's own median over its past accepted rounds and
``slack`` × 2 × the median of the round's other contributions (machines differ in speed, so the
round's median is only a loose bound). Whether the claimed steps were really trained is left
to the later recomputation spot-checks (as in BTARD, Gorbunov et al., ICML 2022,
arXiv:2106.11257), which this check makes cheap to aim.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["check_claim"]


def check_claim(
    *,
    samples: int,
    tokens: int,
    steps: int,
    batch_size: int,
    context: int,
    budget: str,
    max_steps: int,
    history_steps: Sequence[int],
    round_steps: Sequence[int],
    slack: float,
) -> str | None:
    """Check one contribution's claimed work; None when it passes, else a one-sentence reason.

    ``samples``, ``tokens`` and ``steps`` are the volunteer's claims; ``batch_size`` and
    ``context`` come from the run config; ``budget`` ("steps" or "seconds") and ``max_steps``
    from the work order; ``history_steps`` are the peer's steps in its past accepted rounds and
    ``round_steps`` those of the other contributions of this round; ``slack`` is
    ``DefenceConfig.claims_slack``. In order, the claim is flagged when:

    - steps < 1 or samples < 1;
    - samples ≠ steps × batch_size, or tokens ≠ samples × context;
    - budget "steps": steps > max_steps;
    - budget "seconds": steps > slack × median(history_steps), when the peer has at least 2
      past accepted rounds, or steps > slack × 2 × median(round_steps), when the round has at
      least 2 other contributions (both limits apply when both are available).

    Raises ValueError when the run's own values are unusable (batch_size or context below 1,
    slack not a finite number ≥ 1, an unknown budget, or max_steps below 1 for a step budget).
    """
    _check_settings(batch_size, context, budget, max_steps, slack)
    if steps < 1:
        return f"the contribution claims {steps} training steps; at least 1 is required"
    if samples < 1:
        return f"the contribution claims {samples} samples; at least 1 is required"
    if samples != steps * batch_size:
        return (
            f"the contribution claims {samples} samples, but its {steps} steps of batch size "
            f"{batch_size} make {steps * batch_size}"
        )
    if tokens != samples * context:
        return (
            f"the contribution claims {tokens} tokens, but its {samples} samples of "
            f"{context} tokens make {samples * context}"
        )
    if budget == "steps":
        if steps > max_steps:
            return (
                f"the contribution claims {steps} steps, more than the work order's budget "
                f"of {max_steps} steps"
            )
        return None
    if len(history_steps) >= 2:
        median = statistics.median(history_steps)
        limit = slack * median
        if steps > limit:
            return (
                f"the contribution claims {steps} steps, more than {slack:.4g}× the peer's "
                f"median of {median:.4g} steps over its {len(history_steps)} past accepted "
                f"rounds (limit {limit:.4g})"
            )
    if len(round_steps) >= 2:
        median = statistics.median(round_steps)
        limit = slack * 2.0 * median
        if steps > limit:
            return (
                f"the contribution claims {steps} steps, more than {2.0 * slack:.4g}× the "
                f"median of {median:.4g} steps of this round's {len(round_steps)} other "
                f"contributions (limit {limit:.4g})"
            )
    return None


def _check_settings(
    batch_size: int, context: int, budget: str, max_steps: int, slack: float
) -> None:
    if batch_size < 1 or context < 1:
        raise ValueError(
            f"batch_size ({batch_size}) and context ({context}) must both be at least 1"
        )
    if not (math.isfinite(slack) and slack >= 1.0):
        raise ValueError(f"the claims slack is {slack}; it must be a finite number of at least 1")
    if budget not in ("steps", "seconds"):
        raise ValueError(f"unknown work budget {budget!r}; it must be 'steps' or 'seconds'")
    if budget == "steps" and max_steps < 1:
        raise ValueError(f"a step budget of {max_steps} steps is unusable; it must be at least 1")
