"""Shared fixtures: a small deterministic text corpus and a tiny run config."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import settings

# Shared 2-core machines are noisy: no per-example time limit anywhere (timings are benchmarks).
settings.register_profile("crowdtrain", deadline=None)
settings.load_profile("crowdtrain")

WORDS = [
    "def",
    "class",
    "return",
    "import",
    "from",
    "self",
    "if",
    "else",
    "for",
    "while",
    "in",
    "not",
    "and",
    "or",
    "None",
    "True",
]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 120 kB of Python-like text with learnable structure, the same on every run."""
    rng = random.Random(0)
    lines = []
    for i in range(4000):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        lines.append(f"    {words} x{i % 17} = {i % 5}\n")
    path = tmp_path_factory.mktemp("corpus") / "corpus.py"
    path.write_text("".join(lines))
    return path
