"""Norm screening flags updates far above or below the round's median norm."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crowdtrain.config import DefenceConfig
from crowdtrain.robust.norms import screen_norms

LOW, HIGH = DefenceConfig().norm_low, DefenceConfig().norm_high


def test_honest_round_passes() -> None:
    assert screen_norms([0.8, 0.9, 1.0, 1.1, 1.3], low=LOW, high=HIGH) == [None] * 5


def test_scaled_up_update_is_flagged_with_a_readable_reason() -> None:
    reasons = screen_norms([0.8123, 0.8123, 0.8123, 812.3], low=LOW, high=HIGH)
    assert reasons[:3] == [None, None, None]
    assert reasons[3] == "the update's norm is more than 4× the median norm of the round's updates"
    assert "0.8123" not in reasons[3] and "812" not in reasons[3]  # the bar stays unknown


def test_tiny_update_is_flagged() -> None:
    reasons = screen_norms([1.0, 1.0, 1.0, 0.01], low=LOW, high=HIGH)
    assert reasons[:3] == [None, None, None]
    assert reasons[3] == (
        "the update's norm is less than 0.2× the median norm of the round's updates"
    )


def test_the_median_of_established_peers_is_the_reference_when_there_are_two() -> None:
    """Six fresh identities sending tiny updates cannot make five honest ones look too large:
    the median is taken over the established peers' norms."""
    honest, sybils = [1.0, 1.1, 0.9, 1.2, 1.0], [1e-3] * 6
    norms = honest + sybils
    captured = screen_norms(norms, low=LOW, high=HIGH)
    assert all(r is not None for r in captured[:5])  # the round's median is the sybils'
    marks = [True] * 5 + [False] * 6
    reasons = screen_norms(norms, low=LOW, high=HIGH, reference=marks)
    assert reasons[:5] == [None] * 5
    assert all("established peers' updates" in str(r) for r in reasons[5:])
    one = [True] + [False] * 10  # one established peer is not a median: the round's is used
    assert screen_norms(norms, low=LOW, high=HIGH, reference=one) == captured
    with pytest.raises(ValueError, match="reference marks"):
        screen_norms(norms, low=LOW, high=HIGH, reference=[True])


def test_limits_are_exclusive_at_the_boundary() -> None:
    # Median 1.0: exactly high × median and exactly low × median both pass.
    assert screen_norms([0.2, 1.0, 1.0, 1.0, 4.0], low=0.2, high=4.0) == [None] * 5
    reasons = screen_norms([0.19, 1.0, 1.0, 1.0, 4.01], low=0.2, high=4.0)
    assert reasons[0] is not None and reasons[4] is not None
    assert reasons[1:4] == [None, None, None]


def test_median_is_over_all_norms_including_the_outliers() -> None:
    # Even count: the median is the mean of the two middle norms, (1 + 3) / 2 = 2.
    reasons = screen_norms([1.0, 1.0, 3.0, 9.0], low=0.2, high=4.0)
    assert reasons == [None, None, None, reasons[3]] and reasons[3] is not None  # 9 > 8
    assert screen_norms([1.0, 1.0, 3.0, 7.9], low=0.2, high=4.0) == [None] * 4  # 7.9 < 8


@pytest.mark.parametrize("bad", [0.0, math.nan, math.inf, -math.inf, -1.0])
def test_zero_negative_and_non_finite_norms_are_always_flagged(bad: float) -> None:
    reasons = screen_norms([1.0, 1.0, bad, 1.0], low=LOW, high=HIGH)
    assert reasons[0] is None and reasons[1] is None and reasons[3] is None
    assert reasons[2] is not None
    assert reasons[2].startswith("the update's norm")


def test_a_non_finite_norm_counts_as_large_in_the_median() -> None:
    # Median of [1, 1, 1, inf, nan] is 1, so the finite ones are compared with 1 and pass.
    reasons = screen_norms([1.0, 1.0, 1.0, math.inf, math.nan], low=LOW, high=HIGH)
    assert reasons[:3] == [None, None, None]
    assert "not a finite number" in str(reasons[3])
    assert "not a finite number" in str(reasons[4])


def test_zero_median_only_flags_invalid_norms() -> None:
    reasons = screen_norms([0.0, 0.0, 0.0, 5.0], low=LOW, high=HIGH)
    assert reasons[3] is None
    assert all("zero" in str(r) for r in reasons[:3])


def test_mostly_non_finite_round_only_flags_invalid_norms() -> None:
    reasons = screen_norms([math.nan, math.inf, 1.0], low=LOW, high=HIGH)
    assert reasons[2] is None
    assert reasons[0] is not None and reasons[1] is not None


def test_single_contribution_is_only_flagged_when_invalid() -> None:
    assert screen_norms([1e9], low=LOW, high=HIGH) == [None]
    assert screen_norms([1e-9], low=LOW, high=HIGH) == [None]
    assert screen_norms([0.0], low=LOW, high=HIGH) == [
        "the update's norm is zero, so it would change nothing (a free ride)"
    ]
    assert screen_norms([math.nan], low=LOW, high=HIGH)[0] is not None


def test_empty_round() -> None:
    assert screen_norms([], low=LOW, high=HIGH) == []


def test_two_contributions_are_compared_with_their_mean() -> None:
    reasons = screen_norms([1.0, 100.0], low=LOW, high=HIGH)
    assert reasons[0] is not None and "less than" in reasons[0]
    assert reasons[1] is None


@pytest.mark.parametrize(
    ("low", "high"), [(-0.1, 4.0), (1.0, 4.0), (0.2, 1.0), (0.2, math.inf), (math.nan, 4.0)]
)
def test_bad_limits_are_rejected(low: float, high: float) -> None:
    with pytest.raises(ValueError, match="norm screening limits"):
        screen_norms([1.0], low=low, high=high)


@given(
    st.lists(st.floats(0.6, 2.0), min_size=1, max_size=40),
    st.floats(1e-6, 1e6),
)
def test_norms_within_a_factor_two_of_each_other_pass_at_any_scale(
    norms: list[float], scale: float
) -> None:
    assert screen_norms([n * scale for n in norms], low=LOW, high=HIGH) == [None] * len(norms)


@given(st.lists(st.floats(0.5, 2.0), min_size=3, max_size=40), st.floats(10.0, 1e12))
def test_one_huge_update_among_honest_ones_is_always_caught(
    norms: list[float], factor: float
) -> None:
    reasons = screen_norms([*norms, 2.0 * factor], low=LOW, high=HIGH)
    assert reasons[:-1] == [None] * len(norms)
    assert reasons[-1] is not None
