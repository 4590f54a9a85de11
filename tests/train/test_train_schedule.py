"""The inner learning-rate schedule: linear warmup, cosine decay, constant floor."""

from __future__ import annotations

import itertools
import math

import pytest

from crowdtrain.config import InnerConfig
from crowdtrain.train import lr_at

INNER = InnerConfig(lr=1e-2, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)


def test_warmup_rises_linearly_to_the_peak() -> None:
    lrs = [lr_at(s, INNER) for s in range(10)]
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[9] == pytest.approx(1e-2)
    steps = [b - a for a, b in itertools.pairwise(lrs)]
    assert all(d == pytest.approx(1e-3) for d in steps)


def test_cosine_decays_from_peak_to_floor() -> None:
    assert lr_at(10, INNER) == pytest.approx(1e-2)
    assert lr_at(60, INNER) == pytest.approx(1e-3 + 0.5 * (1e-2 - 1e-3))  # halfway
    lrs = [lr_at(s, INNER) for s in range(10, 111)]
    assert all(b <= a for a, b in itertools.pairwise(lrs))
    expected = 1e-3 + 0.5 * (1 + math.cos(math.pi * 0.25)) * 9e-3
    assert lr_at(35, INNER) == pytest.approx(expected)


def test_floor_after_total_steps() -> None:
    for s in (110, 111, 10_000):
        assert lr_at(s, INNER) == pytest.approx(1e-3)


def test_no_warmup_starts_at_peak() -> None:
    inner = InnerConfig(lr=1e-2, warmup_steps=0, total_steps=100)
    assert lr_at(0, inner) == pytest.approx(1e-2)


def test_warmup_longer_than_total_goes_to_floor_after_warmup() -> None:
    inner = InnerConfig(lr=1e-2, warmup_steps=20, total_steps=10, min_lr_ratio=0.5)
    assert lr_at(15, inner) == pytest.approx(1e-2 * 16 / 20)
    assert lr_at(20, inner) == pytest.approx(5e-3)


def test_negative_step_is_an_error() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        lr_at(-1, INNER)
