"""`crowdtrain bench coordinator` on a tiny model: the documented JSON, both moment states,
newcomers and established peers."""

from __future__ import annotations

import pytest

from crowdtrain.benchmarks.coordinator import PHASES, run_coordinator_bench


@pytest.mark.parametrize(("state", "established"), [("derived", True), ("published", False)])
def test_the_benchmark_reports_every_phase_and_the_floor(state: str, established: bool) -> None:
    lines: list[str] = []
    doc = run_coordinator_bench(
        params="tiny",
        contributions=3,
        workers=1,
        rounds=2,
        log=lines.append,
        state=state,
        established=established,
    )
    assert (doc["size"], doc["contributions"], doc["optimizer_state"]) == ("tiny", 3, state)
    assert doc["established"] is established and len(doc["rounds"]) == 2
    assert set(doc["phases"]) == set(PHASES)
    assert all(doc["phases"][p]["s"] >= 0 for p in PHASES)
    assert doc["floor_s"] > 0 and doc["ratio_to_floor"] > 0
    assert doc["close_after_last_s"] > 0 and doc["peak_rss_mb"] > 0
    # the close's steps: the next base's moments are timed either way
    assert {"aggregate_s", "outer_s", "broadcast_s", "moments_s"} <= set(doc["close_steps"])
    assert any("median per round" in line for line in lines)
