"""Algorithm benchmark: one worker, synchronous data-parallel, and DiLoCo with three codecs.

Reproduces, at a scale a 2-core machine can run, the comparison of DiLoCo (Douillard et al. 2023,
"DiLoCo: Distributed Low-Communication Training of Language Models", arXiv:2311.08105, Table 2
and Fig. 2) against synchronous data-parallel training that averages gradients every step, plus
DiLoCo with int8 blockwise compression and with SparseLoCo-style top-k + 2-bit values and error
feedback (Sarfi et al. 2025, arXiv:2508.15706).

Every method sees the same corpus, the same initial weights, the same evaluation batches and the
same number of inner steps per worker. Bytes are those each worker *sends*: for data-parallel a
ring all-reduce of fp32 gradients every step, 2·(N−1)/N · 4P bytes (the bandwidth-optimal
all-reduce, Patarasuk & Yuan 2009); for DiLoCo the real encoded payload of each round's
pseudo-gradient, as the networked system uploads it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crowdtrain.config import RunConfig, parse_config
from crowdtrain.data import DataManifest, ensure_packed_for, eval_batches
from crowdtrain.models import count_params, initial_state
from crowdtrain.sim.ddp import global_batches
from crowdtrain.sim.swarm import load_shards, run_swarm
from crowdtrain.train import LocalTrainer, evaluate


@dataclass(frozen=True)
class AlgoSetting:
    """The size of one benchmark run."""

    workers: int
    inner_steps: int
    total_steps: int
    width: int
    depth: int
    context: int
    batch_size: int
    eval_batches: int


QUICK = AlgoSetting(
    workers=4,
    inner_steps=50,
    total_steps=400,
    width=96,
    depth=3,
    context=64,
    batch_size=16,
    eval_batches=16,
)
FULL = AlgoSetting(
    workers=4,
    inner_steps=100,
    total_steps=1500,
    width=128,
    depth=4,
    context=128,
    batch_size=16,
    eval_batches=32,
)


def bench_config(
    s: AlgoSetting, codec: str = "fp32", outer: str = "nesterov", state: str = "published"
) -> RunConfig:
    """The run config of one DiLoCo method at setting `s` (plain mean: no attackers here).

    `state` is ``inner.optimizer_state``: crowdtrain's default ``"published"`` (replayable),
    DiLoCo's own ``"kept"``, or ``"fresh"``. The outer lr and momentum are the ones the run
    derives (``config.outer_rule``); the top-k codec is paired with SparseLoCo's outer step
    (plain SGD, lr 1, error feedback with decay 0.95 on the workers), as in that paper.
    """
    sparse = outer == "error_feedback"
    return parse_config(
        {
            "name": "bench-algo",
            "model": {
                "arch": "gpt",
                "width": s.width,
                "depth": s.depth,
                "heads": 4,
                "context": s.context,
            },
            "data": {"batch_size": s.batch_size},
            "inner": {
                "steps": s.inner_steps,
                "total_steps": s.total_steps,
                "warmup_steps": max(1, s.total_steps // 20),
                "optimizer_state": state,
                "threads": 2,
            },
            "outer": {"optimizer": outer, **({"lr": 1.0} if sparse else {})},
            "codec": {"name": codec, "ef_decay": 0.95 if sparse else 1.0},
            "aggregation": {"method": "mean", "bucket_size": 1},
            "rounds": {"total": s.total_steps // s.inner_steps, "quorum": s.workers},
            "defence": {"enabled": False},
        }
    )


def _sequential(
    config: RunConfig,
    shards: Mapping[str, np.ndarray],
    train_ids: Sequence[str],
    workers: int,
    evals: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> float:
    """Train one AdamW run for total_steps on `workers` workers' batches per step; eval loss."""
    # One global batch of data-parallel training: the N workers' batches side by side.
    batches = global_batches(config, workers, shards, train_ids, rank_prefix="peer-")
    trainer = LocalTrainer(config.model, config.inner)
    trainer.train(initial_state(config.model), batches, max_steps=config.inner.total_steps)
    return evaluate(config.model, trainer.current_state(), evals)


def bench_data(
    config: RunConfig, s: AlgoSetting
) -> tuple[DataManifest, dict[str, np.ndarray], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The corpus (packed if needed), its shards and the evaluation batches every method of
    setting `s` is scored on."""
    manifest = ensure_packed_for(config.data)
    shards = load_shards(manifest, Path(config.data.dir))
    evals = eval_batches(
        shards,
        manifest.val_ids,
        batch_size=32,
        context=s.context,
        n_batches=s.eval_batches,
        seed=config.data.seed,
    )
    return manifest, shards, evals


def run_algo_bench(quick: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the five methods and return the benchmark's JSON document."""
    s = QUICK if quick else FULL
    base = bench_config(s)
    torch.set_num_threads(base.inner.threads)
    manifest, shards, evals = bench_data(base, s)
    params = count_params(base.model)
    ring = 2 * (s.workers - 1) / s.workers * 4 * params
    methods: dict[str, dict[str, Any]] = {}

    def record(name: str, loss: float, sent: float, started: float) -> None:
        methods[name] = {
            "eval_loss": loss,
            "bytes_per_worker": int(sent),
            "steps": s.total_steps,
            "seconds": round(time.monotonic() - started, 1),
        }
        log(f"{name:12s} eval loss {loss:.4f}  bytes sent per worker {int(sent):,}")

    t0 = time.monotonic()
    record("single", _sequential(base, shards, manifest.train_ids, 1, evals), 0, t0)
    t0 = time.monotonic()
    loss = _sequential(base, shards, manifest.train_ids, s.workers, evals)
    record("ddp", loss, ring * s.total_steps, t0)
    for name, codec, outer, state in (
        ("diloco", "fp32", "nesterov", "published"),
        ("diloco_int8", "int8", "nesterov", "published"),
        ("diloco_topk", "topk2bit", "error_feedback", "published"),
        ("diloco_int8_kept_state", "int8", "nesterov", "kept"),
        ("diloco_int8_fresh_state", "int8", "nesterov", "fresh"),
    ):
        t0 = time.monotonic()
        cfg = bench_config(s, codec, outer, state)
        res = run_swarm(cfg, s.workers, eval_batch_count=s.eval_batches, eval_batch_size=32)
        sent = sum(r.bytes_up for r in res.rounds) / s.workers
        record(name, res.final_eval_loss, sent, t0)
    return {
        "methods": methods,
        "config": {
            "quick": quick,
            "workers": s.workers,
            "inner_steps_H": s.inner_steps,
            "steps_per_worker": s.total_steps,
            "rounds": s.total_steps // s.inner_steps,
            "params": params,
            "model": base.model.model_dump(mode="json"),
            "batch_size_per_worker": s.batch_size,
            "inner": base.inner.model_dump(mode="json"),
            "outer": base.outer.model_dump(mode="json"),
            "eval_batches": s.eval_batches,
            "corpus": base.data.source,
            "torch_threads": base.inner.threads,
        },
    }
