"""Shared fixtures: a small deterministic text corpus and a tiny run config."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from crowdtrain.config import RunConfig, parse_config

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


def tiny_config(corpus: Path, data_dir: Path, **overrides: dict[str, object]) -> RunConfig:
    """A run config small enough for a unit test: a 2-layer GPT on the test corpus."""
    raw: dict[str, dict[str, object]] = {
        "model": {"arch": "gpt", "width": 32, "depth": 2, "heads": 2, "context": 32},
        "data": {
            "source": str(corpus),
            "dir": str(data_dir),
            "shard_bytes": 8192,
            "val_fraction": 0.1,
            "batch_size": 8,
            "shards_per_peer": 2,
        },
        "inner": {"steps": 8, "total_steps": 64, "warmup_steps": 2, "lr": 3e-3},
        "rounds": {"total": 4, "quorum": 3},
        "aggregation": {"method": "mean", "bucket_size": 1},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value}
    return parse_config(raw)
