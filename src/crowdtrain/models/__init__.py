"""Built-in model architectures, chosen by name from a static registry.

``build_model(cfg)`` gives an ``nn.Module`` mapping byte tokens [B, T] to logits
[B, T, vocab_size]; ``initial_state(cfg)`` its deterministic initial weights. Architectures:
``gpt`` (a GPT-2 style causal transformer, Radford et al. 2019) and ``mlp`` (a fixed-window
neural language model, Bengio et al. 2003).
"""

from crowdtrain.models.gpt import GPT
from crowdtrain.models.mlp import WindowMLP
from crowdtrain.models.registry import (
    ARCHS,
    build_model,
    count_params,
    initial_state,
    lm_loss,
    load_state,
    param_shapes,
)

__all__ = [
    "ARCHS",
    "GPT",
    "WindowMLP",
    "build_model",
    "count_params",
    "initial_state",
    "lm_loss",
    "load_state",
    "param_shapes",
]
