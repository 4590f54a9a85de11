"""The simulator's report: time to a target loss, efficiency against the datacenter ideal, plots.

`crowdtrain simulate` runs a volunteer swarm training with DiLoCo rounds (Douillard et al.,
"DiLoCo: Distributed Low-Communication Training of Language Models", 2023, arXiv:2311.08105)
in virtual time, and compares it with two synchronous data-parallel references (DDP; Li et al.,
"PyTorch Distributed", 2020, arXiv:2006.15704) computed by `sim.ddp`: the **datacenter ideal**
(N identical machines with the swarm's mean effective speed, so the same total compute, always
online, unlimited bandwidth) and **ddp-wan** (the same DDP over the volunteers' own links).

Every method is a `Curve`: its eval loss at the virtual times it was evaluated (the swarm at
time 0 and at each round close). This module turns the curves into the numbers of issue 5:

* `time_to_target`: when a curve first reaches the target loss. The loss is only known at
  evaluations; between two evaluations it is taken as linear in time, so the crossing time is
  an estimate, as fine as the evaluations are frequent.
* `efficiency`: the swarm's speed as a fraction of the datacenter ideal with the same total
  compute, in FLOP: what the datacenter spent to reach the target over what the volunteers
  had online until the swarm reached it (see `efficiency` for what it does and does not count).
* `build_report`: the JSON report; `render_table` and `plot_report` present it.

It is pure Python and numpy on plain lists: no torch, and matplotlib only for the plots
(the optional ``plot`` extra).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Curve",
    "Efficiency",
    "PlotUnavailable",
    "available_flop",
    "build_report",
    "curve_from_rounds",
    "default_target",
    "efficiency",
    "plot_report",
    "render_markdown",
    "render_table",
    "time_to_target",
]

Interval = tuple[float, float]
Online = Mapping[str, Sequence[Interval]]

_LOG_X_SPAN = 100.0  # the loss plot's time axis is logarithmic when curves end this far apart


class PlotUnavailable(RuntimeError):
    """The plots need matplotlib, which is not installed."""


@dataclass(frozen=True)
class Curve:
    """One method's eval loss at the virtual times (seconds) it was evaluated.

    Times are finite, non-negative and non-decreasing. A loss may be NaN or infinite (a run
    that diverged); such a point never reaches a target and is written to JSON as null.
    """

    method: str
    times_s: list[float]
    eval_loss: list[float]
    label: str = ""  # for the plot legend; the method name when empty
    extrapolated: bool = False  # part of the curve was extrapolated rather than simulated

    def __post_init__(self) -> None:
        if not self.method:
            raise ValueError("a curve needs a method name")
        times = [float(t) for t in self.times_s]
        losses = [float(v) for v in self.eval_loss]
        if len(times) != len(losses):
            raise ValueError(
                f"curve {self.method} has {len(times)} times but {len(losses)} eval losses; "
                "give one loss per time"
            )
        if not times:
            raise ValueError(f"curve {self.method} needs at least one evaluation")
        t = np.asarray(times)
        if not (np.isfinite(t).all() and (t >= 0).all()):
            raise ValueError(f"curve {self.method}'s times must be finite and non-negative")
        if (np.diff(t) < 0).any():
            raise ValueError(f"curve {self.method}'s times must be in non-decreasing order")
        object.__setattr__(self, "times_s", times)
        object.__setattr__(self, "eval_loss", losses)

    @property
    def name(self) -> str:
        """The legend name: the label, or the method when there is none."""
        return self.label or self.method

    @classmethod
    def from_report(cls, doc: Mapping[str, Any], method: str) -> Curve:
        """METHOD's curve from a `crowdtrain simulate --json` document."""
        c = doc["curves"][method]
        return cls(method, c["times_s"], c["eval_loss"])


def curve_from_rounds(
    rounds: Iterable[Mapping[str, Any]],
    initial_eval_loss: float,
    *,
    method: str = "swarm",
    label: str = "volunteer swarm (DiLoCo)",
) -> Curve:
    """The swarm's curve from `SimResult.rounds` (``close_time_s``, ``eval_loss`` per round)
    and `SimResult.initial_eval_loss` at time 0."""
    rows = list(rounds)
    times = [0.0, *(float(r["close_time_s"]) for r in rows)]
    losses = [float(initial_eval_loss), *(float(r["eval_loss"]) for r in rows)]
    return Curve(method, times, losses, label=label)


def _check_target(target_loss: float) -> float:
    target = float(target_loss)
    if math.isnan(target):
        raise ValueError("the target loss must be a number, not NaN")
    return target


