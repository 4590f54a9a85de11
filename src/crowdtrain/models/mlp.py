"""A causal-window MLP language model: the small, fast baseline architecture.

This is the fixed-window neural language model of Bengio et al. 2003 ("A Neural Probabilistic
Language Model", JMLR 3): position t sees only the previous ``w = min(context, 8)`` bytes
(t-w+1 … t, left-padded with byte 0), embeds each in ``width`` dimensions, concatenates the
embeddings, and maps them through ``depth`` GELU hidden layers of width ``mlp_ratio * width`` to
next-byte logits. The windows are built with ``Tensor.unfold``, so there is no Python loop over
positions, and it is causal by construction.

Initialisation is drawn from an explicit ``torch.Generator``: embeddings N(0, 1), hidden layers
N(0, 1/fan_in) (so pre-activations start near unit scale), the output layer N(0, 0.02²) so the
first loss is close to ln(vocab_size), and zero biases.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from crowdtrain.config import ModelConfig

MAX_WINDOW = 8
HEAD_STD = 0.02


class WindowMLP(nn.Module):
    """Byte tokens [B, T] -> next-token logits [B, T, vocab_size] from a causal window."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.context = cfg.context
        self.window = min(cfg.context, MAX_WINDOW)
        hidden = cfg.mlp_ratio * cfg.width
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.width)
        sizes = [self.window * cfg.width] + [hidden] * cfg.depth
        self.hidden = nn.ModuleList(
            nn.Linear(n_in, n_out) for n_in, n_out in itertools.pairwise(sizes)
        )
        self.head = nn.Linear(hidden, cfg.vocab_size)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """Draw the initial weights from `generator`, in a fixed parameter order."""
        self.tok_emb.weight.normal_(0.0, 1.0, generator=generator)
        for layer in self.hidden:
            assert isinstance(layer, nn.Linear)
            layer.weight.normal_(0.0, 1.0 / math.sqrt(layer.in_features), generator=generator)
            layer.bias.zero_()
        self.head.weight.normal_(0.0, HEAD_STD, generator=generator)
        self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape
        if t > self.context:
            raise ValueError(f"input has {t} tokens but the model's context is {self.context}")
        # [B, T] -> [B, T + w - 1] -> windows [B, T, w]; window t holds tokens t-w+1 .. t.
        padded = F.pad(x, (self.window - 1, 0), value=0)
        windows = padded.unfold(1, self.window, 1)
        h = self.tok_emb(windows).reshape(b, t, -1)
        for layer in self.hidden:
            h = F.gelu(layer(h), approximate="tanh")
        logits: torch.Tensor = self.head(h)
        return logits
