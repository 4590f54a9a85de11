"""The DiLoCo inner loop: budgets, bit-reproducible pseudo-gradients, optimizer state, eval."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from crowdtrain.config import InnerConfig, ModelConfig
from crowdtrain.models import initial_state
from crowdtrain.train import Contribution, LocalTrainer, evaluate

CFG = ModelConfig(arch="gpt", width=32, depth=2, heads=4, context=16, mlp_ratio=2)
INNER = InnerConfig(lr=3e-3, warmup_steps=2, total_steps=100, steps=5)
Batch = tuple[torch.Tensor, torch.Tensor]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: faster for tiny models, and results are per thread count anyway."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_batches(n: int, seed: int = 0, batch: int = 4) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (n, batch, CFG.context + 1), generator=gen)
    return [(d[:, :-1], d[:, 1:]) for d in data]


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class FakeClock:
    """Advances by `tick` seconds every time it is read."""

    def __init__(self, tick: float) -> None:
        self.now = 0.0
        self.tick = tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_contribution_fields_and_delta() -> None:
    base = initial_state(CFG)
    trainer = LocalTrainer(CFG, INNER)
    c = trainer.train(base, iter(make_batches(10)))
    assert isinstance(c, Contribution)
    assert (c.steps, c.samples, c.tokens) == (5, 20, 20 * 16)
    assert c.delta.keys() == base.keys()
    end = trainer.current_state()
    for name, d in c.delta.items():
        assert d.dtype == torch.float32 and d.shape == base[name].shape
        assert torch.equal(d, base[name] - end[name])
    assert c.loss_mean > 0 and c.seconds >= 0
    assert any(d.abs().max() > 0 for d in c.delta.values())


def test_budget_by_steps_takes_no_extra_batch() -> None:
    batches = iter(make_batches(10))
    c = LocalTrainer(CFG, INNER).train(initial_state(CFG), batches, max_steps=3)
    assert c.steps == 3
    assert len(list(batches)) == 7


def test_budget_by_seconds_with_a_fake_clock() -> None:
    inner = INNER.model_copy(update={"budget": "seconds", "seconds": 10.0})
    trainer = LocalTrainer(CFG, inner)
    c = trainer.train(initial_state(CFG), iter(make_batches(20)), clock=FakeClock(2.0))
    # start=2; after step k the clock reads 2+2k; stops when 2k >= 10
    assert c.steps == 5
    assert c.seconds == pytest.approx(12.0)


def test_the_first_limit_to_hit_wins_and_one_step_is_guaranteed() -> None:
    base = initial_state(CFG)
    trainer = LocalTrainer(CFG, INNER)
    by_steps = trainer.train(
        base, iter(make_batches(20)), max_steps=2, max_seconds=100.0, clock=FakeClock(1.0)
    )
    assert by_steps.steps == 2
    by_time = trainer.train(
        base, iter(make_batches(20)), max_steps=10, max_seconds=3.0, clock=FakeClock(1.0)
    )
    assert by_time.steps == 3
    slow = trainer.train(base, iter(make_batches(20)), max_seconds=1.0, clock=FakeClock(50.0))
    assert slow.steps == 1


def test_running_out_of_batches_ends_the_round_and_none_is_an_error() -> None:
    trainer = LocalTrainer(CFG, INNER)
    assert trainer.train(initial_state(CFG), iter(make_batches(2)), max_steps=9).steps == 2
    with pytest.raises(ValueError, match="no batches"):
        trainer.train(initial_state(CFG), iter([]))


def test_bad_budgets_are_errors() -> None:
    trainer = LocalTrainer(CFG, INNER)
    with pytest.raises(ValueError, match="max_steps"):
        trainer.train(initial_state(CFG), iter(make_batches(1)), max_steps=0)
    with pytest.raises(ValueError, match="max_seconds"):
        trainer.train(initial_state(CFG), iter(make_batches(1)), max_seconds=0.0)


def test_delta_is_bit_reproducible_and_depends_on_the_data() -> None:
    base = initial_state(CFG)
    batches = make_batches(5)
    a = LocalTrainer(CFG, INNER).train(base, iter(batches))
    b = LocalTrainer(CFG, INNER).train(base, iter(batches))
    assert equal(a.delta, b.delta)
    assert (a.loss_first, a.loss_last, a.loss_mean) == (b.loss_first, b.loss_last, b.loss_mean)
    other = [*batches[:-1], make_batches(1, seed=7)[0]]
    c = LocalTrainer(CFG, INNER).train(base, iter(other))
    assert not equal(a.delta, c.delta)


def test_step_offset_selects_the_learning_rate() -> None:
    base = initial_state(CFG)
    batches = make_batches(3)
    seen: list[int] = []
    a = LocalTrainer(CFG, INNER).train(
        base, iter(batches), step_offset=40, on_step=lambda s, _: seen.append(s)
    )
    b = LocalTrainer(CFG, INNER).train(base, iter(batches))
    assert seen == [40, 41, 42, 43, 44][: a.steps]
    assert not equal(a.delta, b.delta)


def test_loss_falls_on_a_repetitive_batch() -> None:
    pattern = torch.tensor(list(b"abcdefgh" * 3), dtype=torch.long)
    x = pattern[:16].repeat(4, 1)
    y = pattern[1:17].repeat(4, 1)
    inner = InnerConfig(lr=1e-2, warmup_steps=3, total_steps=30, steps=30)

    def repeat() -> Iterator[Batch]:
        while True:
            yield x, y

    base = initial_state(CFG)
    trainer = LocalTrainer(CFG, inner)
    c = trainer.train(base, repeat())
    assert c.steps == 30
    assert c.loss_last < 0.3 * c.loss_first
    assert evaluate(CFG, trainer.current_state(), [(x, y)]) < c.loss_last < c.loss_mean


@pytest.mark.parametrize("keep", [False, True])
def test_keep_optimizer_state(keep: bool) -> None:
    inner = INNER.model_copy(update={"optimizer_state": "kept" if keep else "fresh"})
    base = initial_state(CFG)
    batches = make_batches(5)
    trainer = LocalTrainer(CFG, inner)
    first = trainer.train(base, iter(batches))
    second = trainer.train(base, iter(batches))
    # Fresh AdamW each round -> the round replays exactly; kept moments -> it does not.
    assert equal(first.delta, second.delta) is (not keep)
    fresh = LocalTrainer(CFG, inner).train(base, iter(batches))
    assert equal(first.delta, fresh.delta)


def test_weight_decay_applies_to_matrices_only() -> None:
    # One step from the same base: the gradients agree, so only decayed tensors can differ.
    base = initial_state(CFG)
    batches = make_batches(2)
    no_wd = LocalTrainer(CFG, INNER.model_copy(update={"weight_decay": 0.0}))
    wd = LocalTrainer(CFG, INNER.model_copy(update={"weight_decay": 5.0}))
    a = no_wd.train(base, iter(batches), max_steps=1)
    b = wd.train(base, iter(batches), max_steps=1)
    for name in base:
        same = torch.equal(a.delta[name], b.delta[name])
        assert same is (base[name].dim() < 2), name


def test_base_with_wrong_shapes_is_rejected() -> None:
    base = initial_state(CFG)
    base["head.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"'head\.weight' has shape"):
        LocalTrainer(CFG, INNER).train(base, iter(make_batches(1)))


def test_evaluate_is_deterministic_and_token_weighted() -> None:
    state = initial_state(CFG)
    batches = make_batches(3)
    first = evaluate(CFG, state, batches)
    assert first == evaluate(CFG, state, batches)
    singles = [evaluate(CFG, state, [b]) for b in batches]
    assert first == pytest.approx(sum(singles) / 3)
    trained = LocalTrainer(CFG, INNER)
    trained.train(state, iter(make_batches(5)))
    assert evaluate(CFG, trained.current_state(), batches) != first
    with pytest.raises(ValueError, match="at least one batch"):
        evaluate(CFG, state, [])


def test_mlp_trains_too() -> None:
    cfg = CFG.model_copy(update={"arch": "mlp"})
    base = initial_state(cfg)
    a = LocalTrainer(cfg, INNER).train(base, iter(make_batches(3)))
    b = LocalTrainer(cfg, INNER).train(base, iter(make_batches(3)))
    assert a.steps == 3 and equal(a.delta, b.delta)


def test_a_diverged_round_is_an_error_not_a_contribution() -> None:
    base = initial_state(CFG)
    base["head.weight"] = torch.full_like(base["head.weight"], float("nan"))
    with pytest.raises(FloatingPointError, match="training diverged"):
        LocalTrainer(CFG, INNER).train(base, iter(make_batches(2)))


def test_muon_inner_steps_learn_replay_exactly_and_differ_from_adamw() -> None:
    """MuLoCo's inner optimizer (Muon on hidden matrices, AdamW elsewhere): replayable with
    fresh state, learning on a repetitive batch, and not AdamW under another name."""
    muon = InnerConfig(
        lr=1e-2, warmup_steps=3, total_steps=30, steps=30, optimizer="muon",
        optimizer_state="fresh",
    )  # fmt: skip
    pattern = torch.tensor(list(b"abcdefgh" * 3), dtype=torch.long)
    batches = [(pattern[:16].repeat(4, 1), pattern[1:17].repeat(4, 1))] * 30
    base = initial_state(CFG)
    a = LocalTrainer(CFG, muon).train(base, iter(batches))
    b = LocalTrainer(CFG, muon).train(base, iter(batches))
    assert equal(a.delta, b.delta) and a.loss_last < 0.3 * a.loss_first
    adamw = muon.model_copy(update={"optimizer": "adamw"})
    c = LocalTrainer(CFG, adamw).train(base, iter(batches))
    assert not torch.equal(a.delta["blocks.0.mlp.fc.weight"], c.delta["blocks.0.mlp.fc.weight"])
    # Embeddings and the head are AdamW's in both: the first step moves them alike.
    one_a = LocalTrainer(CFG, muon).train(base, iter(batches), max_steps=1)
    one_c = LocalTrainer(CFG, adamw).train(base, iter(batches), max_steps=1)
    assert torch.equal(one_a.delta["head.weight"], one_c.delta["head.weight"])
    assert not torch.equal(
        one_a.delta["blocks.0.attn.qkv.weight"], one_c.delta["blocks.0.attn.qkv.weight"]
    )
    kept = LocalTrainer(CFG, muon.model_copy(update={"optimizer_state": "kept"}))
    kept.train(base, iter(batches), max_steps=2)
    assert not equal(kept.train(base, iter(batches), max_steps=2).delta, one_a.delta)


def test_muon_has_no_published_moments() -> None:
    from crowdtrain.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="muon"):
        parse_config({"inner": {"optimizer": "muon"}})
    assert parse_config({"inner": {"optimizer": "muon", "optimizer_state": "fresh"}})
