"""The simulator's report: time to target, available FLOP, efficiency, JSON report, plots."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from crowdtrain.sim.report import (
    Curve,
    PlotUnavailable,
    available_flop,
    build_report,
    curve_from_rounds,
    default_target,
    efficiency,
    plot_report,
    render_markdown,
    render_table,
    time_to_target,
)

EFF = {"a": 1e12, "b": 3e12}  # total 4e12 FLOP/s
PER_PEER = {
    "a": {"utilization": 0.5, "bytes_up": 100.0, "bytes_down": 400.0},
    "b": {"utilization": 0.9, "bytes_up": 300.0, "bytes_down": 500.0},
}


def swarm(times: list[float] | None = None) -> Curve:
    return Curve("swarm", times or [0.0, 100.0, 200.0, 300.0], [5.0, 4.0, 3.0, 2.5])


def dc() -> Curve:
    return Curve("datacenter", [0.0, 50.0, 100.0], [5.0, 3.0, 2.0])


def wan() -> Curve:
    return Curve("ddp-wan", [0.0, 1000.0, 2000.0], [5.0, 4.0, 3.0])


def report(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "eff": EFF,
        "online": None,
        "per_peer": PER_PEER,
        "target_loss": 3.0,
    }
    args.update(kw)
    ddp_wan = args.pop("ddp_wan", wan())
    return build_report("tiny", swarm(), dc(), ddp_wan, **args)


# --- curves ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("times", "losses", "words"),
    [
        ([0.0, 1.0], [1.0], "2 times but 1"),
        ([], [], "at least one"),
        ([0.0, 2.0, 1.0], [3.0, 2.0, 1.0], "non-decreasing"),
        ([-1.0], [1.0], "non-negative"),
        ([0.0, math.inf], [2.0, 1.0], "finite"),
        ([0.0, math.nan], [2.0, 1.0], "finite"),
    ],
)
def test_bad_curves_are_refused(times: list[float], losses: list[float], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Curve("m", times, losses)


def test_curve_needs_a_method_and_accepts_tuples() -> None:
    with pytest.raises(ValueError, match="method name"):
        Curve("", [0.0], [1.0])
    c = Curve("m", (0, 1), (2, 1))  # type: ignore[arg-type]
    assert c.times_s == [0.0, 1.0] and c.eval_loss == [2.0, 1.0] and c.name == "m"


def test_curve_from_rounds_starts_at_time_zero() -> None:
    rounds = [{"close_time_s": 10.0, "eval_loss": 4.0}, {"close_time_s": 25.0, "eval_loss": 3.0}]
    c = curve_from_rounds(rounds, 5.0)
    assert c.method == "swarm" and c.times_s == [0.0, 10.0, 25.0]
    assert c.eval_loss == [5.0, 4.0, 3.0]


# --- time to target --------------------------------------------------------------------------


def test_time_to_target_exact_hit() -> None:
    assert time_to_target(swarm(), 4.0) == 100.0


def test_time_to_target_interpolates_between_evaluations() -> None:
    assert time_to_target(swarm(), 3.5) == pytest.approx(150.0)
    assert time_to_target(swarm(), 2.75) == pytest.approx(250.0)


def test_time_to_target_never() -> None:
    assert time_to_target(swarm(), 2.0) is None


def test_time_to_target_first_crossing_of_a_non_monotone_curve() -> None:
    c = Curve("m", [0.0, 10.0, 20.0, 30.0, 40.0], [5.0, 3.0, 6.0, 2.0, 1.0])
    assert time_to_target(c, 4.0) == pytest.approx(5.0)  # not the second crossing at 20..30


def test_target_above_initial_loss_is_reached_at_zero() -> None:
    assert time_to_target(swarm(), 9.0) == 0.0


def test_diverged_points_never_reach_and_do_not_interpolate() -> None:
    c = Curve("m", [0.0, 10.0, 20.0], [5.0, math.nan, 1.0])
    assert time_to_target(c, 3.0) == 20.0
    with pytest.raises(ValueError, match="NaN"):
        time_to_target(c, math.nan)


def test_default_target_rounds_the_final_loss_up() -> None:
    assert default_target(Curve("s", [0.0, 1.0], [5.0, 2.12341])) == 2.1235
    assert default_target(Curve("s", [0.0, 1.0], [5.0, 2.1234])) == 2.1234
    c = Curve("s", [0.0, 1.0], [5.0, 0.30000000000000004])
    assert default_target(c, dc()) >= c.eval_loss[-1]
    assert time_to_target(c, default_target(c)) is not None
    with pytest.raises(ValueError, match="target"):
        default_target(Curve("s", [0.0, 1.0], [5.0, math.nan]))


# --- available FLOP and efficiency -----------------------------------------------------------


def test_available_flop_always_online() -> None:
    assert available_flop(EFF, None, 10.0) == pytest.approx(4e13)
    assert available_flop(EFF, None, 0.0) == 0.0


def test_available_flop_with_churn_and_inf_ends() -> None:
    online = {
        "a": [(0.0, 4.0), (6.0, math.inf)],  # up to 10 s: 4 + 4 = 8 s online
        "b": [(5.0, 7.0), (20.0, math.inf)],  # up to 10 s: 2 s online
    }
    expected = 1e12 * 8 + 3e12 * 2
    assert available_flop(EFF, online, 10.0) == pytest.approx(expected)
    # a peer the schedule leaves out is always online
    assert available_flop(EFF, {"b": [(0.0, 1.0)]}, 10.0) == pytest.approx(1e13 + 3e12)
    with pytest.raises(ValueError, match="no effective speed"):
        available_flop(EFF, {"z": [(0.0, 1.0)]}, 1.0)
    with pytest.raises(ValueError, match="finite"):
        available_flop(EFF, None, math.inf)


def test_efficiency_without_churn_is_the_wall_clock_ratio() -> None:
    e = efficiency(swarm(), dc(), 3.0, eff=EFF, online=None)
    assert e.time_s == 200.0 and e.datacenter_time_s == 50.0
    assert e.wall_clock_ratio == pytest.approx(0.25)
    assert e.efficiency == pytest.approx(0.25)
    assert e.datacenter_flop == pytest.approx(4e12 * 50)


def test_offline_time_is_not_counted_against_the_swarm() -> None:
    online = {"a": [(0.0, math.inf)], "b": [(0.0, 50.0), (150.0, math.inf)]}  # b away 100 s
    e = efficiency(swarm(), dc(), 3.0, eff=EFF, online=online)
    assert e.wall_clock_ratio == pytest.approx(0.25)
    assert e.efficiency == pytest.approx(4e12 * 50 / (4e12 * 200 - 3e12 * 100))
    assert e.efficiency is not None and e.efficiency > 0.25


def test_efficiency_is_none_when_a_curve_never_reaches_the_target() -> None:
    assert efficiency(swarm(), dc(), 2.2, eff=EFF, online=None).efficiency is None
    assert efficiency(dc(), swarm(), 2.2, eff=EFF, online=None).efficiency is None
    at_zero = efficiency(swarm(), dc(), 9.0, eff=EFF, online=None)
    assert at_zero.efficiency is None and at_zero.wall_clock_ratio is None


# --- the report ------------------------------------------------------------------------------


def test_report_has_the_issue_keys_and_round_trips_through_strict_json() -> None:
    r = report()
    for key in (
        "scenario",
        "efficiency_vs_datacenter",
        "utilization",
        "time_to_target_s",
        "bytes_per_peer",
        "ddp_wan_efficiency",
        "target_loss",
        "wall_clock_ratio",
        "curves",
        "extrapolated",
        "notes",
    ):
        assert key in r
    assert json.loads(json.dumps(r, allow_nan=False)) == r
    assert r["time_to_target_s"] == {"swarm": 200.0, "datacenter": 50.0, "ddp-wan": 2000.0}
    assert r["efficiency_vs_datacenter"] == pytest.approx(0.25)
    assert r["ddp_wan_efficiency"] == pytest.approx(0.025)
    assert r["efficiency"]["datacenter"] == pytest.approx(1.0)
    assert r["wall_clock_ratio"]["ddp-wan"] == pytest.approx(0.025)
    util = r["utilization"]
    assert (util["median"], util["min"], util["max"], util["mean"]) == pytest.approx(
        (0.7, 0.5, 0.9, 0.7)
    )
    assert util["per_peer"] == [
        {"peer_id": "a", "utilization": 0.5},
        {"peer_id": "b", "utilization": 0.9},
    ]
    assert r["bytes_per_peer"] == {
        "median": 650.0,
        "max": 800.0,
        "median_up": 200.0,
        "median_down": 450.0,
    }
    assert r["extrapolated"] is False


def test_report_without_ddp_wan_has_null() -> None:
    r = report(ddp_wan=None)
    assert r["ddp_wan_efficiency"] is None and r["roles"]["ddp_wan"] is None
    assert set(r["curves"]) == {"swarm", "datacenter"}
    json.dumps(r, allow_nan=False)


def test_report_default_target_unreached_and_non_finite_values_are_null() -> None:
    diverged = Curve("ddp-wan", [0.0, 10.0], [5.0, math.inf], extrapolated=True)
    per_peer = {"a": {"utilization": math.nan, "bytes_up": 0.0, "bytes_down": 0.0}}
    r = report(ddp_wan=diverged, per_peer=per_peer, target_loss=None, notes=["hello"])
    assert r["target_loss"] == 2.5 and r["target_loss_source"] == "swarm_final_loss"
    assert r["time_to_target_s"]["datacenter"] == pytest.approx(75.0)
    assert r["time_to_target_s"]["ddp-wan"] is None and r["ddp_wan_efficiency"] is None
    assert r["curves"]["ddp-wan"]["eval_loss"] == [5.0, None]
    assert r["utilization"]["median"] is None
    assert r["extrapolated"] is True
    assert r["notes"][0] == "hello" and any("never reached" in n for n in r["notes"])
    json.dumps(r, allow_nan=False)


def test_report_refuses_duplicate_methods_and_missing_stats() -> None:
    with pytest.raises(ValueError, match="distinct"):
        build_report(
            "x", swarm(), Curve("swarm", [0.0], [1.0]), None, eff=EFF, online=None, per_peer={}
        )
    with pytest.raises(ValueError, match="bytes_up"):
        report(per_peer={"a": {"utilization": 1.0}})


def test_render_table_one_row_per_method() -> None:
    rows = render_table(report())
    assert rows[0] == ["method", "time to target", "efficiency", "wall-clock ratio"]
    assert rows[1] == ["swarm", "0:03:20", "25%", "0.25×"]
    assert rows[2] == ["datacenter", "0:00:50", "100%", "1×"]
    assert rows[3] == ["ddp-wan", "0:33:20", "2.5%", "0.025×"]
    never = render_table(report(target_loss=2.2))
    assert never[1][1:] == ["never", "—", "—"]
    md = render_markdown(report())
    assert md.splitlines()[1] == "| --- | --- | --- | --- |" and len(md.splitlines()) == 5


# --- plots -----------------------------------------------------------------------------------


def test_plots_write_two_png_files(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    paths = plot_report(report(), tmp_path / "plots")
    assert [p.name for p in paths] == ["loss_vs_time.png", "utilization.png"]
    for p in paths:
        assert p.read_bytes().startswith(b"\x89PNG") and p.stat().st_size > 1000


def test_plots_with_log_time_axis_and_many_peers(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    slow = Curve("ddp-wan", [0.0, 1e5, 2e5], [5.0, 4.0, 3.0], extrapolated=True)
    per_peer = {
        f"p{i}": {"utilization": (i % 97) / 97, "bytes_up": 1.0, "bytes_down": 2.0}
        for i in range(300)
    }
    paths = plot_report(report(ddp_wan=slow, per_peer=per_peer), tmp_path)
    assert all(p.stat().st_size > 1000 for p in paths)


def test_plot_unavailable_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotUnavailable, match=r"pip install 'crowdtrain\[plot\]'"):
        plot_report(report(), tmp_path)
    assert not list(tmp_path.iterdir())
