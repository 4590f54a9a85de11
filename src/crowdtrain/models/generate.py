"""Sample text from a byte-level model: the `crowdtrain sample` command and the dashboard.

Autoregressive sampling as in Radford et al. 2019 ("Language Models are Unsupervised Multitask
Learners"): feed the running byte sequence (cropped to the model's context), take the logits of
the last position, divide by a temperature, keep the `top_k` most likely bytes (Fan et al. 2018,
"Hierarchical Neural Story Generation"), and draw the next byte. Temperature 0 is greedy argmax.
Draws come from a local ``torch.Generator`` seeded with `seed`, so a seed always gives the same
text, and the global RNG and thread settings are never touched.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from crowdtrain.config import ModelConfig
from crowdtrain.models.gpt import GPT, Block
from crowdtrain.models.mlp import WindowMLP
from crowdtrain.models.registry import build_model

MAX_TOKENS = 100_000
BYTE_VALUES = 256
VISIBLE = "·"


def _check(cfg: ModelConfig, prompt: bytes, tokens: int, temperature: float) -> None:
    if not prompt:
        raise ValueError("the prompt is empty; give at least one character to continue from")
    if not 0 <= tokens <= MAX_TOKENS:
        raise ValueError(f"tokens must be from 0 to {MAX_TOKENS}, not {tokens}")
    if not (math.isfinite(temperature) and temperature >= 0.0):
        raise ValueError(f"temperature must be a finite number of at least 0, not {temperature}")
    top = max(prompt)
    if top >= cfg.vocab_size:
        raise ValueError(
            f"the prompt holds byte {top}, outside the model's vocabulary of {cfg.vocab_size}"
        )


class _Decoder:
    """Next-byte logits after a growing sequence, reusing earlier work where the model allows.

    A GPT keeps the keys and values of every position (a KV cache) while the sequence fits its
    context, so each new byte costs one position instead of the whole window; past the context
    every step runs on the last `context` bytes, since the learned positions then shift. The
    window MLP only ever needs its last `window` bytes.
    """

    def __init__(self, model: nn.Module, context: int) -> None:
        self.model, self.context = model, context
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, seq: torch.Tensor) -> torch.Tensor:
        """Logits [vocab] for the byte after `seq` [1, n]."""
        model, n = self.model, seq.shape[1]
        if isinstance(model, WindowMLP):
            logits: torch.Tensor = model(seq[:, -model.window :])
        elif isinstance(model, GPT) and n <= self.context:
            done = self.cache[0][0].shape[2] if self.cache else 0
            logits = self._gpt(model, seq[:, done:], done)
        else:
            self.cache.clear()
            logits = model(seq[:, -self.context :])
        return logits[0, -1]

    def _gpt(self, model: GPT, x: torch.Tensor, start: int) -> torch.Tensor:
        """GPT.forward for positions start.. of x, attending to the cached earlier positions."""
        b, t = x.shape
        h = model.tok_emb(x) + model.pos_emb(torch.arange(start, start + t))
        for i, block in enumerate(model.blocks):
            assert isinstance(block, Block)
            attn = block.attn
            c = h.shape[2]
            q, k, v = (
                z.view(b, t, attn.heads, c // attn.heads).transpose(1, 2)
                for z in attn.qkv(block.ln1(h)).split(c, dim=2)
            )
            if start:
                k = torch.cat((self.cache[i][0], k), dim=2)
                v = torch.cat((self.cache[i][1], v), dim=2)
                self.cache[i] = (k, v)
            else:
                self.cache.append((k, v))
            # The first call is square and causal; later ones add one query that sees every key.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=start == 0)
            h = h + attn.proj(y.transpose(1, 2).reshape(b, t, c))
            h = h + block.mlp(block.ln2(h))
        out: torch.Tensor = model.head(model.ln_f(h[:, -1:]))
        return out


def generate_bytes(
    cfg: ModelConfig,
    params: Mapping[str, torch.Tensor],
    prompt: bytes,
    tokens: int = 200,
    *,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
) -> bytes:
    """The `tokens` bytes the model writes after `prompt` (the prompt itself is not included)."""
    _check(cfg, prompt, tokens, temperature)
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (or None for no limit), not {top_k}")
    model = build_model(cfg, params)
    model.eval()
    decode = _Decoder(model, cfg.context)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # Only byte values can be written out: a larger vocabulary's extra ids are never drawn.
    allowed = min(cfg.vocab_size, BYTE_VALUES)
    k = allowed if top_k is None else min(top_k, allowed)
    seq = torch.empty(1, len(prompt) + tokens, dtype=torch.int64)
    seq[0, : len(prompt)] = torch.frombuffer(bytearray(prompt), dtype=torch.uint8)
    with torch.inference_mode():
        for n in range(len(prompt), len(prompt) + tokens):
            logits = decode(seq[:, :n])[:allowed].float()
            if temperature == 0.0:
                seq[0, n] = logits.argmax()
            else:
                top, idx = torch.topk(logits / temperature, k)
                pick = torch.multinomial(torch.softmax(top, dim=0), 1, generator=generator)
                seq[0, n] = idx[pick[0]]
    return bytes(seq[0, len(prompt) :].to(torch.uint8).numpy().tobytes())


def generate(
    cfg: ModelConfig,
    params: Mapping[str, torch.Tensor],
    prompt: str,
    tokens: int = 200,
    *,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
) -> str:
    """The model's continuation of `prompt`: `tokens` bytes decoded as UTF-8 (bad bytes become
    U+FFFD). Deterministic for a given seed; temperature 0 is greedy."""
    raw = generate_bytes(
        cfg,
        params,
        prompt.encode("utf-8"),
        tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
    )
    return raw.decode("utf-8", errors="replace")


def printable(text: str) -> str:
    """`text` safe to show raw: control, format and unassigned characters (terminal escapes,
    bidi overrides, zero-width marks) become a visible '·'; newlines and tabs stay."""
    return "".join(
        VISIBLE if unicodedata.category(ch)[0] == "C" and ch not in "\n\t" else ch for ch in text
    )
