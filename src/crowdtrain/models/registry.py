"""The built-in model registry: architectures chosen by name, built from a ModelConfig.

A volunteer never receives code, only a config naming one of the architectures compiled into
this package (see DESIGN.md, "Trust model"). The registry below is a static table; there is no
plug-in mechanism and no way to add an entry from outside the package.

Initial weights are a pure function of the config: they are drawn from a ``torch.Generator``
seeded with ``cfg.init_seed`` (never the global RNG), so every party that builds the model from
the same config gets bit-identical weights, and the run manifest can pin their hash.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from crowdtrain.config import ModelConfig
from crowdtrain.models.gpt import GPT
from crowdtrain.models.mlp import WindowMLP

_REGISTRY: dict[str, type[GPT] | type[WindowMLP]] = {
    "gpt": GPT,
    "mlp": WindowMLP,
}

ARCHS: tuple[str, ...] = tuple(sorted(_REGISTRY))


def _arch(cfg: ModelConfig) -> type[GPT] | type[WindowMLP]:
    try:
        return _REGISTRY[cfg.arch]
    except KeyError:
        allowed = ", ".join(ARCHS)
        raise ValueError(f"unknown model arch {cfg.arch!r}; allowed are: {allowed}") from None


def _skeleton(cfg: ModelConfig) -> GPT | WindowMLP:
    """The model with shapes only (meta device): no memory, no RNG consumed."""
    with torch.device("meta"):
        return _arch(cfg)(cfg)


def build_model(cfg: ModelConfig, state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Build the named architecture on the CPU.

    Without `state` the weights are the deterministic initial weights for ``cfg.init_seed``;
    with `state` they are copied from it instead (names and shapes must match exactly).
    """
    model = _skeleton(cfg).to_empty(device="cpu")
    if state is None:
        generator = torch.Generator(device="cpu").manual_seed(cfg.init_seed)
        model.init_weights(generator)
    else:
        load_state(model, state)
    return model


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy `state` into `model` in place, after checking names and shapes match exactly."""
    targets = model.state_dict()
    missing = sorted(set(targets) - set(state))
    if missing:
        raise ValueError(f"model state is missing tensor {missing[0]!r} ({len(missing)} missing)")
    extra = sorted(set(state) - set(targets))
    if extra:
        raise ValueError(f"model state has unexpected tensor {extra[0]!r} ({len(extra)} extra)")
    for name, target in targets.items():
        source = state[name]
        if tuple(source.shape) != tuple(target.shape):
            raise ValueError(
                f"tensor {name!r} has shape {tuple(source.shape)} "
                f"but the model expects {tuple(target.shape)}"
            )
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(state[name])


def initial_state(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The initial weights for `cfg` as float32 CPU tensors (bit-identical for equal configs)."""
    model = build_model(cfg)
    return {name: t.detach().to(torch.float32).clone() for name, t in model.state_dict().items()}


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the model's state dict and its shape, without allocating weights."""
    return {name: tuple(t.shape) for name, t in _skeleton(cfg).state_dict().items()}


def count_params(cfg: ModelConfig) -> int:
    """The number of trainable scalars in the model."""
    return sum(math.prod(shape) for shape in param_shapes(cfg).values())


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` on inputs `x` [B, T] and targets `y` [B, T]."""
    logits: torch.Tensor = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())
