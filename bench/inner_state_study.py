"""Which published AdamW state keeps most of what persistent inner state buys? (a study)

Usage: .venv/bin/python bench/inner_state_study.py '[{"H": 10, "state": "factored_v"}, ...]'

A bare DiLoCo loop on the quick `bench algo` setting (4 workers, 400 inner steps each, fp32 Δ,
plain mean) with `LocalTrainer`, so the inner state can be varied without the protocol:

- ``fresh``: AdamW from zeros every round (replayable).
- ``kept``: each worker keeps its own AdamW (DiLoCo's setting; not replayable from public data).
- ``mv`` / ``v``: every worker starts round r from the element-wise mean of the workers' end
  moments of round r−1 (first and second, or second only with zero first moments).
- ``factored_v`` / ``factored_mv``: the same with the second moments factored into row and
  column means (Adafactor's form, a few KB), the first moments whole or left out.
- ``factored_v_derived_m``: factored second moments as above, and first moments derived from
  public data: the outer update U = θ_{r−1} − θ_r as the round's mean Adam step,
  m = U / Σ lr_t · (√v̂ + ε) (scaled by "m_scale", default 1).
- ``probe_v_derived_m``: as ``factored_v_derived_m``, but the second moments are estimated on the
  coordinator from "probe" (default 4) clipped gradients at the new θ on training batches of its
  own, factored: nothing travels up from the volunteers.

``probe_v_derived_m`` may set "v_of": ``"workers"`` estimates the second moment of the mean of
the workers' gradients from the probe batches (``train.moments.second_moment``'s `workers`,
the protocol's estimate since it was measured here), ``"mean_grad"`` squares the gradient of the
probe batches pooled into one; by default it is their mean squared gradient (one worker's).
"probe_at": "base" takes the probe gradients at the round's starting θ instead of the new one
(what a coordinator can compute while the round runs, off its close). Each variant may also set
"outer": [lr, momentum] (Nesterov; default plain averaging),
"workers", "seed", "steps" (default 400) and "beta2" (default 0.95, AdamW's β₂ when the study
ran; the config's default is now 0.99). Prints: variant, final eval loss, wall seconds.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import time
from typing import Any

import torch

from crowdtrain.benchmarks.algo import QUICK, bench_config, bench_data
from crowdtrain.config import parse_config
from crowdtrain.models import initial_state
from crowdtrain.outer import TorchOuter
from crowdtrain.sim.ddp import global_batches
from crowdtrain.train import LocalTrainer, evaluate
from crowdtrain.train.moments import EPS, expand, factor, mean_moments, second_moment
from crowdtrain.train.schedule import lr_at


def derive_m(
    published: dict[str, torch.Tensor],
    before: dict[str, torch.Tensor],
    theta: dict[str, torch.Tensor],
    r: int,
    s: Any,
    cfg: Any,
    m_scale: float,
) -> None:
    lrs = sum(lr_at(r * s.inner_steps + i, cfg.inner) for i in range(s.inner_steps))
    v_hat = expand(published, {k: tuple(t.shape) for k, t in theta.items()})
    for k in theta:
        root = v_hat["exp_avg_sq::" + k].sqrt() + EPS
        published["exp_avg::" + k] = (before[k] - theta[k]) * (m_scale / lrs) * root


def run(v: dict[str, Any]) -> float:
    # The study's setting: the quick benchmark as it was when the study ran (400 steps, two
    # torch threads), so its recorded numbers reproduce.
    s = dataclasses.replace(
        QUICK,
        inner_steps=int(v["H"]),
        workers=int(v.get("workers", 4)),
        total_steps=int(v.get("steps", 400)),
    )
    mode = str(v["state"])
    raw = bench_config(s, "fp32", state="kept" if mode == "kept" else "fresh").model_dump(
        mode="json"
    )
    seed = int(v.get("seed", 0))
    raw["data"]["seed"] = seed
    raw["model"]["init_seed"] = seed
    raw["inner"]["threads"] = 2
    raw["inner"]["beta2"] = float(v.get("beta2", 0.95))  # the default when the study ran
    cfg = parse_config(raw)
    torch.set_num_threads(cfg.inner.threads)
    manifest, shards, evals = bench_data(cfg, s)
    lr, mu = v.get("outer", [1.0, 0.0])
    outer = TorchOuter("nesterov" if mu else "sgd", lr=lr, momentum=mu)
    theta = {k: t.clone() for k, t in initial_state(cfg.model).items()}
    streams = [
        global_batches(cfg, 1, shards, manifest.train_ids, rank_prefix=f"peer-{w}-")
        for w in range(s.workers)
    ]
    probe_stream = global_batches(cfg, 1, shards, manifest.train_ids, rank_prefix="probe-")
    own_probes = [
        global_batches(cfg, 1, shards, manifest.train_ids, rank_prefix=f"probe-{w}-")
        for w in range(s.workers)
    ]
    own: list[dict[str, torch.Tensor]] | None = None
    trainers = [LocalTrainer(cfg.model, cfg.inner) for _ in range(s.workers)]
    published: dict[str, torch.Tensor] | None = None
    for r in range(s.total_steps // s.inner_steps):
        deltas, ends = [], []
        for w in range(s.workers):
            start = theta if published is None else {**theta, **published}
            if own is not None:
                start = {**theta, **own[w]}
            c = trainers[w].train(
                start, streams[w], step_offset=r * s.inner_steps, max_steps=s.inner_steps
            )
            deltas.append(c.delta)
            ends.append(trainers[w].end_moments())
        mean = {k: torch.stack([d[k] for d in deltas]).mean(dim=0) for k in theta}
        before = {k: t.clone() for k, t in theta.items()}
        outer.step(theta, mean)
        if mode in ("mv", "v"):
            keep = (
                ends
                if mode == "mv"
                else [{k: t for k, t in e.items() if k.startswith("exp_avg_sq::")} for e in ends]
            )
            published = mean_moments(keep)
        elif mode == "probe_v_derived_m":
            probe = [next(probe_stream) for _ in range(int(v.get("probe", 4)))]
            at = before if v.get("probe_at") == "base" else theta
            if v.get("v_of") == "mean_grad":
                pooled = [(torch.cat([x for x, _ in probe]), torch.cat([y for _, y in probe]))]
                published = factor(second_moment(cfg.model, cfg.inner, at, pooled))
            else:
                workers = s.workers if v.get("v_of") == "workers" else 1
                published = factor(second_moment(cfg.model, cfg.inner, at, probe, workers=workers))
            derive_m(published, before, theta, r, s, cfg, float(v.get("m_scale", 1.0)))
        elif mode == "self_v_derived_m":
            # Each worker's own v at the new θ from one batch split into k micro-batches: the
            # mean of W workers' batches is the mean of k·W micro-batches.
            k = int(v.get("micro", 4))
            own = []
            for w in range(s.workers):
                if v.get("first_batch", False):  # the batch the worker's round starts with
                    x, y = next(streams[w])
                    streams[w] = itertools.chain([(x, y)], streams[w])
                else:
                    x, y = next(own_probes[w])
                micro = list(zip(x.chunk(k), y.chunk(k), strict=True))
                est = second_moment(cfg.model, cfg.inner, theta, micro, workers=k * s.workers)
                mine = factor(est) if v.get("factored", True) else dict(est)
                derive_m(mine, before, theta, r, s, cfg, float(v.get("m_scale", 1.0)))
                own.append(mine)
        elif mode == "probe_v_derived_m" and v.get("probe_at") == "partial":
            # The coordinator's v at θ stepped by the mean of the first half of the round's
            # contributions (what it can compute before the last one arrives).
            half = max(1, s.workers // 2)
            partial = {k: torch.stack([d[k] for d in deltas[:half]]).mean(dim=0) for k in theta}
            guess = {k: t.clone() for k, t in before.items()}
            TorchOuter("sgd", lr=lr, momentum=0.0).step(guess, partial)
            probe = [next(probe_stream) for _ in range(int(v.get("probe", 4)))]
            published = factor(second_moment(cfg.model, cfg.inner, guess, probe, workers=s.workers))
            derive_m(published, before, theta, r, s, cfg, float(v.get("m_scale", 1.0)))
        elif mode.startswith("factored"):
            published = mean_moments([factor(e, first=mode == "factored_mv") for e in ends])
            if mode == "factored_v_derived_m":
                derive_m(published, before, theta, r, s, cfg, float(v.get("m_scale", 1.0)))
    return evaluate(cfg.model, theta, evals)


if __name__ == "__main__":
    for variant in json.loads(sys.argv[1]):
        t = time.time()
        loss = run(variant)
        print(json.dumps(variant), round(loss, 4), round(time.time() - t), flush=True)
