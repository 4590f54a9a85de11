"""What watching a run costs the coordinator: a dashboard poll, /metrics, the generated sample.

Builds a coordinator for the demo's model (GPT width 96, depth 3, context 64) in a temporary
state directory, registers PEERS volunteers, and closes ROUNDS rounds through the HTTP API
(in-process, fastapi.testclient) with synthetic int8 contributions. Then it times, on one
thread, the median of N calls to GET /v1/dashboard (sample cached), GET /metrics, and the
generation of a new sample (160 bytes after "def "), and prints the dashboard document's size,
both in full (a page's first poll) and with `?since=` the latest version (every later poll).

    .venv/bin/python bench/dashboard_cost.py [--peers 8] [--rounds 20] [--calls 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from crowdtrain import codec
from crowdtrain.demo import demo_config
from crowdtrain.models import param_shapes
from crowdtrain.server.app import create_app
from crowdtrain.server.coordinator import Coordinator


def median_ms(calls: int, fn: object) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = demo_config(rounds=args.rounds + 1, round_seconds=6.0)
    config = base.model_copy(update={"defence": base.defence.model_copy(update={"enabled": False})})
    shapes = param_shapes(config.model)
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        coordinator = Coordinator(config, Path(tmp) / "state", admin_token="x")
        with TestClient(create_app(coordinator)) as client:
            peers = []
            for i in range(args.peers):
                doc = client.post("/v1/register", json={"name": f"volunteer-{i}"}).json()
                peers.append({"Authorization": f"Bearer {doc['token']}"})
            t0 = time.perf_counter()
            for rnd in range(args.rounds):
                for auth in peers:
                    order = client.post("/v1/work", headers=auth).json()
                    assert order["kind"] == "work", order
                for auth in peers:
                    delta = {k: torch.randn(s, generator=gen) * 1e-3 for k, s in shapes.items()}
                    meta = {
                        "base_version": rnd,
                        "samples": 160,
                        "tokens": 160 * 64,
                        "steps": 10,
                        "train_loss": 3.0,
                        "compute_s": 5.0,
                        "wall_s": 6.0,
                    }
                    r = client.put(
                        f"/v1/contributions/{rnd}",
                        content=codec.encode(delta, config.codec),
                        headers={**auth, "X-Crowdtrain-Meta": json.dumps(meta)},
                    )
                    assert r.status_code == 200, r.text
            build_s = time.perf_counter() - t0
            assert coordinator.protocol.version == args.rounds
            for _ in range(12):  # ticks sample the peers-online and bandwidth series
                coordinator.timeline.sample(time.time() + 5 * _, args.peers, 1e6 * _, 2e6 * _)
            body = client.get("/v1/dashboard").content
            poll = median_ms(args.calls, lambda: client.get("/v1/dashboard"))
            latest = f"/v1/dashboard?since={args.rounds}"  # what the page asks after its first poll
            small = client.get(latest).content
            poll_since = median_ms(args.calls, lambda: client.get(latest))
            metrics = median_ms(args.calls, lambda: client.get("/metrics"))

            def fresh_sample() -> None:
                coordinator.samples.current = None
                coordinator.samples.get(args.rounds, lambda: coordinator.protocol.params)

            sample = median_ms(max(5, args.calls // 10), fresh_sample)
    print(f"setup: {args.peers} peers, {args.rounds} rounds closed in {build_s:.1f} s")
    print(f"GET /v1/dashboard (sample cached): median {poll:.2f} ms, {len(body):,} bytes")
    print(f"GET /v1/dashboard?since=latest: median {poll_since:.2f} ms, {len(small):,} bytes")
    print(f"GET /metrics: median {metrics:.2f} ms")
    print(f"new sample (160 bytes, once per version): median {sample:.1f} ms")
    per_core = 1000.0 / poll_since
    print(
        f"one core answers {per_core:.0f} later polls/s: "
        f"{per_core * 2:.0f} viewers polling every 2 s"
    )


if __name__ == "__main__":
    main()
