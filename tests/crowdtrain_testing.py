"""Helpers shared by test modules (conftest.py holds the fixtures)."""

from __future__ import annotations

from pathlib import Path

from crowdtrain.config import RunConfig, parse_config


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