def time_to_target(curve: Curve, target_loss: float) -> float | None:
    """The first virtual time at which `curve` reaches a loss at or below `target_loss`, or
    None if it never does.

    The loss is only known at evaluations. Between the last evaluation above the target and the
    first at or below it, the loss is taken as linear in time and the crossing interpolated:
    an estimate, as fine as the evaluations are frequent. A curve whose first evaluation is
    already at or below the target reaches it at that evaluation's time (0 for a curve that
    starts at 0).
    """
    target = _check_target(target_loss)
    losses = np.asarray(curve.eval_loss)
    (hits,) = np.nonzero(losses <= target)
    if hits.size == 0:
        return None
    i = int(hits[0])
    t1, l1 = curve.times_s[i], curve.eval_loss[i]
    if i == 0:
        return t1
    t0, l0 = curve.times_s[i - 1], curve.eval_loss[i - 1]
    if not math.isfinite(l0):  # no line to draw from a diverged evaluation
        return t1
    return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)


def default_target(swarm: Curve, *references: Curve) -> float:
    """The target loss of the comparison when the scenario gives none: the swarm's final eval
    loss (the loss the run reached), rounded up to 4 decimals so the swarm reaches it.

    The references (the DDP curves) are accepted so a caller can pass every curve, but do not
    change the target: a reference that never reaches it has no time to target.
    """
    del references  # the rule is the swarm's final loss; see the docstring
    final = swarm.eval_loss[-1]
    if not math.isfinite(final):
        raise ValueError(
            f"the swarm's final eval loss is {final}, so there is no default target; give a "
            "target loss"
        )
    rounded = round(final, 4)
    if rounded < final:
        rounded = round(rounded + 1e-4, 4)
    return rounded


def available_flop(eff: Mapping[str, float], online: Online | None, until_s: float) -> float:
    """FLOP the peers had online from time 0 to `until_s`: ∫₀^until Σ_{online i} eff_i dt.

    `eff` maps a peer id to its effective speed (flops × mfu, FLOP/s). `online` maps a peer id
    to its disjoint online intervals ``[start, end)`` (an end may be inf); a peer it leaves out,
    or every peer when it is None, is always online, as in `sim.des.simulate`.
    """
    until = float(until_s)
    if not (math.isfinite(until) and until >= 0):
        raise ValueError(
            f"the time to integrate up to must be finite and non-negative, not {until}"
        )
    speeds = np.asarray([float(v) for v in eff.values()], dtype=np.float64)
    if not (np.isfinite(speeds).all() and (speeds >= 0).all()):
        raise ValueError("every peer's effective speed (FLOP/s) must be finite and non-negative")
    schedule = online or {}
    strangers = sorted(set(schedule) - set(eff))
    if strangers:
        raise ValueError(
            f"the online schedule names peers with no effective speed: {', '.join(strangers[:5])}"
        )
    always = sum(float(v) for pid, v in eff.items() if pid not in schedule)
    pairs = [(float(eff[pid]), a, b) for pid, spans in schedule.items() for a, b in spans]
    if not pairs:
        return always * until
    speed, start, end = (np.asarray(col, dtype=np.float64) for col in zip(*pairs, strict=True))
    if np.isnan(start).any() or np.isnan(end).any():
        raise ValueError("an online interval's start and end must be numbers, not NaN")
    seconds = np.clip(np.minimum(end, until) - np.clip(start, 0.0, until), 0.0, None)
    return always * until + float(np.dot(speed, seconds))


@dataclass(frozen=True)
class Efficiency:
    """One method's efficiency against the datacenter ideal, at one target loss."""

    efficiency: float | None  # datacenter FLOP to target / FLOP available to the method
    wall_clock_ratio: float | None  # T_datacenter / T_method
    time_s: float | None  # the method's time to target
    datacenter_time_s: float | None
    available_flop: float | None  # FLOP online for the method until it reached the target
    datacenter_flop: float | None  # FLOP the datacenter spent until it reached the target


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or not den > 0:
        return None
    return num / den


