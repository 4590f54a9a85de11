"""Coordinator cost per round: receive, validate, aggregate, outer step and persist.

Drives the real `Coordinator` (the HTTP handlers' code path without the socket) with K int8
contributions of a ≥10M-parameter GPT per round on one thread, and reports the wall time of each
phase and the process's peak RSS. Receiving is the blob store write that the upload handler
streams into; validating is decoding the payload with every check (crowdtrain.codec) and
spooling the decoded Δ to disk; closing is robust aggregation fragment by fragment (centered
clipping with bucketing, Karimireddy et al. 2021/2022), DiLoCo's Nesterov outer step and
persisting θ, the outer state and the aggregate, plus the evaluation of the new weights.
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from crowdtrain import codec
from crowdtrain.config import RunConfig, parse_config
from crowdtrain.models import count_params, param_shapes
from crowdtrain.server.coordinator import ContributionMeta, Coordinator


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_coordinator_bench(
    contributions: int = 32, rounds: int = 3, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Time `rounds` rounds of `contributions` int8 uploads each, with the verification
    pipeline on (the default) and off; the benchmark's JSON."""
    torch.set_num_threads(1)
    defended = _time_rounds(contributions, rounds, True, log)
    log("the same without the verification stages (defence.enabled = false):")
    plain = _time_rounds(contributions, rounds, False, log)
    doc = {
        **defended,
        "undefended_rounds": plain["rounds"],
        "undefended_median": plain["median"],
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }
    med, off = doc["median"], plain["median"]
    log(
        f"median per round: {med['total_s']:.2f} s ({med['total_without_eval_s']:.2f} s without "
        f"evaluation), {off['total_s']:.2f} s without the verification stages; peak RSS "
        f"{doc['peak_rss_mb']:.0f} MB"
    )
    return doc


def _config(contributions: int, rounds: int, defended: bool) -> RunConfig:
    # Random deltas carry no signal, so usefulness scoring runs (its cost is measured) but may
    # not refuse them: the timing compares the same aggregation work with and without stages.
    # Spot-checks are replayed by volunteers; here they would only turn work orders into
    # verify orders.
    return parse_config(
        {
            "name": "bench-coordinator",
            "model": {"arch": "gpt", "width": 464, "depth": 4, "heads": 8, "context": 128},
            "codec": {"name": "int8"},
            "inner": {"steps": 8},
            "rounds": {
                "total": rounds + 1,
                "quorum": contributions,
                "deadline_s": 1e6,
                "max_peers_per_round": contributions,
            },
            "defence": {
                "enabled": defended,
                "spot_check": "off",  # replays happen on volunteers, not on this path
                "score_min_gain": -1e9,
                "score_rel_gain": 0.0,
                "score_heldout_tol": 1e9,
            },
        }
    )


def _time_rounds(
    contributions: int, rounds: int, defended: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    config = _config(contributions, rounds, defended)
    shapes = param_shapes(config.model)
    gen = torch.Generator().manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="crowdtrain-bench-") as tmp:
        clock = _Clock()
        coord = Coordinator(config, Path(tmp) / "state", clock=clock, eval_batch_count=2)
        peers = [coord.register(f"peer-{i}", None, {})["peer_id"] for i in range(contributions)]
        for r in range(rounds):
            orders = [coord.work(p) for p in peers]
            assert all(o["kind"] == "work" and o["round"] == r for o in orders)
            receive = validate = 0.0
            for i, peer in enumerate(peers):
                delta = {
                    k: torch.randn(s, generator=gen) * 1e-3 * (1 + i / contributions)
                    for k, s in shapes.items()
                }
                payload = codec.encode(delta, config.codec)
                del delta
                # 8 steps of batch 16 with context 128: a claim the claims stage accepts, and
                # enough steps for usefulness scoring (defence.score_min_steps).
                meta = ContributionMeta(orders[i]["base_version"], 128, 16384, 8, 2.0)
                t0 = time.perf_counter()
                sha = coord.blobs.put_bytes(payload)
                t1 = time.perf_counter()
                if i < contributions - 1:
                    coord.submit(peer, r, meta, sha, len(payload))
                    validate += time.perf_counter() - t1
                else:
                    last = (peer, meta, sha, len(payload))
                receive += t1 - t0
            per_submit = validate / max(1, contributions - 1)
            t0 = time.perf_counter()
            coord.submit(last[0], r, last[1], last[2], last[3])
            close = time.perf_counter() - t0 - per_submit
            validate += per_submit
            assert coord.protocol.version == r + 1, "the round did not close"
            eval_s = coord.last_close_timing.get("eval_s", 0.0)
            row = {
                "round": r,
                "receive_s": receive,
                "validate_s": validate,
                "close_s": close,
                "eval_s": eval_s,
                "total_s": receive + validate + close,
                "total_without_eval_s": receive + validate + close - eval_s,
            }
            rows.append(row)
            log(
                f"round {r}: receive {receive:.2f} s, validate {validate:.2f} s, close "
                f"{close:.2f} s (of which eval {eval_s:.2f} s), total {row['total_s']:.2f} s"
            )
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "round"}
    return {
        "params": count_params(config.model),
        "contributions": contributions,
        "codec": "int8",
        "aggregation": config.aggregation.model_dump(mode="json"),
        "defence": config.defence.model_dump(mode="json"),
        "threads": 1,
        "rounds": rows,
        "median": med,
    }
