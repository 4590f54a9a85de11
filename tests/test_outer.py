"""Outer optimizers: DiLoCo's Nesterov step and SparseLoCo's plain SGD step."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from crowdtrain.config import OuterConfig
from crowdtrain.outer import ErrorFeedbackOuter, NesterovOuter, OuterOptimizer, build_outer

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
    bad = OuterConfig.model_construct(optimizer="adam", lr=0.1, momentum=0.0)
    with pytest.raises(ValueError, match="unknown outer optimizer 'adam'"):
        build_outer(bad)
