"""The algorithm benchmark: every method gets the same lr sweep and seeds; the frontier's table
and plot. Runs a miniature setting end to end (child processes and all)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from crowdtrain.benchmarks.algo import (
    ALL_SHARDS,
    QUICK,
    AlgoSetting,
    Method,
    bench_config,
    best_lr,
    frontier_table,
    plot_frontier,
    run_algo_bench,
    run_frontier,
)


def mini(corpus: Path, data_dir: Path) -> AlgoSetting:
    return AlgoSetting(
        workers=2,
        inner_steps=2,
        total_steps=4,
        width=16,
        depth=1,
        context=16,
        batch_size=2,
        eval_batches=1,
        lrs=(1e-3, 3e-3),
        seeds=(0, 1),
        source=str(corpus),
        data_dir=str(data_dir),
        shard_bytes=8192,
        val_fraction=0.1,
    )


def test_every_method_gets_the_same_data_access_and_seeded_everything() -> None:
    cfg = bench_config(QUICK, "int8", lr=6e-3, seed=3)
    assert cfg.data.shards_per_peer == ALL_SHARDS  # like a data-parallel rank: every shard
    assert (cfg.seed, cfg.data.seed, cfg.model.init_seed) == (3, 3, 3)
    assert cfg.inner.lr == 6e-3 and cfg.inner.threads == 1
    assert cfg.rounds.total == QUICK.total_steps // QUICK.inner_steps


def test_best_lr_skips_diverged_runs_and_says_when_all_diverged() -> None:
    assert best_lr({1e-3: 2.5, 3e-3: math.nan, 6e-3: 2.4}) == 6e-3
    assert best_lr({1e-3: 2.4, 3e-3: 2.4}) == 1e-3
    assert best_lr({1e-3: math.nan}) is None


def test_the_bench_sweeps_each_method_and_repeats_it_on_every_seed(
    corpus_file: Path, tmp_path: Path
) -> None:
    s = mini(corpus_file, tmp_path / "data")
    lines: list[str] = []
    methods = (Method("ddp", "ddp"), Method("diloco_int8", "diloco", "int8"))
    doc = run_algo_bench(setting=s, methods=methods, jobs=2, log=lines.append)
    # 2 methods × 2 rates on seed 0, then each at its best rate on seed 1.
    assert len(lines) == 6
    for row in doc["methods"].values():
        assert set(row["lr_sweep"]) == {"0.001", "0.003"}
        assert row["best_lr"] == best_lr({float(k): v for k, v in row["lr_sweep"].items()})
        seeds = row["eval_loss_by_seed"]
        assert set(seeds) == {"0", "1"}
        assert seeds["0"] == row["lr_sweep"][f"{row['best_lr']:g}"]
        assert row["eval_loss"] == pytest.approx((seeds["0"] + seeds["1"]) / 2, abs=1e-4)
        assert row["eval_loss_spread"] == pytest.approx(abs(seeds["0"] - seeds["1"]), abs=1e-4)
    ddp, diloco = doc["methods"]["ddp"], doc["methods"]["diloco_int8"]
    assert ddp["vs_ddp"] == {"mean": 1.0, "low": 1.0, "high": 1.0}
    assert 0 < diloco["bytes_per_worker"] < ddp["bytes_per_worker"]
    assert diloco["fewer_bytes_than_ddp"] > 1
    with pytest.raises(ValueError, match="ddp"):
        run_algo_bench(setting=s, methods=methods[1:], log=lines.append)


def test_a_failing_run_counts_as_diverged_and_keeps_its_error(
    corpus_file: Path, tmp_path: Path
) -> None:
    s = mini(corpus_file, tmp_path / "data")
    methods = (Method("ddp", "ddp"), Method("broken", "diloco", "no-such-codec"))
    doc = run_algo_bench(setting=dataclasses.replace(s, seeds=(0,)), methods=methods, jobs=2)
    broken = doc["methods"]["broken"]
    assert broken["best_lr"] is None and broken["eval_loss"] is None
    assert set(broken["lr_sweep"].values()) == {None}
    assert len(broken["errors"]) == 2 and "codec" in next(iter(broken["errors"].values()))
    assert doc["methods"]["ddp"]["errors"] == {} and doc["methods"]["ddp"]["eval_loss"] > 0


def test_the_frontier_covers_every_h_and_codec_and_plots(corpus_file: Path, tmp_path: Path) -> None:
    s = mini(corpus_file, tmp_path / "data")
    doc = run_frontier(setting=s, hs=(1, 2), codecs=("fp32", "int8"), jobs=2, log=lambda _: None)
    assert {(p["codec"], p["H"]) for p in doc["points"]} == {
        (c, h) for c in ("fp32", "int8") for h in (1, 2)
    }
    by = {(p["codec"], p["H"]): p for p in doc["points"]}
    # Fewer rounds send fewer bytes; int8 sends about a quarter of fp32.
    assert by[("int8", 2)]["bytes_per_worker"] < by[("int8", 1)]["bytes_per_worker"]
    assert by[("int8", 1)]["bytes_per_worker"] < by[("fp32", 1)]["bytes_per_worker"] / 3
    assert doc["ddp"]["vs_ddp"] == 1.0
    table = frontier_table(doc)
    rows = [line for line in table.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2 and "Data-parallel" in table
    pytest.importorskip("matplotlib")
    png = plot_frontier(doc, tmp_path / "frontier.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="H must be"):
        run_frontier(setting=dataclasses.replace(s), hs=(5,), log=lambda _: None)


def test_the_cli_refuses_a_plot_without_the_frontier(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from crowdtrain.cli import app

    result = CliRunner().invoke(app, ["bench", "algo", "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "--frontier" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x.png").exists()


def test_the_frontier_plot_says_what_is_missing_without_matplotlib(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import sys

    from crowdtrain.sim.report import PlotUnavailable

    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    ref = {"eval_loss": 2.0, "bytes_per_worker": 10}
    doc = {"ddp": ref, "single": ref, "points": [], "config": {}}
    with pytest.raises(PlotUnavailable, match="matplotlib"):
        plot_frontier(doc, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
