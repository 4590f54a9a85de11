"""Published AdamW moments: factoring, checking, starting an optimizer from them, deriving them."""

from __future__ import annotations

import pytest
import torch

from crowdtrain.config import InnerConfig, ModelConfig
from crowdtrain.models import initial_state
from crowdtrain.train import LocalTrainer
from crowdtrain.train.moments import (
    COL,
    EXP_AVG,
    EXP_AVG_SQ,
    ROW,
    expand,
    factor,
    mean_moments,
    publish,
    second_moment,
    split_base,
)

CFG = ModelConfig(arch="gpt", vocab_size=32, context=8, width=16, depth=1, heads=2)
INNER = InnerConfig(lr=3e-3, warmup_steps=2, total_steps=100, steps=4, optimizer_state="fresh")
SHAPES = {k: tuple(t.shape) for k, t in initial_state(CFG).items()}


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 32, (4, 8), generator=g)
        out.append((x, torch.roll(x, -1, dims=1)))
    return out


def test_factor_then_expand_is_exact_for_a_rank_one_second_moment() -> None:
    r, c = torch.rand(5) + 0.1, torch.rand(3) + 0.1
    v = torch.outer(r, c)
    small = factor({EXP_AVG_SQ + "w": v, EXP_AVG_SQ + "b": c, EXP_AVG + "w": -v})
    assert set(small) == {ROW + "w", COL + "w", EXP_AVG_SQ + "b"}  # m left out unless asked
    whole = expand(small, {"w": (5, 3), "b": (3,)})
    torch.testing.assert_close(whole[EXP_AVG_SQ + "w"], v)
    assert EXP_AVG + "w" in factor({EXP_AVG + "w": v}, first=True)


@pytest.mark.parametrize(
    "bad",
    [
        {EXP_AVG_SQ + "nope": torch.ones(3)},  # not a parameter
        {"w": torch.ones(5, 3)},  # not a moment
        {EXP_AVG_SQ + "w": torch.ones(3, 5)},  # wrong shape
        {ROW + "w": torch.ones(5)},  # rows without columns
        {COL + "w": torch.ones(3)},  # columns without rows
        {ROW + "w": torch.ones(5), COL + "w": torch.ones(4)},
        {EXP_AVG_SQ + "b": torch.tensor([1.0, -1.0, 1.0])},  # a negative second moment
        {EXP_AVG + "b": torch.tensor([1.0, float("nan"), 1.0])},
    ],
)
def test_expand_refuses_what_does_not_fit_the_model(bad: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ValueError):
        expand(bad, {"w": (5, 3), "b": (3,)})


def test_split_base_separates_theta_from_moments() -> None:
    theta = initial_state(CFG)
    assert split_base(theta) == (theta, {})
    extra = {EXP_AVG_SQ + next(iter(theta)): torch.ones(1)}
    params, moments = split_base({**theta, **extra})
    assert set(params) == set(theta) and moments == extra


def test_mean_moments_averages_the_keys_every_report_has() -> None:
    out = mean_moments([{"a": torch.ones(2), "b": torch.ones(1)}, {"a": 3 * torch.ones(2)}])
    assert set(out) == {"a"} and torch.equal(out["a"], 2 * torch.ones(2))
    assert mean_moments([]) == {}


def test_a_round_from_published_moments_replays_exactly_and_differs_from_fresh() -> None:
    theta = initial_state(CFG)
    trainer = LocalTrainer(CFG, INNER)
    first = trainer.train(theta, iter(batches(4)), step_offset=4)
    ended = trainer.end_moments()
    assert set(ended) == {p + k for k in theta for p in (EXP_AVG, EXP_AVG_SQ)}
    base = {**theta, **factor(ended, first=True)}
    a = LocalTrainer(CFG, INNER).train(base, iter(batches(4, 1)), step_offset=4)
    b = LocalTrainer(CFG, INNER).train(base, iter(batches(4, 1)), step_offset=4)
    fresh = LocalTrainer(CFG, INNER).train(theta, iter(batches(4, 1)), step_offset=4)
    assert set(a.delta) == set(theta)  # Δ is over θ only, never over the moments
    assert all(torch.equal(a.delta[k], b.delta[k]) for k in theta)
    assert any(not torch.equal(a.delta[k], fresh.delta[k]) for k in theta)
    assert first.steps == a.steps == 4


