"""Compute utilization of volunteers with and without overlapping communication.

Runs the real networked system (coordinator process, volunteer processes, WAN proxies) twice
with identical settings except `inner.overlap`, on links of 20 Mbit/s each way with 100 ms
one-way latency, and reports each volunteer's compute utilization: the fraction of wall time
spent training, from its first step to the end. Overlap is the one-step-delayed update of
Streaming DiLoCo (Douillard et al. 2025, arXiv:2501.18512): upload, round close and download
happen while the volunteer keeps training.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from crowdtrain.codec import max_payload_bytes
from crowdtrain.config import RunConfig, parse_config
from crowdtrain.demo import Link, VolunteerSpec, run_network
from crowdtrain.models import count_params, param_shapes

LINK = Link(up_mbps=20.0, down_mbps=20.0, latency_ms=100.0)


def overlap_config(overlap: bool, rounds: int, round_seconds: float) -> RunConfig:
    """A ~0.8M-parameter GPT, time-budgeted rounds, int8 uploads."""
    return parse_config(
        {
            "name": f"bench-overlap-{'on' if overlap else 'off'}",
            "model": {"arch": "gpt", "width": 128, "depth": 4, "heads": 4, "context": 64},
            "data": {"batch_size": 16},
            "inner": {
                "budget": "seconds",
                "seconds": round_seconds,
                "total_steps": 4000,
                "threads": 1,
                "overlap": overlap,
            },
            "codec": {"name": "int8"},
            "rounds": {"total": rounds, "quorum": 2, "deadline_s": 10 * round_seconds},
        }
    )


def run_overlap_bench(
    quick: bool = False, console: Console | None = None, root: Path = Path("runs")
) -> dict[str, Any]:
    """Both settings, one after the other; the benchmark's JSON document."""
    console = console or Console()
    rounds, seconds = (6, 4.0) if quick else (12, 6.0)
    results: dict[str, Any] = {}
    for overlap in (False, True):
        cfg = overlap_config(overlap, rounds, seconds)
        specs = [VolunteerSpec(f"v{i}", LINK) for i in range(2)]
        state = (root / time.strftime(f"bench-overlap-{overlap}-%Y%m%d-%H%M%S")).resolve()
        doc = run_network(cfg, specs, state, console=console, live=False)
        utils = [v["utilization"] for v in doc["volunteers"]]
        results["on" if overlap else "off"] = {
            "utilization": utils,
            "median_utilization": statistics.median(utils),
            "rounds_completed": doc["rounds_completed"],
            "wall_s": doc["wall_s"],
            "eval_loss_end": doc["eval_loss_end"],
            "volunteers": doc["volunteers"],
        }
        console.print(
            f"overlap {'on ' if overlap else 'off'}: utilization "
            + ", ".join(f"{u:.1%}" for u in utils)
        )
    cfg = overlap_config(True, rounds, seconds)
    shapes = param_shapes(cfg.model)
    upload = max_payload_bytes(shapes, cfg.codec)
    download = 4 * count_params(cfg.model)
    transfer_s = (upload + download) * 8 / (LINK.up_mbps * 1e6) + 4 * LINK.latency_ms / 1e3
    return {
        "link": {
            "up_mbps": LINK.up_mbps,
            "down_mbps": LINK.down_mbps,
            "latency_ms": LINK.latency_ms,
        },
        "round_compute_s": seconds,
        "rounds": rounds,
        "params": count_params(cfg.model),
        "upload_bytes_per_round": upload,
        "download_bytes_per_round": download,
        "transfer_s_per_round_estimate": round(transfer_s, 3),
        "overlap": results,
    }
