"""A byte-level causal transformer (GPT-2 style) built from a ModelConfig.

The architecture is the decoder of Radford et al. 2019 ("Language Models are Unsupervised
Multitask Learners"), written to read top to bottom like nanoGPT: pre-LayerNorm blocks, a learned
positional embedding, causal self-attention through ``F.scaled_dot_product_attention``, a GELU
MLP of width ``mlp_ratio * width``, and no dropout (every training step is deterministic, so any
step can be replayed by a verifier).

The input embedding and the output head are deliberately *untied*: each parameter owns its own
storage, so the state dict has no shared tensors, safetensors can store it as is, and
``state_dict`` / ``load_state_dict`` / ``named_parameters`` all name exactly the same tensors.

Initialisation follows GPT-2: every weight is drawn from N(0, 0.02²), and the two projections that
write into the residual stream (``attn.proj`` and ``mlp.proj``) are scaled by 1/sqrt(2·depth).
Weights are drawn from an explicit ``torch.Generator`` so that the global RNG is never touched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from crowdtrain.config import ModelConfig

INIT_STD = 0.02


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t only attends to positions <= t."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # [B, T, C] -> [B, heads, T, C / heads]
        q = q.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        k = k.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        v = v.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        out: torch.Tensor = self.proj(y)
        return out


class FeedForward(nn.Module):
    """The position-wise MLP of a block: width -> ratio*width -> GELU -> width."""

    def __init__(self, width: int, ratio: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, ratio * width)
        self.proj = nn.Linear(ratio * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(F.gelu(self.fc(x), approximate="tanh"))
        return out


class Block(nn.Module):
    """One pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, ratio: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


class GPT(nn.Module):
    """Byte tokens [B, T] -> next-token logits [B, T, vocab_size]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.context = cfg.context
        self.depth = cfg.depth
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_emb = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """GPT-2 initialisation drawn from `generator`, in a fixed parameter order."""
        residual_std = INIT_STD / math.sqrt(2 * self.depth)
        residual = {
            id(proj)
            for block in self.blocks
            if isinstance(block, Block)
            for proj in (block.attn.proj, block.mlp.proj)
        }
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.fill_(0.0)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, INIT_STD, generator=generator)
            elif isinstance(module, nn.Linear):
                std = residual_std if id(module) in residual else INIT_STD
                module.weight.normal_(0.0, std, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if t > self.context:
            raise ValueError(f"input has {t} tokens but the model's context is {self.context}")
        pos = torch.arange(t, device=x.device)
        h = self.tok_emb(x) + self.pos_emb(pos)
        for block in self.blocks:
            h = block(h)
        logits: torch.Tensor = self.head(self.ln_f(h))
        return logits
