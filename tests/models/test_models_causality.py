"""The models are causal: logits at a position never depend on later tokens."""

from __future__ import annotations

import pytest
import torch

from crowdtrain.config import ModelConfig
from crowdtrain.models import build_model


def tiny(arch: str, context: int = 16) -> ModelConfig:
    return ModelConfig(arch=arch, width=32, depth=2, heads=4, context=context, mlp_ratio=2)  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ["gpt", "mlp"])
@pytest.mark.parametrize("t", [0, 5, 15])
def test_changing_token_t_leaves_earlier_logits_unchanged(arch: str, t: int) -> None:
    model = build_model(tiny(arch))
    gen = torch.Generator().manual_seed(t)
    x = torch.randint(0, 256, (2, 16), generator=gen)
    x2 = x.clone()
    x2[:, t] = (x[:, t] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(x2)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t], b[:, t])


@pytest.mark.parametrize("arch", ["gpt", "mlp"])
def test_prefix_logits_do_not_depend_on_sequence_length(arch: str) -> None:
    model = build_model(tiny(arch))
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, prefix = model(x), model(x[:, :7])
    torch.testing.assert_close(full[:, :7], prefix, rtol=1e-5, atol=1e-5)


def test_mlp_sees_only_the_last_eight_tokens() -> None:
    model = build_model(tiny("mlp"))
    x = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    x2 = x.clone()
    x2[:, 3] = (x[:, 3] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(x2)
    assert not torch.allclose(a[:, 10], b[:, 10])  # window of position 10 is tokens 3..10
    assert torch.equal(a[:, 11:], b[:, 11:])  # position 11 and later no longer see token 3


def test_mlp_window_is_capped_by_the_context() -> None:
    model = build_model(tiny("mlp", context=4))
    x = torch.randint(0, 256, (2, 4))
    assert model(x).shape == (2, 4, 256)
