"""Outer optimizers on torch.optim: DiLoCo's Nesterov step, plain averaging, Adam and SparseLoCo's
plain SGD step; fragment-by-fragment steps; state by parameter name through safetensors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from crowdtrain.config import OuterConfig
from crowdtrain.outer import (
    ErrorFeedbackOuter,
    NesterovOuter,
    OuterOptimizer,
    TorchOuter,
    build_outer,
)

SHAPES = {"a.weight": (5, 7), "a.bias": (7,), "b": (3, 2, 4)}


def rand_tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}


@pytest.mark.parametrize(("lr", "momentum"), [(0.7, 0.9), (0.1, 0.0), (1.3, 0.5)])
def test_nesterov_matches_torch_sgd_bit_for_bit(lr: float, momentum: float) -> None:
    params = rand_tensors(0)
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    sgd = torch.optim.SGD(list(ref.values()), lr=lr, momentum=momentum, nesterov=momentum > 0)
    outer = NesterovOuter(lr=lr, momentum=momentum)
    for step in range(6):
        delta = rand_tensors(100 + step)
        for k, p in ref.items():
            p.grad = delta[k].clone()
        sgd.step()
        outer.step(params, delta)
        for k in params:
            assert torch.equal(params[k], ref[k].detach()), (step, k)


def test_nesterov_first_step_formula() -> None:
    params = {"w": torch.tensor([1.0, 2.0])}
    outer = NesterovOuter(lr=0.5, momentum=0.9)
    outer.step(params, {"w": torch.tensor([1.0, -1.0])})
    # m = Δ; θ − lr·(Δ + μ·m) = θ − 0.5·1.9·Δ
    torch.testing.assert_close(params["w"], torch.tensor([1.0 - 0.95, 2.0 + 0.95]))


def test_state_dict_round_trip_continues_identically() -> None:
    params = rand_tensors(0)
    outer = NesterovOuter()
    outer.step(params, rand_tensors(1))
    outer.step(params, rand_tensors(2))
    state = outer.state_dict()
    assert set(state) == {f"momentum::{k}" for k in SHAPES}
    restored = NesterovOuter()
    restored.load_state_dict(st_load(st_save(state)))  # keys and tensors are safetensors-safe
    twin = {k: v.clone() for k, v in params.items()}
    outer.step(params, rand_tensors(3))
    restored.step(twin, rand_tensors(3))
    assert all(torch.equal(params[k], twin[k]) for k in params)
    # The returned state is a copy, not a view of the live buffers.
    assert not torch.equal(state["momentum::b"], outer.state_dict()["momentum::b"])


def test_step_only_touches_named_tensors_so_it_can_go_fragment_by_fragment() -> None:
    params = rand_tensors(0)
    whole = {k: v.clone() for k, v in params.items()}
    delta = rand_tensors(1)
    by_parts, at_once = NesterovOuter(), NesterovOuter()
    for _ in range(3):
        for k in SHAPES:
            by_parts.step(params, {k: delta[k]})
        at_once.step(whole, delta)
    assert all(torch.equal(params[k], whole[k]) for k in params)


def test_bad_inputs_are_clear_errors() -> None:
    params = rand_tensors(0)
    outer = NesterovOuter()
    with pytest.raises(ValueError, match="'nope', which is not a model parameter"):
        outer.step(params, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"'b' has shape \(2,\)"):
        outer.step(params, {"b": torch.zeros(2)})
    with pytest.raises(ValueError, match="momentum::<parameter>"):
        outer.load_state_dict({"b": torch.zeros(3, 2, 4)})
    with pytest.raises(ValueError, match="no state"):
        ErrorFeedbackOuter().load_state_dict({"momentum::b": torch.zeros(1)})


def test_error_feedback_outer_is_plain_sgd() -> None:
    params = rand_tensors(0)
    start = {k: v.clone() for k, v in params.items()}
    outer = ErrorFeedbackOuter(lr=0.7)
    d1, d2 = rand_tensors(1), rand_tensors(2)
    outer.step(params, d1)
    outer.step(params, d2)
    for k in params:
        expected = start[k] - 0.7 * d1[k] - 0.7 * d2[k]
        torch.testing.assert_close(params[k], expected)
    assert outer.state_dict() == {}
    outer.load_state_dict({})


def test_build_outer_from_config() -> None:
    nesterov = build_outer(OuterConfig(lr=0.5, momentum=0.8))
    assert isinstance(nesterov, NesterovOuter)
    assert (nesterov.lr, nesterov.momentum) == (0.5, 0.8)
    ef = build_outer(OuterConfig(optimizer="error_feedback", lr=0.3))
    assert isinstance(ef, ErrorFeedbackOuter) and ef.lr == 0.3
    assert isinstance(ef, OuterOptimizer) and isinstance(nesterov, OuterOptimizer)
    bad = OuterConfig.model_construct(optimizer="lamb", lr=0.1, momentum=0.0)
    with pytest.raises(ValueError, match="unknown outer optimizer 'lamb'"):
        build_outer(bad)


CONFIGS = {
    "nesterov": OuterConfig(),
    "sgd": OuterConfig(optimizer="sgd", lr=0.9, momentum=0.5),
    "averaging": OuterConfig(optimizer="sgd", lr=1.0, momentum=0.0),
    "adam": OuterConfig(optimizer="adam", lr=0.01, betas=(0.8, 0.95), eps=1e-6),
    "error_feedback": OuterConfig(optimizer="error_feedback", lr=1.0),
}


def test_build_outer_makes_sgd_and_adam() -> None:
    sgd = build_outer(CONFIGS["sgd"])
    assert (sgd.optimizer, sgd.lr, sgd.momentum) == ("sgd", 0.9, 0.5)
    adam = build_outer(CONFIGS["adam"])
    assert (adam.optimizer, adam.lr, adam.betas, adam.eps) == ("adam", 0.01, (0.8, 0.95), 1e-6)
    assert isinstance(adam, TorchOuter) and isinstance(adam, OuterOptimizer)


def test_plain_averaging_is_theta_minus_delta_exactly() -> None:
    params = rand_tensors(0)
    outer = build_outer(CONFIGS["averaging"])
    for step in range(3):
        delta = rand_tensors(10 + step)
        expected = {k: params[k] - delta[k] for k in params}
        outer.step(params, delta)
        assert all(torch.equal(params[k], expected[k]) for k in params)
    assert outer.state_dict() == {}
    with pytest.raises(ValueError, match="no state, got key 'momentum::b'"):
        outer.load_state_dict({"momentum::b": torch.zeros(3, 2, 4)})


def test_adam_matches_torch_adam_stepped_by_hand() -> None:
    params = rand_tensors(0)
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    adam = torch.optim.Adam(list(ref.values()), lr=0.01, betas=(0.8, 0.95), eps=1e-6)
    outer = build_outer(CONFIGS["adam"])
    for step in range(5):
        delta = rand_tensors(100 + step)
        for k, p in ref.items():
            p.grad = delta[k].clone()
        adam.step()
        outer.step(params, delta)
        for k in params:
            assert torch.equal(params[k], ref[k].detach()), (step, k)
    state = outer.state_dict()
    assert set(state) == {
        f"{kind}::{k}" for kind in ("exp_avg", "exp_avg_sq", "step") for k in SHAPES
    }
    assert state["step::b"].item() == 5.0


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_two_fragments_equal_one_step_and_leave_the_rest_alone(kind: str) -> None:
    names = list(SHAPES)
    first, second = names[:1], names[1:]
    whole, parts = rand_tensors(0), rand_tensors(0)
    at_once, by_parts = build_outer(CONFIGS[kind]), build_outer(CONFIGS[kind])
    for step in range(3):
        delta = rand_tensors(20 + step)
        at_once.step(whole, delta)
        before = {k: parts[k].clone() for k in second}
        state_before = {k: v for k, v in by_parts.state_dict().items() if k.endswith("::b")}
        by_parts.step(parts, {k: delta[k] for k in first})
        # Tensors not in this fragment did not move, nor did their optimizer state.
        assert all(torch.equal(parts[k], before[k]) for k in second)
        state_mid = {k: v for k, v in by_parts.state_dict().items() if k.endswith("::b")}
        assert state_mid.keys() == state_before.keys()
        assert all(torch.equal(state_mid[k], state_before[k]) for k in state_mid)
        by_parts.step(parts, {k: delta[k] for k in second})
        assert all(torch.equal(parts[k], whole[k]) for k in names), (step, kind)
    a, b = at_once.state_dict(), by_parts.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_state_survives_safetensors_and_a_restore_into_new_tensors(kind: str) -> None:
    params = rand_tensors(0)
    outer = build_outer(CONFIGS[kind])
    for step in range(2):
        outer.step(params, rand_tensors(30 + step))
    state = outer.state_dict()
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())
    restored = build_outer(CONFIGS[kind])
    restored.load_state_dict(st_load(st_save(state)))
    # As after RoundProtocol.restore: a new dict of new tensor objects with the same values.
    twin = {k: v.clone() for k, v in params.items()}
    for step in range(2):
        outer.step(params, rand_tensors(40 + step))
        restored.step(twin, rand_tensors(40 + step))
        assert all(torch.equal(params[k], twin[k]) for k in params), (step, kind)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_step_does_not_change_delta_or_leave_grads(kind: str) -> None:
    params = rand_tensors(0)
    delta = rand_tensors(1)
    kept = {k: v.clone() for k, v in delta.items()}
    outer = build_outer(CONFIGS[kind])
    outer.step(params, delta)
    outer.step(params, delta)
    outer.step(params, {})
    assert all(torch.equal(delta[k], kept[k]) for k in delta)
    assert all(p.grad is None for p in params.values())


def test_nesterov_state_saved_in_the_old_format_loads() -> None:
    # The layout written before the outer step ran on torch.optim: one float32 momentum buffer
    # per parameter under 'momentum::<name>'. The next step is m ← μ·m + Δ; θ ← θ − lr·(Δ + μ·m).
    params = rand_tensors(0)
    old_state = {f"momentum::{k}": v for k, v in rand_tensors(5).items()}
    outer = NesterovOuter(lr=0.7, momentum=0.9)
    outer.load_state_dict(st_load(st_save(old_state)))
    delta = rand_tensors(6)
    expected = {}
    for k, theta in params.items():
        buf = old_state[f"momentum::{k}"].clone().mul_(0.9).add_(delta[k])
        expected[k] = theta.clone().add_(delta[k].add(buf, alpha=0.9), alpha=-0.7)
    outer.step(params, delta)
    assert all(torch.equal(params[k], expected[k]) for k in params)
    # Momentum-0 Nesterov used to save buffers too; they have no effect and are dropped.
    no_momentum = NesterovOuter(lr=1.0, momentum=0.0)
    no_momentum.load_state_dict(old_state)
    assert no_momentum.state_dict() == {}


def test_bad_adam_state_is_a_clear_error() -> None:
    outer = build_outer(CONFIGS["adam"])
    with pytest.raises(ValueError, match="not of the form 'exp_avg::<parameter>', "):
        outer.load_state_dict({"momentum::b": torch.zeros(3, 2, 4)})
    with pytest.raises(ValueError, match="lacks 'step::b'"):
        outer.load_state_dict({"exp_avg::b": torch.zeros(3), "exp_avg_sq::b": torch.zeros(3)})
    outer.load_state_dict(
        {
            "exp_avg::b": torch.zeros(3),
            "exp_avg_sq::b": torch.zeros(3),
            "step::b": torch.tensor(1.0),
        }
    )
    with pytest.raises(ValueError, match=r"'exp_avg::b' has shape \(3,\)"):
        outer.step(rand_tensors(0), {"b": torch.zeros(3, 2, 4)})
