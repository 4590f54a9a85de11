"""bench/load_volunteers.py at a small scale: 20 simulated volunteers for a few seconds against
a live `crowdtrain serve`. Checks the report's structure and that nothing failed; never the
latencies or the wall-clock times (those are the benchmark's to measure, not a test's)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from crowdtrain import codec
from crowdtrain.config import parse_config
from crowdtrain.models import param_shapes

BENCH = Path(__file__).resolve().parents[2] / "bench" / "load_volunteers.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("load_volunteers", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("load_volunteers", module)
    spec.loader.exec_module(module)
    return module


def test_the_uploads_are_valid_int8_payloads_and_never_the_same_bytes() -> None:
    bench = load_bench()
    config = parse_config({"model": {"width": 32, "depth": 1, "heads": 2, "context": 32}})
    shapes = param_shapes(config.model)
    payloads = bench.Payloads(shapes, config.codec)
    rng = np.random.default_rng(0)
    first, second = payloads.make(rng), payloads.make(rng)
    assert first != second
    cap = codec.max_payload_bytes(shapes, config.codec)
    for payload in (first, second):
        codec.validate(payload, shapes, max_bytes=cap)
        decoded = codec.decode(payload, shapes)
        assert set(decoded) == set(shapes)


def test_knee_and_table() -> None:
    bench = load_bench()

    def level(n: int, p99: float) -> dict[str, Any]:
        summary = {"count": 1, "p50_ms": 1.0, "p99_ms": p99, "max_ms": p99}
        return {
            "volunteers": n,
            "requests_per_s": 10.0,
            "routes": {"work": summary},
            "overall": summary,
            "worst_control_p99_ms": p99,
            "errors": {"total": 0},
            "uploads": {"late": 0},
            "rounds_closed": 1,
            "server": {"peak_rss_mb": 300.0, "cpu_cores": 0.5},
            "client": {"loop_lag_p99_ms": 1.0},
        }

    assert bench.knee([level(100, 50.0), level(200, 900.0)]) is None
    assert bench.knee([level(100, 50.0), level(200, 1500.0), level(400, 3000.0)]) == 200
    text = bench.table([level(100, 50.0)])
    assert "volunteers" in text.splitlines()[0] and text.splitlines()[1].split()[0] == "100"


@pytest.mark.slow
def test_twenty_volunteers_against_a_live_coordinator() -> None:
    bench = load_bench()
    settings = bench.Settings(
        volunteers=20,
        seconds=5.0,
        ramp_s=0.5,
        train_s=0.3,
        train_sigma=0.3,
        deadline_s=3.0,
        heartbeat_s=1.0,
    )
    level = bench.run_level(settings)
    assert level["volunteers"] == 20
    assert level["registered"] == 20
    assert level["errors"] == {"total": 0, "by_kind": {}}, level["statuses"]
    assert level["unexpected_refusals"] == {}
    assert level["server"]["logged_errors"] == 0
    assert level["server"]["peak_rss_mb"] > 0
    assert level["uploads"]["accepted"] >= 1
    assert level["orders"]["work"] >= 1
    assert level["rounds_closed"] >= 0
    for route in ("register", "manifest", "heartbeat", "work", "contribution", "blob"):
        summary = level["routes"][route]
        assert summary["count"] >= 1
        assert set(summary) == {"count", "p50_ms", "p99_ms", "max_ms"}
        assert all(isinstance(summary[k], float) for k in ("p50_ms", "p99_ms", "max_ms"))
    assert level["statuses"]["register"] == {"200": 20}
    assert level["requests"] == sum(s["count"] for s in level["routes"].values())
    assert level["worst_control_p99_ms"] >= 0
    assert bench.knee([level]) in (None, 20)
    assert str(20) in bench.table([level])
