"""The claimed-samples check: consistent arithmetic, and steps within the work order's budget."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crowdtrain.config import DefenceConfig
from crowdtrain.robust.claims import check_claim

BATCH, CONTEXT = 16, 128
SLACK = DefenceConfig().claims_slack


def claim(steps: int, **overrides: Any) -> str | None:
    """check_claim for an honest claim of ``steps`` steps, with some arguments overridden."""
    args: dict[str, Any] = {
        "samples": steps * BATCH,
        "tokens": steps * BATCH * CONTEXT,
        "steps": steps,
        "batch_size": BATCH,
        "context": CONTEXT,
        "budget": "steps",
        "max_steps": 50,
        "history_steps": [],
        "round_steps": [],
        "slack": SLACK,
    }
    args.update(overrides)
    return check_claim(**args)


def test_honest_step_budget_claim_passes() -> None:
    assert claim(50) is None
    assert claim(1) is None


def test_more_steps_than_the_step_budget_is_flagged() -> None:
    assert claim(51) == (
        "the contribution claims 51 steps, more than the work order's budget of 50 steps"
    )


def test_step_budget_ignores_history() -> None:
    assert claim(50, history_steps=[1, 1, 1], round_steps=[1, 1, 1]) is None


@pytest.mark.parametrize("steps", [0, -3])
def test_no_steps_is_flagged(steps: int) -> None:
    reason = claim(steps, samples=16, tokens=16 * CONTEXT)
    assert reason == f"the contribution claims {steps} training steps; at least 1 is required"


@pytest.mark.parametrize("samples", [0, -16])
def test_no_samples_is_flagged(samples: int) -> None:
    reason = claim(1, samples=samples)
    assert reason == f"the contribution claims {samples} samples; at least 1 is required"


def test_inflated_samples_are_flagged_naming_both_numbers() -> None:
    reason = claim(10, samples=10_000, tokens=10_000 * CONTEXT)
    assert reason == (
        "the contribution claims 10000 samples, but its 10 steps of batch size 16 make 160"
    )


def test_deflated_samples_are_flagged() -> None:
    assert "claims 159 samples" in str(claim(10, samples=159, tokens=159 * CONTEXT))


def test_inconsistent_tokens_are_flagged_naming_both_numbers() -> None:
    assert claim(10, tokens=12345) == (
        "the contribution claims 12345 tokens, but its 160 samples of 128 tokens make 20480"
    )


def seconds(steps: int, history: list[int], others: list[int]) -> str | None:
    return claim(steps, budget="seconds", max_steps=0, history_steps=history, round_steps=others)


def test_seconds_budget_without_history_or_round_passes_any_step_count() -> None:
    assert seconds(10**6, [], []) is None
    assert seconds(10**6, [5], [5]) is None  # one of each is too few to judge


def test_seconds_budget_against_the_peers_own_history() -> None:
    assert seconds(200, [90, 100, 110], []) is None  # limit 2 × 100 = 200
    assert seconds(201, [90, 100, 110], []) == (
        "the contribution claims 201 steps, more than 2× the peer's median of 100 steps over "
        "its 3 past accepted rounds (limit 200)"
    )


def test_seconds_budget_against_the_round() -> None:
    assert seconds(400, [], [50, 100, 150]) is None  # limit 2 × 2 × 100 = 400
    assert seconds(401, [], [50, 100, 150]) == (
        "the contribution claims 401 steps, more than 4× the median of 100 steps of this "
        "round's 3 other contributions (limit 400)"
    )


def test_seconds_budget_applies_both_limits() -> None:
    # A slow peer claiming a fast peer's work: fine for the round, not for its own history.
    reason = seconds(300, [100, 100], [200, 200])
    assert reason is not None and "peer's median" in reason
    # A peer with an inflated history still meets the round's limit.
    reason = seconds(1000, [1000, 1000], [100, 100])
    assert reason is not None and "this round's 2 other" in reason
    assert seconds(200, [100, 100], [100, 100]) is None


def test_even_history_uses_the_mean_of_the_middle_two() -> None:
    assert seconds(300, [100, 200], []) is None  # median 150, limit 300
    assert seconds(301, [100, 200], []) is not None


def test_slack_scales_the_limits() -> None:
    assert claim(150, budget="seconds", history_steps=[100, 100], slack=1.5) is None
    assert claim(151, budget="seconds", history_steps=[100, 100], slack=1.5) is not None


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"context": 0}, "context"),
        ({"slack": 0.5}, "slack"),
        ({"slack": math.nan}, "slack"),
        ({"budget": "tokens"}, "unknown work budget"),
        ({"max_steps": 0}, "step budget"),
    ],
)
def test_unusable_settings_are_rejected(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        claim(1, **overrides)


@given(
    steps=st.integers(1, 10_000),
    batch=st.integers(1, 512),
    context=st.integers(1, 4096),
    slack=st.floats(1.0, 8.0),
    budget=st.sampled_from(["steps", "seconds"]),
    extra_steps=st.integers(0, 1000),
    history_factors=st.lists(st.floats(1.0, 4.0), max_size=8),
    round_factors=st.lists(st.floats(1.0, 4.0), max_size=8),
)
def test_an_honest_claim_is_never_flagged(
    steps: int,
    batch: int,
    context: int,
    slack: float,
    budget: str,
    extra_steps: int,
    history_factors: list[float],
    round_factors: list[float],
) -> None:
    # Honest: samples = steps × batch, tokens = samples × context, and within budget. For a
    # time budget, every past round and every other peer of the round did at least
    # steps / slack (resp. steps / (2 × slack)) steps, so the medians cannot be lower.
    history = [math.ceil(steps * f / slack) for f in history_factors]
    others = [math.ceil(steps * f / (2 * slack)) for f in round_factors]
    reason = check_claim(
        samples=steps * batch,
        tokens=steps * batch * context,
        steps=steps,
        batch_size=batch,
        context=context,
        budget=budget,
        max_steps=steps + extra_steps,
        history_steps=history,
        round_steps=others,
        slack=slack,
    )
    assert reason is None