def efficiency(
    method: Curve,
    datacenter: Curve,
    target_loss: float,
    *,
    eff: Mapping[str, float],
    online: Online | None,
) -> Efficiency:
    """`method`'s speed as a fraction of the datacenter ideal with the same total compute.

    efficiency = (FLOP the datacenter ideal spent to reach the target)
               / (FLOP the volunteers had online until `method` reached the target)
               = Σ_i eff_i × T_dc / available_flop(eff, online, T_method),

    where the datacenter has the same total compute Σ_i eff_i, always online. With every
    volunteer always online this is exactly T_dc / T_method. Offline time is not counted
    against the method (a volunteer that is away donates nothing); everything else that
    keeps online compute from moving the loss is: idle online time, transfers, waiting at
    deadlines, work that lapsed, and the algorithm's own cost per token (DiLoCo's rounds
    against DDP's every-step averaging). The same definition serves the swarm and ddp-wan
    (which runs on the same volunteers). Also returns the plain wall-clock ratio
    T_dc / T_method. Either is None when a curve never reaches the target, or when its
    denominator is zero (the method reached the target at time 0).
    """
    target = _check_target(target_loss)
    t_method = time_to_target(method, target)
    t_dc = time_to_target(datacenter, target)
    total = sum(float(v) for v in eff.values())
    dc_flop = None if t_dc is None else total * t_dc
    avail = None if t_method is None else available_flop(eff, online, t_method)
    return Efficiency(
        efficiency=_ratio(dc_flop, avail),
        wall_clock_ratio=_ratio(t_dc, t_method),
        time_s=t_method,
        datacenter_time_s=t_dc,
        available_flop=avail,
        datacenter_flop=dc_flop,
    )


def _finite(x: float | None) -> float | None:
    """`x` for JSON: None in place of NaN and ±inf."""
    return x if x is not None and math.isfinite(x) else None


def _stat(name: str, peer: str, stats: Mapping[str, float]) -> float:
    if name not in stats:
        raise ValueError(f"peer {peer}'s statistics lack '{name}'")
    return float(stats[name])


