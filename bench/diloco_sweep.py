"""Sweep DiLoCo settings on the quick algorithm-benchmark setting (one line per variant).

Usage: .venv/bin/python bench/diloco_sweep.py '[{"H": 50, "set": {"outer": {"lr": 1.0}}}]'
Each variant may set H (inner steps per round), workers, seed (as `bench algo`'s seeds: initial
weights, data order and evaluation batches), steps (inner steps per worker; the
sweeps recorded in docs/BENCHMARKS.md before the quick setting changed ran 400), codec, outer
(optimizer name), and "set":
{section: {key: value}} overrides of the run config; {"ddp": true, "workers": N} runs the
data-parallel reference on N workers' batches instead (as `crowdtrain bench algo` does). Prints:
variant, final eval loss, bytes uploaded per worker (0 for ddp), wall seconds.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from crowdtrain.benchmarks.algo import QUICK, _sequential, bench_config, bench_data
from crowdtrain.config import parse_config
from crowdtrain.sim.swarm import run_swarm


def main(variants: list[dict[str, object]]) -> None:
    for v in variants:
        s = dataclasses.replace(
            QUICK,
            inner_steps=int(v.get("H", QUICK.inner_steps)),  # type: ignore[call-overload]
            workers=int(v.get("workers", QUICK.workers)),  # type: ignore[call-overload]
            total_steps=int(v.get("steps", QUICK.total_steps)),  # type: ignore[call-overload]
        )
        cfg = bench_config(
            s,
            str(v.get("codec", "fp32")),
            str(v.get("outer", "nesterov")),
            seed=int(v.get("seed", 0)),  # type: ignore[call-overload]
        )
        raw = cfg.model_dump(mode="json")
        for section, update in dict(v.get("set", {})).items():  # type: ignore[call-overload]
            if "keep_optimizer_state" in update:  # the older name of inner.optimizer_state
                raw[section].pop("optimizer_state", None)
            raw[section].update(update)
        cfg = parse_config(raw)
        t = time.time()
        if v.get("ddp"):
            manifest, shards, evals = bench_data(cfg, s)
            loss = _sequential(cfg, shards, manifest.train_ids, s.workers, evals)
            print(json.dumps(v), round(loss, 4), 0, round(time.time() - t), flush=True)
            continue
        res = run_swarm(cfg, s.workers, eval_batch_count=s.eval_batches, eval_batch_size=32)
        sent = sum(r.bytes_up for r in res.rounds) // s.workers
        print(
            json.dumps(v), round(res.final_eval_loss, 4), sent, round(time.time() - t), flush=True
        )


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
