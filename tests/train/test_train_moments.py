"""Published AdamW moments: factoring, checking, starting an optimizer from them, deriving them."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from crowdtrain.config import InnerConfig, ModelConfig
from crowdtrain.models import build_model, initial_state, lm_loss
from crowdtrain.train import LocalTrainer
from crowdtrain.train.moments import (
    COL,
    EPS,
    EXP_AVG,
    EXP_AVG_SQ,
    MEAN_STEP,
    ROW,
    WORKERS,
    derive_first,
    drift,
    expand,
    factor,
    mean_gradient_moment,
    mean_moments,
    publish,
    publish_derived,
    second_moment,
    second_only,
    split_base,
    validate,
)
from crowdtrain.train.schedule import lr_at

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


# --- derived moments: the volunteer estimates v from its first batch ---------------------------

DERIVED = INNER.model_copy(update={"optimizer_state": "derived", "moment_batches": 4})


def derived_base(workers: int = 4) -> dict[str, torch.Tensor]:
    before = initial_state(CFG)
    after = {k: t - 0.01 * torch.sign(torch.randn_like(t)) for k, t in before.items()}
    moments = publish_derived(DERIVED, before, after, round_steps=range(0, 4), workers=workers)
    validate(moments, SHAPES)
    return {**after, **moments}


def test_publish_derived_carries_mean_steps_and_the_capped_workers() -> None:
    before = initial_state(CFG)
    after = {k: t - 0.01 for k, t in before.items()}
    steps = range(4, 8)
    out = publish_derived(DERIVED, before, after, round_steps=steps, workers=1000)
    assert float(out[WORKERS]) == round(1 / (1 - DERIVED.beta2))  # capped
    lr_sum = sum(lr_at(s, DERIVED) for s in steps)
    for name in before:
        step = out[MEAN_STEP + name]
        assert step.dtype == torch.bfloat16
        torch.testing.assert_close(
            step.float(), torch.full_like(before[name], 0.01 / lr_sum), rtol=1e-2, atol=0
        )
    # a volunteer holding both θs computes the same bits, and drift is the mean step scaled
    assert all(
        torch.equal(t, derive_first(DERIVED, before, after, second_only(out), round_steps=steps)[k])
        for k, t in out.items()
        if k != WORKERS
    )
    assert set(second_only(out)) == {WORKERS}
    shift = drift(out, DERIVED, SHAPES, steps)
    name = next(iter(before))
    assert float(shift[name].flatten()[0]) > 0
    nan = {k: t + float("nan") for k, t in after.items()}
    assert publish_derived(DERIVED, before, nan, round_steps=steps, workers=2) == {}


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.pop(WORKERS),  # then it reads as published moments, which these are not
        lambda m: m.__setitem__(WORKERS, torch.tensor([0.0])),
        lambda m: m.__setitem__(WORKERS, torch.tensor([2.0, 2.0])),
        lambda m: m.pop(next(k for k in m if k.startswith(MEAN_STEP))),
        lambda m: m.__setitem__(MEAN_STEP + "nope", torch.ones(1)),
        lambda m: m.__setitem__(next(k for k in m if k.startswith(MEAN_STEP)), torch.ones(1)),
        lambda m: m.__setitem__(
            next(k for k in m if k.startswith(MEAN_STEP)),
            torch.full(
                SHAPES[next(k for k in m if k.startswith(MEAN_STEP)).removeprefix(MEAN_STEP)],
                float("inf"),
            ),
        ),
    ],
)
def test_validate_refuses_a_derived_base_that_does_not_fit(change: Any) -> None:
    _, moments = split_base(derived_base())
    moments = dict(moments)
    change(moments)
    with pytest.raises(ValueError):
        validate(moments, SHAPES)


def test_a_round_from_a_derived_base_replays_exactly_and_uses_the_moments() -> None:
    base = derived_base()
    a = LocalTrainer(CFG, DERIVED).train(base, iter(batches(4, 1)), step_offset=4)
    b = LocalTrainer(CFG, DERIVED).train(base, iter(batches(4, 1)), step_offset=4)
    assert set(a.delta) == set(SHAPES)
    assert all(torch.equal(a.delta[k], b.delta[k]) for k in SHAPES)
    theta, _ = split_base(base)
    fresh = LocalTrainer(CFG, INNER).train(dict(theta), iter(batches(4, 1)), step_offset=4)
    assert any(not torch.equal(a.delta[k], fresh.delta[k]) for k in SHAPES)
    # the micro-batches cost no extra step: the same batches, steps and samples
    assert (a.steps, a.samples) == (fresh.steps, fresh.samples) == (4, 16)
    torch.testing.assert_close(a.loss_first, fresh.loss_first, rtol=1e-5, atol=0)


def test_the_derived_first_step_is_adamw_from_the_moments_of_the_first_batch() -> None:
    """One step from a derived base equals AdamW started (by hand) from m = mean step·(√v + ε)
    and the v of the first batch's micro-batches, stepped with the batch's gradient."""
    base = derived_base(workers=2)
    theta, moments = split_base(base)
    ((x, y),) = batches(1, 3)
    inner = DERIVED.model_copy(update={"grad_clip": 1e9})  # unclipped: the sums are plain
    got = LocalTrainer(CFG, inner).train(base, iter([(x, y)]), step_offset=4, max_steps=1)

    model = build_model(CFG, dict(theta))
    named = dict(model.named_parameters())
    total = {k: torch.zeros_like(p) for k, p in named.items()}
    squares = {k: torch.zeros_like(p) for k, p in named.items()}
    for xi, yi in zip(x.chunk(4), y.chunk(4), strict=True):
        model.zero_grad(set_to_none=True)
        lm_loss(model, xi, yi).backward()
        for k, p in named.items():
            total[k] += p.grad
            squares[k] += p.grad**2
    k = 4
    expected_v = {n: mean_gradient_moment(total[n], squares[n], k, k * 2) for n in named}
    model.zero_grad(set_to_none=True)
    lm_loss(model, x, y).backward()
    lr = lr_at(4, inner)
    for n, p in named.items():
        v = expected_v[n]
        m = moments[MEAN_STEP + n].float() * (v.sqrt() + EPS)
        g = p.grad
        m1 = inner.beta1 * m + (1 - inner.beta1) * g
        v1 = inner.beta2 * v + (1 - inner.beta2) * g * g
        t = 5  # AdamW's step count: step_offset 4, then this step
        m_hat, v_hat = m1 / (1 - inner.beta1**t), v1 / (1 - inner.beta2**t)
        decay = inner.weight_decay if p.dim() >= 2 else 0.0
        new = theta[n] * (1 - lr * decay) - lr * m_hat / (v_hat.sqrt() + EPS)
        torch.testing.assert_close(got.delta[n], theta[n] - new, rtol=1e-3, atol=1e-7)