def test_a_trainer_that_keeps_its_own_moments_refuses_published_ones() -> None:
    theta = initial_state(CFG)
    kept = LocalTrainer(CFG, INNER.model_copy(update={"optimizer_state": "kept"}))
    name = next(iter(theta))
    base = {**theta, EXP_AVG_SQ + name: torch.ones(SHAPES[name])}
    with pytest.raises(ValueError, match="keeps its own"):
        kept.train(base, iter(batches(1)))


def test_second_moment_is_the_mean_squared_clipped_gradient() -> None:
    theta = initial_state(CFG)
    one = second_moment(CFG, INNER, theta, batches(1))
    two = second_moment(CFG, INNER, theta, batches(2))
    assert set(one) == {EXP_AVG_SQ + k for k in theta}
    assert all(bool((t >= 0).all()) for t in two.values())
    total = sum(float(t.sum()) for t in one.values())
    assert 0 < total <= INNER.grad_clip**2 * (1 + 1e-5)  # a clipped gradient's squared norm


def test_second_moment_of_the_workers_mean_gradient() -> None:
    """With W workers the estimate is that of the mean of W batches' gradients: for W equal to
    the number of batches it is the squared mean gradient (the gradient of the pooled batch),
    for one worker the mean squared gradient, and it shrinks as W grows, never below the
    squared mean scaled by k/W."""
    theta = initial_state(CFG)
    unclipped = INNER.model_copy(update={"grad_clip": 1e9})
    four = batches(4)
    pooled = [(torch.cat([x for x, _ in four]), torch.cat([y for _, y in four]))]
    squared_mean = second_moment(CFG, unclipped, theta, pooled)
    mean_square = second_moment(CFG, unclipped, theta, four)
    by = {w: second_moment(CFG, unclipped, theta, four, workers=w) for w in (1, 2, 4, 16)}
    for key, c in squared_mean.items():
        torch.testing.assert_close(by[4][key], c, rtol=1e-4, atol=1e-12)
        assert torch.equal(by[1][key], mean_square[key])
        assert bool((by[2][key] >= by[4][key]).all()) and bool((by[4][key] >= by[16][key]).all())
        assert bool((by[16][key] >= by[4][key] / 4).all())
    assert any(bool((mean_square[k] > 2 * squared_mean[k]).any()) for k in squared_mean)


def test_publish_counts_at_most_one_over_one_minus_beta2_workers() -> None:
    before = initial_state(CFG)
    after = {k: t - 0.01 for k, t in before.items()}
    inner = INNER.model_copy(update={"beta2": 0.9})
    steps = range(4, 8)
    capped = publish(CFG, inner, before, after, batches(4), round_steps=steps, workers=1000)
    ten = publish(CFG, inner, before, after, batches(4), round_steps=steps, workers=10)
    two = publish(CFG, inner, before, after, batches(4), round_steps=steps, workers=2)
    assert all(torch.equal(capped[k], ten[k]) for k in ten)
    assert any(not torch.equal(two[k], ten[k]) for k in ten)


def test_publish_derives_the_first_moment_from_the_outer_update() -> None:
    before = initial_state(CFG)
    after = {k: t - 0.01 for k, t in before.items()}  # U = before - after = +0.01 everywhere
    out = publish(CFG, INNER, before, after, batches(2), round_steps=range(4, 8))
    again = publish(CFG, INNER, before, after, batches(2), round_steps=range(4, 8))
    assert all(torch.equal(out[k], again[k]) for k in out)  # a pure function of its inputs
    whole = expand(out, SHAPES)
    for name in before:
        m = whole[EXP_AVG + name]
        assert m.dtype == torch.bfloat16 and bool((m >= 0).all())
        assert whole[EXP_AVG_SQ + name].shape == before[name].shape
    assert any(ROW + k in out for k in before)  # matrices travel factored