def _utilization(per_peer: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    values = {p: _stat("utilization", p, s) for p, s in per_peer.items()}
    util = [u for u in values.values() if math.isfinite(u)]
    return {
        "median": statistics.median(util) if util else None,
        "min": min(util) if util else None,
        "max": max(util) if util else None,
        "mean": statistics.fmean(util) if util else None,
        "per_peer": [{"peer_id": p, "utilization": _finite(u)} for p, u in values.items()],
    }


def _bytes(per_peer: Mapping[str, Mapping[str, float]]) -> dict[str, float | None]:
    up = [_stat("bytes_up", p, s) for p, s in per_peer.items()]
    down = [_stat("bytes_down", p, s) for p, s in per_peer.items()]
    both = [u + d for u, d in zip(up, down, strict=True)]
    if not both:
        return {"median": None, "max": None, "median_up": None, "median_down": None}
    return {
        "median": statistics.median(both),
        "max": max(both),
        "median_up": statistics.median(up),
        "median_down": statistics.median(down),
    }


def _curve_json(curve: Curve) -> dict[str, Any]:
    return {
        "label": curve.name,
        "extrapolated": curve.extrapolated,
        "times_s": list(curve.times_s),
        "eval_loss": [_finite(v) for v in curve.eval_loss],
    }


def build_report(
    scenario: str,
    swarm: Curve,
    datacenter: Curve,
    ddp_wan: Curve | None,
    *,
    eff: Mapping[str, float],
    online: Online | None,
    per_peer: Mapping[str, Mapping[str, float]],
    target_loss: float | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """The simulation's JSON report (issue 5), comparing the swarm with the DDP references.

    `eff` and `online` are the volunteers' effective speeds and online intervals (see
    `available_flop`); `per_peer` is `SimResult.per_peer` (``utilization``, ``bytes_up``,
    ``bytes_down`` of each peer). Without `target_loss`, the target is `default_target`.
    Method-keyed entries use each curve's ``method``; ``roles`` says which method is which.
    Every number is finite or null, so ``json.dumps(report, allow_nan=False)`` works.
    """
    curves = [c for c in (swarm, datacenter, ddp_wan) if c is not None]
    methods = [c.method for c in curves]
    if len(set(methods)) != len(methods):
        raise ValueError(f"the compared curves need distinct method names, not {methods}")
    if not eff:
        raise ValueError("the report needs the effective speed of at least one peer")
    given = target_loss is not None
    target = _check_target(target_loss) if target_loss is not None else default_target(swarm)
    if not math.isfinite(target):
        raise ValueError(f"the target loss must be finite, not {target}")

    results = {
        c.method: efficiency(
            c, datacenter, target, eff=eff, online=None if c is datacenter else online
        )
        for c in curves
    }
    wan = results[ddp_wan.method].efficiency if ddp_wan is not None else None
    auto = [
        "target loss given by the scenario"
        if given
        else "target loss: the swarm's final eval loss, rounded up to 4 decimals",
        *(f"{m} never reached the target loss" for m, r in results.items() if r.time_s is None),
        *(f"{c.name}: part of the curve is extrapolated" for c in curves if c.extrapolated),
    ]
    report: dict[str, Any] = {
        "scenario": scenario,
        "target_loss": target,
        "target_loss_source": "given" if given else "swarm_final_loss",
        "roles": {
            "swarm": swarm.method,
            "datacenter": datacenter.method,
            "ddp_wan": None if ddp_wan is None else ddp_wan.method,
        },
        "efficiency_vs_datacenter": _finite(results[swarm.method].efficiency),
        "ddp_wan_efficiency": _finite(wan),
        "time_to_target_s": {m: _finite(r.time_s) for m, r in results.items()},
        "efficiency": {m: _finite(r.efficiency) for m, r in results.items()},
        "wall_clock_ratio": {m: _finite(r.wall_clock_ratio) for m, r in results.items()},
        "available_flop_to_target": {m: _finite(r.available_flop) for m, r in results.items()},
        "total_flop_per_s": _finite(sum(float(v) for v in eff.values())),
        "utilization": _utilization(per_peer),
        "bytes_per_peer": _bytes(per_peer),
        "curves": {c.method: _curve_json(c) for c in curves},
        "extrapolated": any(c.extrapolated for c in curves),
        "notes": [*(notes or []), *auto],
    }
    return report


def hms(seconds: float | None) -> str:
    """Seconds as h:mm:ss; "never" for None or a time that is not finite."""
    if seconds is None or not math.isfinite(seconds):
        return "never"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _percent(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.3g}%"


def _times(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}×"


def render_table(report: Mapping[str, Any]) -> list[list[str]]:
    """The report's comparison as rows of text, a header first, then one row per method:
    method, time to target (h:mm:ss), efficiency, wall-clock ratio T_dc / T_method."""
    rows = [["method", "time to target", "efficiency", "wall-clock ratio"]]
    for method, curve in report["curves"].items():
        name = method + (" (extrapolated)" if curve["extrapolated"] else "")
        rows.append(
            [
                name,
                hms(report["time_to_target_s"][method]),
                _percent(report["efficiency"][method]),
                _times(report["wall_clock_ratio"][method]),
            ]
        )
    return rows


def render_markdown(report: Mapping[str, Any]) -> str:
    """`render_table` as a markdown table."""
    header, *body = render_table(report)
    lines = [header, ["---"] * len(header), *body]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n"


def plot_report(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write ``loss_vs_time.png`` (eval loss against virtual hours, one line per method, the
    target dashed; the time axis logarithmic, without the points at time 0, when the curves
    end more than 100× apart) and
    ``utilization.png`` (each peer's utilization, sorted, with the median) into `out_dir`.
    Raise `PlotUnavailable` without matplotlib."""
    try:
        import matplotlib

        del matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator, PercentFormatter
    except ImportError:
        raise PlotUnavailable("plots need matplotlib: pip install 'crowdtrain[plot]'") from None

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    fig = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    curves: Mapping[str, Any] = report["curves"]
    ends = [c["times_s"][-1] for c in curves.values() if c["times_s"][-1] > 0]
    log_x = len(ends) > 1 and max(ends) / min(ends) > _LOG_X_SPAN
    for curve in curves.values():
        t = np.asarray(curve["times_s"], dtype=np.float64) / 3600.0
        loss = np.asarray([np.nan if v is None else v for v in curve["eval_loss"]], dtype=float)
        if log_x:
            t, loss = t[t > 0], loss[t > 0]
        label = curve["label"] + (" (extrapolated)" if curve["extrapolated"] else "")
        style = ":" if curve["extrapolated"] else "-"
        ax.plot(t, loss, style, marker="." if t.size < 50 else None, label=label)
    ax.axhline(report["target_loss"], color="grey", linestyle="--", linewidth=1, label="target")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("virtual time (hours" + (", log scale)" if log_x else ")"))
    ax.set_ylabel("eval loss")
    ax.set_title(f"{report['scenario']}: eval loss against virtual time")
    ax.grid(True, alpha=0.3)
    ax.legend()
    loss_path = out / "loss_vs_time.png"
    fig.savefig(loss_path, dpi=120)

    fig = Figure(figsize=(8, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    util = report["utilization"]
    values = sorted(
        (r["utilization"] for r in util["per_peer"] if r["utilization"] is not None), reverse=True
    )
    if values:
        if len(values) <= 200:
            ax.bar(np.arange(len(values)), values, width=0.9)
        else:  # one filled step per peer: the same picture as bars, fast for thousands
            ax.stairs(values, np.arange(len(values) + 1) - 0.5, fill=True)
        median = util["median"]
        ax.axhline(median, color="red", linestyle="--", label=f"median {median:.1%}")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no peers", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(0, max(1.0, *values) if values else 1.0)
    ax.set_xlabel(f"peers, sorted by utilization ({len(values)})")
    ax.set_ylabel("utilization (compute / online time)")
    ax.set_title(f"{report['scenario']}: volunteer utilization")
    util_path = out / "utilization.png"
    fig.savefig(util_path, dpi=120)
    return [loss_path, util_path]
