"""Registry, shapes, deterministic initial weights and parameter counts of the built-in models."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from crowdtrain.config import ModelConfig
from crowdtrain.models import (
    ARCHS,
    GPT,
    WindowMLP,
    build_model,
    count_params,
    initial_state,
    lm_loss,
    load_state,
    param_shapes,
)

TINY = {"width": 32, "depth": 2, "heads": 4, "context": 16, "mlp_ratio": 2}


def tiny(arch: str, **kw: int) -> ModelConfig:
    return ModelConfig(arch=arch, **{**TINY, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ["gpt", "mlp"])
def test_builds_each_arch_and_maps_tokens_to_logits(arch: str) -> None:
    cfg = tiny(arch)
    model = build_model(cfg)
    assert isinstance(model, {"gpt": GPT, "mlp": WindowMLP}[arch])
    x = torch.randint(0, 256, (3, 16))
    assert model(x).shape == (3, 16, 256)
    assert model(x[:, :5]).shape == (3, 5, 256)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_registry_is_the_config_choices() -> None:
    assert ARCHS == ("gpt", "mlp")


def test_unknown_arch_is_a_clear_error() -> None:
    bad = ModelConfig.model_construct(**{**tiny("gpt").model_dump(), "arch": "rnn"})
    for fn in (build_model, initial_state, param_shapes, count_params):
        with pytest.raises(ValueError, match=r"unknown model arch 'rnn'; allowed are: gpt, mlp"):
            fn(bad)


@pytest.mark.parametrize("arch", ["gpt", "mlp"])
def test_too_long_input_is_rejected(arch: str) -> None:
    model = build_model(tiny(arch))
    with pytest.raises(ValueError, match="context is 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("arch", ["gpt", "mlp"])
def test_initial_state_is_deterministic_and_does_not_touch_the_global_rng(arch: str) -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = initial_state(tiny(arch))
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(999)  # the global RNG must not matter either
    b = initial_state(tiny(arch))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = initial_state(tiny(arch, init_seed=1))
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].dim() >= 2)


@pytest.mark.parametrize("arch", ["gpt", "mlp"])
def test_initial_state_is_float32_detached_and_owns_its_memory(arch: str) -> None:
    state = initial_state(tiny(arch))
    ptrs = {t.untyped_storage().data_ptr() for t in state.values()}
    assert len(ptrs) == len(state)  # no shared storage (untied embeddings)
    for t in state.values():
        assert t.dtype == torch.float32
        assert not t.requires_grad
        assert t.device.type == "cpu"


@pytest.mark.parametrize("arch", ["gpt", "mlp"])
def test_state_names_shapes_and_safetensors_round_trip(arch: str) -> None:
    cfg = tiny(arch)
    state = initial_state(cfg)
    shapes = param_shapes(cfg)
    assert list(shapes) == list(state)
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes
    assert [name for name, _ in build_model(cfg).named_parameters()] == list(state)
    loaded = st_load(st_save(state))  # refuses shared tensors, so this checks untied weights
    model = build_model(cfg, loaded)
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(model(x), build_model(cfg)(x))


def test_gpt_names_are_stable() -> None:
    names = list(param_shapes(tiny("gpt", depth=1)))
    assert names == [
        "tok_emb.weight",
        "pos_emb.weight",
        "blocks.0.ln1.weight",
        "blocks.0.ln1.bias",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.qkv.bias",
        "blocks.0.attn.proj.weight",
        "blocks.0.attn.proj.bias",
        "blocks.0.ln2.weight",
        "blocks.0.ln2.bias",
        "blocks.0.mlp.fc.weight",
        "blocks.0.mlp.fc.bias",
        "blocks.0.mlp.proj.weight",
        "blocks.0.mlp.proj.bias",
        "ln_f.weight",
        "ln_f.bias",
        "head.weight",
    ]


def test_gpt_param_count_matches_the_formula() -> None:
    v, c, w, d, r = 256, 16, 32, 2, 2
    block = 2 * 2 * w + (3 * w * w + 3 * w) + (w * w + w) + (w * r * w + r * w) + (r * w * w + w)
    expected = v * w + c * w + d * block + 2 * w + w * v
    assert count_params(tiny("gpt")) == expected
    assert sum(p.numel() for p in build_model(tiny("gpt")).parameters()) == expected


def test_mlp_param_count_matches_the_formula() -> None:
    v, w, d, h, window = 256, 32, 2, 64, 8
    expected = v * w + (window * w * h + h) + (d - 1) * (h * h + h) + (h * v + v)
    assert count_params(tiny("mlp")) == expected
    small_context = tiny("mlp", context=4)  # the window shrinks to the context
    assert count_params(small_context) == expected - (window - 4) * w * h


def test_default_gpt_size() -> None:
    assert count_params(ModelConfig()) == 875_264


def test_gpt_init_follows_gpt2() -> None:
    state = initial_state(tiny("gpt", width=64, depth=4, mlp_ratio=4))
    assert torch.equal(state["blocks.0.ln1.weight"], torch.ones(64))
    assert torch.equal(state["blocks.1.attn.qkv.bias"], torch.zeros(192))
    assert state["tok_emb.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert state["blocks.0.mlp.fc.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    residual = state["blocks.0.mlp.proj.weight"].std().item()
    assert residual == pytest.approx(0.02 / (2 * 4) ** 0.5, rel=0.05)


@pytest.mark.parametrize("arch", ["gpt", "mlp"])
def test_initial_loss_is_near_uniform(arch: str) -> None:
    model = build_model(tiny(arch))
    x = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    loss = lm_loss(model, x, x)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.1)


def test_load_state_names_the_bad_tensor() -> None:
    cfg = tiny("mlp")
    model = build_model(cfg)
    state = initial_state(cfg)
    missing = dict(state)
    del missing["head.bias"]
    with pytest.raises(ValueError, match=r"missing tensor 'head\.bias'"):
        load_state(model, missing)
    with pytest.raises(ValueError, match=r"unexpected tensor 'extra'"):
        load_state(model, {**state, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"'head.bias' has shape \(3,\)"):
        load_state(model, {**state, "head.bias": torch.zeros(3)})
