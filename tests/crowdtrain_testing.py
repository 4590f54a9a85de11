"""Helpers shared by test modules (conftest.py holds the fixtures)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import tomli_w

from crowdtrain.config import RunConfig, parse_config
from crowdtrain.demo import join_command as demo_join_command


def tiny_data(corpus: Path, data_dir: Path) -> dict[str, Any]:
    """The tests' data section: the test corpus in 8 KB shards, 10% held out, batches of 8."""
    return {
        "source": str(corpus),
        "dir": str(data_dir),
        "shard_bytes": 8192,
        "val_fraction": 0.1,
        "batch_size": 8,
    }


def join_command(url: str, name: str, home: Path) -> list[str]:
    """`crowdtrain join` for a test volunteer named NAME with its files under HOME (run with
    ``CROWDTRAIN_CONFIG_DIR`` in HOME too): the demo's volunteer command line."""
    return demo_join_command([sys.executable, "-m", "crowdtrain.cli"], url, name, home)


def tiny_config(corpus: Path, data_dir: Path, **overrides: dict[str, object]) -> RunConfig:
    """A run config small enough for a unit test: a 2-layer GPT on the test corpus."""
    raw: dict[str, dict[str, object]] = {
        "model": {"arch": "gpt", "width": 32, "depth": 2, "heads": 2, "context": 32},
        "data": {**tiny_data(corpus, data_dir), "shards_per_peer": 2},
        "inner": {"steps": 8, "total_steps": 64, "warmup_steps": 2, "lr": 3e-3},
        "rounds": {"total": 4, "quorum": 3},
        "aggregation": {"method": "mean", "bucket_size": 1},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value}
    return parse_config(raw)


def tiny_des_toml(corpus: Path, data: Path, extra: str = "") -> str:
    """A discrete-event scenario small enough for a unit test: 2 peers, a 1-layer GPT."""
    return f"""
[swarm]
eval_batches = 2
eval_batch_size = 4

[target]
params = 1_000_000
tokens_per_step = 1000
steps_per_proxy_step = 2.0

[population]
peers = 2
flops = 1e12
up_bps = 10e6
down_bps = 100e6
rtt_s = 0.05

[churn]
enabled = false

[run.model]
width = 32
depth = 1
heads = 2
context = 32

[run.data]
source = "{corpus}"
dir = "{data}"
shard_bytes = 8192
val_fraction = 0.1
batch_size = 4

[run.inner]
steps = 4

[run.rounds]
total = 3
quorum = 2

[run.defence]
enabled = false
{extra}"""


def write_e2e_config(
    path: Path, corpus: Path, data_dir: Path, name: str, **sections: dict[str, Any]
) -> Path:
    """The networked tests' tiny run, written as TOML to `path`: a 1-layer GPT, rounds of 6
    steps, 3 rounds with a quorum of 2 and a 20 s deadline; each of `sections` updates its
    section key by key."""
    cfg: dict[str, dict[str, Any]] = {
        "model": {"arch": "gpt", "width": 32, "depth": 1, "heads": 2, "context": 32},
        "data": tiny_data(corpus, data_dir),
        "inner": {"steps": 6, "total_steps": 60, "warmup_steps": 2, "threads": 1, "overlap": False},
        "rounds": {"total": 3, "quorum": 2, "deadline_s": 20.0},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path.write_text(tomli_w.dumps({"name": name, **cfg}))
    return path
