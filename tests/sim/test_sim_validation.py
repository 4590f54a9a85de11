"""The pure parts of the simulator's validation benchmark: no network run, no simulation."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest

from crowdtrain.benchmarks.sim_validation import (
    TOLERANCE,
    RealRun,
    VolunteerRecord,
    build_population,
    build_target,
    close_seconds,
    close_to_upload,
    compare,
    model_path,
    new_shards,
    peer_spec,
    prefill_shards,
    read_run,
    relative_error,
    round_durations,
    round_paths,
    sim_side,
    validation_config,
    verdict,
    volunteer_records,
)
from crowdtrain.config import DataConfig
from crowdtrain.data import ShardRef, assign_shards, ensure_packed_for
from crowdtrain.demo import Link
from crowdtrain.models import count_params
from crowdtrain.sim.des import SimResult
from crowdtrain.sim.network import transfer_time
from crowdtrain.sim.population import flops_per_step, step_seconds
from crowdtrain.store import ContributionRow, DirBlobStore, PeerRow, SqliteStateStore, VersionRow

CONFIG = validation_config(overlap=False, rounds=4, round_seconds=2.0)
FAST = Link(up_mbps=20.0, down_mbps=20.0, latency_ms=50.0)
SLOW = Link(up_mbps=10.0, down_mbps=5.0, latency_ms=100.0)


def record(name: str, link: Link, compute_s: float = 30.0, steps: int = 300) -> VolunteerRecord:
    return VolunteerRecord(name, link, compute_s, steps, 0.6, 1000, 4000, 4)


# --- round durations and close costs --------------------------------------------------------


def test_round_durations_are_the_gaps_between_closes() -> None:
    assert round_durations([100.0, 107.5, 114.0, 122.0]) == [7.5, 6.5, 8.0]
    assert round_durations([5.0]) == []
    with pytest.raises(ValueError, match="must not decrease"):
        round_durations([3.0, 2.0])


def test_close_seconds_count_from_the_last_payload_before_the_close() -> None:
    closes = [10.0, 20.0, 30.0]
    arrivals = [[8.0, 9.5], [18.0, 21.0], []]  # 21.0 came after round 1 closed: a late one
    assert close_seconds(closes, arrivals) == pytest.approx([0.5, 2.0])
    with pytest.raises(ValueError, match="one list of arrivals per round"):
        close_seconds(closes, arrivals[:2])


def test_read_run_takes_closes_arrivals_and_sizes_from_the_coordinator_store(
    tmp_path: Path,
) -> None:
    store = SqliteStateStore(tmp_path / "state.sqlite")
    blobs = DirBlobStore(tmp_path / "blobs", fsync=False)
    weights = blobs.put_bytes(b"w" * 4000)  # the weights blob a volunteer downloads
    with store.transaction():
        for pid in ("a", "b"):
            store.add_peer(PeerRow(pid, pid, f"hash-{pid}", {}, 0.0, 0.0))
        store.add_version(VersionRow(0, -1, weights, None, None, 1.0, {}))
    closes = {0: 100.0, 1: 108.0, 2: 115.0}
    arrived = {(0, "a"): 98.0, (0, "b"): 99.25, (1, "a"): 107.0, (1, "b"): 106.0}
    arrived |= {(2, "a"): 114.5, (2, "b"): 113.0}
    sizes = {"a": 1000, "b": 1002}
    for rnd, closed in closes.items():
        with store.transaction():
            for pid in ("a", "b"):
                sha = blobs.put_bytes(f"{rnd}-{pid}".encode() * sizes[pid])
                at = arrived[rnd, pid]
                os.utime(blobs.local_path(sha), (at, at))
                store.record_contribution(
                    ContributionRow(
                        pid, rnd, "r", sha, 16, 1024, 1, 5.0, 16.0, sizes[pid], at, "accepted"
                    )
                )
            store.record_contribution(  # a refused upload is no payload of the round
                ContributionRow(pid, rnd, "", None, 16, 1024, 1, 5.0, 0.0, 7, closed, "rejected")
            )
            store.add_version(VersionRow(rnd + 1, rnd, weights, None, None, closed, {}))
    store.close()

    run = read_run(tmp_path)
    assert run.close_times == [100.0, 108.0, 115.0]
    assert run.round_durations == [8.0, 7.0]
    assert run.close_s == pytest.approx([0.75, 1.0, 0.5])
    assert run.upload_bytes == 1001  # the median accepted payload
    assert run.download_bytes == 4000
    assert run.peer_ids == {"a": "a", "b": "b"}
    assert run.uploads["a"] == [98.0, 107.0, 114.5]
    assert run.close_to_upload("a") == pytest.approx([7.0, 6.5])
    assert run.close_to_upload("b") == pytest.approx([6.0, 5.0])


def test_read_run_refuses_a_run_without_closed_rounds(tmp_path: Path) -> None:
    SqliteStateStore(tmp_path / "state.sqlite").close()
    with pytest.raises(ValueError, match="closed no round"):
        read_run(tmp_path)


# --- building the simulation from measured inputs -------------------------------------------


def test_target_is_the_real_model_with_the_real_payload_sizes() -> None:
    target = build_target(CONFIG, upload_bytes=932_584, download_bytes=3_468_288)
    params = count_params(CONFIG.model)
    assert target.params == params
    assert target.tokens_per_step == CONFIG.data.batch_size * CONFIG.model.context
    assert target.upload_bytes == 932_584
    assert target.download_bytes == 3_468_288
    assert target.steps_per_proxy_step == 1.0
    assert target.flops_per_step == flops_per_step(params, target.tokens_per_step)


def test_peer_spec_reproduces_the_measured_step_time_on_the_proxy_link() -> None:
    target = build_target(CONFIG, 1000, 4000)
    spec = peer_spec("v1", SLOW, 0.08, target)
    assert spec.peer_id == "v1"
    assert spec.mfu == 1.0
    assert step_seconds(target.flops_per_step, spec) == pytest.approx(0.08)
    assert (spec.up_bps, spec.down_bps) == (10e6, 5e6)
    assert spec.rtt_s == pytest.approx(0.2)  # the proxy delays each direction by 100 ms
    with pytest.raises(ValueError, match="seconds per step must be positive"):
        peer_spec("v1", SLOW, 0.0, target)


def test_population_has_one_peer_per_volunteer_at_its_measured_speed() -> None:
    target = build_target(CONFIG, 1000, 4000)
    records = [record("v0", FAST, 30.0, 300), record("v1", SLOW, 30.0, 200)]
    population = build_population(records, target)
    assert [p.peer_id for p in population] == ["v0", "v1"]
    steps = [step_seconds(target.flops_per_step, p) for p in population]
    assert steps == pytest.approx([0.1, 0.15])


def test_volunteer_records_count_contribution_and_replay_steps() -> None:
    doc = {
        "volunteers": [
            {
                "name": "v0",
                "samples": 16 * 120,
                "verify_steps": 30,
                "compute_s": 15.0,
                "utilization": 0.5,
                "bytes_up": 10,
                "bytes_down": 20,
                "rounds": 4,
            }
        ]
    }
    (rec,) = volunteer_records(doc, {"v0": FAST}, batch_size=16)
    assert rec.steps == 150
    assert rec.step_s == pytest.approx(0.1)
    assert rec.link == FAST
    assert rec.to_json()["step_s"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="trained no step"):
        _ = record("v9", FAST, 1.0, 0).step_s


# --- the simulated side, with the real side's definitions -----------------------------------


def test_sim_side_uses_the_real_definition_of_utilization() -> None:
    target = build_target(CONFIG, 1000, 4000)
    population = build_population([record("v0", FAST), record("v1", SLOW)], target)
    peer = {"steps": 100, "contributions": 3, "bytes_up": 3000, "bytes_down": 12000}
    result = SimResult(
        rounds=[{"close_time_s": t} for t in (10.0, 17.0, 25.0, 31.0)],
        per_peer={
            "v0": {**peer, "compute_s": 15.0, "first_compute_s": 1.0},
            "v1": {**peer, "compute_s": 12.0, "first_compute_s": 2.5},
        },
        virtual_time_s=31.0,
    )
    side = sim_side(result, population)
    assert side["round_durations_s"] == [7.0, 8.0, 6.0]
    assert side["median_round_s"] == 7.0
    v0, v1 = side["volunteers"]["v0"], side["volunteers"]["v1"]
    assert v0["utilization"] == pytest.approx(15.0 / 30.0)
    assert v1["first_compute_s"] == 2.5
    assert v1["utilization"] == pytest.approx(12.0 / 28.5)


# --- relative error and the 20% verdict -----------------------------------------------------


def test_relative_error_is_signed_and_relative_to_the_measurement() -> None:
    assert relative_error(12.0, 10.0) == pytest.approx(0.2)
    assert relative_error(8.0, 10.0) == pytest.approx(-0.2)
    for sim, real in ((1.0, 0.0), (1.0, -1.0), (math.nan, 1.0), (1.0, math.inf)):
        with pytest.raises(ValueError, match="relative error"):
            relative_error(sim, real)


def test_verdict_accepts_up_to_twenty_percent_either_way() -> None:
    assert TOLERANCE == 0.2
    assert verdict(10.0, 11.99)["within_20pct"]
    assert verdict(10.0, 8.01)["within_20pct"]
    assert not verdict(10.0, 12.01)["within_20pct"]
    assert not verdict(10.0, 7.99)["within_20pct"]
    assert verdict(0.5, 0.45) == {
        "real": 0.5,
        "sim": 0.45,
        "rel_error": pytest.approx(-0.1),
        "within_20pct": True,
    }


def test_compare_passes_only_when_every_quantity_agrees() -> None:
    real: dict[str, Any] = {
        "median_round_s": 8.0,
        "volunteers": {"v0": {"utilization": 0.5}, "v1": {"utilization": 0.4}},
    }
    sim: dict[str, Any] = {
        "median_round_s": 8.8,
        "volunteers": {"v0": {"utilization": 0.55}, "v1": {"utilization": 0.45}},
    }
    good = compare(real, sim)
    assert good["within_20pct"]
    assert good["median_round_s"]["rel_error"] == pytest.approx(0.1)
    assert good["utilization"]["v1"]["rel_error"] == pytest.approx(0.125)
    sim["volunteers"]["v1"]["utilization"] = 0.2
    bad = compare(real, sim)
    assert not bad["within_20pct"]
    assert not bad["utilization"]["v1"]["within_20pct"]
    assert bad["utilization"]["v0"]["within_20pct"]


def test_sim_side_gives_a_peer_that_never_computed_no_utilization() -> None:
    target = build_target(CONFIG, 1000, 4000)
    population = build_population([record("v0", FAST)], target)
    peer = {"steps": 0, "contributions": 0, "bytes_up": 0, "bytes_down": 4000, "compute_s": 0.0}
    result = SimResult(
        rounds=[{"close_time_s": 5.0}, {"close_time_s": 9.0}],
        per_peer={"v0": {**peer, "first_compute_s": math.nan}},
        virtual_time_s=9.0,
    )
    v0 = sim_side(result, population)["volunteers"]["v0"]
    assert v0["utilization"] == 0.0
    assert v0["first_compute_s"] is None


# --- where the time goes --------------------------------------------------------------------


def test_close_to_upload_measures_from_the_previous_close() -> None:
    closes = [10.0, 20.0, 30.0]
    assert close_to_upload(closes, [9.0, 17.5, None]) == [7.5]
    assert close_to_upload(closes, [9.0, 17.5, 28.0]) == [7.5, 8.0]
    assert close_to_upload(closes, []) == []


def test_new_shards_counts_the_assigned_shards_not_cached_before() -> None:
    train = [ShardRef(f"{i:064x}", 1000 + i) for i in range(11)]
    ids = [ref.sha256 for ref in train]
    got = new_shards(train, CONFIG, "p-1", rounds=6, cached=set())
    seen: set[str] = set()
    for r, nbytes in enumerate(got):
        assigned = assign_shards(ids, seed=CONFIG.data.seed, round=r, peer="p-1", k=4)
        fresh = set(assigned) - seen
        seen |= fresh
        assert nbytes == sum(1000 + ids.index(sha) for sha in fresh)
    first = assign_shards(ids, seed=CONFIG.data.seed, round=0, peer="p-1", k=4)
    assert got[0] == sum(1000 + ids.index(sha) for sha in first)  # a fresh cache: all 4
    assert sum(got) <= sum(ref.bytes for ref in train)
    assert new_shards(train, CONFIG, "p-1", rounds=6, cached=set(ids)) == [0] * 6


def test_model_path_is_what_the_simulator_charges_a_round_without_overlap() -> None:
    target = build_target(CONFIG, 250_000, 1_000_000)
    spec = peer_spec("v1", SLOW, 0.3, target)  # 2 s budget: 6 whole steps of 0.3 s
    path = model_path(spec, target, CONFIG)
    assert path["download_s"] == pytest.approx(transfer_time(1_000_000, 5e6, 0.2))
    assert path["upload_s"] == pytest.approx(transfer_time(250_000, 10e6, 0.2))
    assert path["compute_s"] == pytest.approx(1.8)


def test_round_paths_set_the_real_round_against_the_simulated_one() -> None:
    target = build_target(CONFIG, 250_000, 1_000_000)
    population = build_population([record("v0", FAST, 30.0, 300)], target)
    run = RealRun([10.0, 20.0, 31.0], [0.5], 250_000, 1_000_000, {"v0": "p-0"})
    run.uploads["v0"] = [9.0, 18.0, 29.0]
    (path,) = round_paths(run, population, target, CONFIG, {"v0": [4000, 2_500_000, 0]}).values()
    charged = sum(model_path(population[0], target, CONFIG).values())
    assert path["real_close_to_upload_s"] == [8.0, 9.0]
    assert path["sim_close_to_upload_s"] == pytest.approx(charged)
    assert path["gap_s"] == pytest.approx(8.5 - charged)
    assert path["new_shard_s"] == pytest.approx([4000 * 8 / 20e6, 1.0, 0.0])


def test_prefill_puts_every_training_shard_in_each_volunteer_cache(
    tmp_path: Path, corpus_file: Path
) -> None:
    data = DataConfig(source=str(corpus_file), dir=str(tmp_path / "data"), shard_bytes=32768)
    config = CONFIG.model_copy(update={"data": data})
    manifest = ensure_packed_for(data)
    prefill_shards(tmp_path / "state", ["v0", "v1"], config)
    for name in ("v0", "v1"):
        cache = tmp_path / "state" / "volunteers" / name / "cache"
        assert sorted(p.name for p in cache.iterdir()) == sorted(manifest.train_ids)
        for ref in manifest.train:
            assert (cache / ref.sha256).stat().st_size == ref.bytes
