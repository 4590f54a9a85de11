"""Text sampling from byte-level models: determinism, greedy decoding, the KV cache, errors."""

from __future__ import annotations

import pytest
import torch

from crowdtrain.config import ModelConfig
from crowdtrain.models import build_model, initial_state
from crowdtrain.models.generate import _Decoder, generate, generate_bytes, printable

GPT = ModelConfig(arch="gpt", width=32, depth=2, heads=2, context=64)
SHORT = ModelConfig(arch="gpt", width=32, depth=1, heads=2, context=8)
MLP = ModelConfig(arch="mlp", width=16, depth=1, context=32)


def naive_greedy(cfg: ModelConfig, prompt: bytes, tokens: int) -> bytes:
    """Greedy decoding by running the whole (cropped) sequence through the model every step."""
    model = build_model(cfg, initial_state(cfg)).eval()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(tokens):
            x = torch.tensor([seq[-cfg.context :]])
            seq.append(int(model(x)[0, -1, :256].argmax()))
    return bytes(seq[len(prompt) :])


@pytest.mark.parametrize("cfg", [GPT, SHORT, MLP], ids=["gpt", "gpt-past-context", "mlp"])
def test_greedy_matches_full_forward_decoding(cfg: ModelConfig) -> None:
    params = initial_state(cfg)
    out = generate_bytes(cfg, params, b"def f(x):", 30, temperature=0.0)
    assert out == naive_greedy(cfg, b"def f(x):", 30)
    assert out == generate_bytes(cfg, params, b"def f(x):", 30, temperature=0.0, seed=7)
    assert out == generate_bytes(cfg, params, b"def f(x):", 30, top_k=1, seed=3)


def test_cached_logits_equal_the_full_forward() -> None:
    model = build_model(GPT, initial_state(GPT)).eval()
    seq = torch.randint(0, 256, (1, GPT.context), generator=torch.Generator().manual_seed(0))
    decode = _Decoder(model, GPT.context)
    with torch.inference_mode():
        for n in range(5, GPT.context + 1):
            expected = model(seq[:, :n])[0, -1]
            torch.testing.assert_close(decode(seq[:, :n]), expected, atol=1e-5, rtol=1e-4)


def test_sampling_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone() -> None:
    params = initial_state(GPT)
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    a = generate(GPT, params, "import ", 40, seed=1)
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    assert a == generate(GPT, params, "import ", 40, seed=1)
    others = {generate(GPT, params, "import ", 40, seed=s) for s in range(2, 5)}
    assert others != {a}


@pytest.mark.parametrize("tokens", [0, 1, 17, 100])
def test_output_is_the_continuation_only_with_one_byte_per_token(tokens: int) -> None:
    params = initial_state(SHORT)
    raw = generate_bytes(SHORT, params, "héllo".encode(), tokens, temperature=1.5, top_k=None)
    assert len(raw) == tokens
    text = generate(SHORT, params, "héllo", tokens, temperature=1.5, top_k=None)
    assert text == raw.decode("utf-8", errors="replace")


def test_a_vocabulary_larger_than_bytes_still_writes_bytes() -> None:
    cfg = ModelConfig(arch="mlp", vocab_size=300, width=8, depth=1, context=16)
    assert len(generate_bytes(cfg, initial_state(cfg), b"x", 50, temperature=2.0, top_k=None)) == 50


@pytest.mark.parametrize(
    ("prompt", "kwargs", "message"),
    [
        ("", {}, "prompt is empty"),
        ("a", {"tokens": -1}, "tokens must be"),
        ("a", {"tokens": 100_001}, "tokens must be"),
        ("a", {"temperature": -0.1}, "temperature must be"),
        ("a", {"temperature": float("nan")}, "temperature must be"),
        ("a", {"top_k": 0}, "top_k must be"),
    ],
)
def test_bad_arguments_are_refused_in_one_sentence(
    prompt: str, kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        generate(MLP, initial_state(MLP), prompt, **kwargs)  # type: ignore[arg-type]


def test_a_prompt_byte_outside_a_small_vocabulary_is_refused() -> None:
    cfg = ModelConfig(arch="mlp", vocab_size=128, width=8, depth=1, context=16)
    with pytest.raises(ValueError, match="outside the model's vocabulary of 128"):
        generate(cfg, initial_state(cfg), "café")


def test_printable_hides_control_characters_but_keeps_newlines_and_tabs() -> None:
    raw = "\x1b[31mred\x07\n\tok\u202e\r\x00\x7f\x85 é\ufffd"
    assert printable(raw) == "·[31mred·\n\tok····· é\ufffd"
    assert printable("plain text\n") == "plain text\n"
