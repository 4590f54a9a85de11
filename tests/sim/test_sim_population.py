"""The simulator's population: distributions, TOML parsing, peers, churn and compute time."""

from __future__ import annotations

import itertools
import math
import tomllib
from typing import Any

import numpy as np
import pytest
import tomli_w
from pydantic import ValidationError

from crowdtrain.config import ConfigError
from crowdtrain.sim.population import (
    Choice,
    Fixed,
    LogNormal,
    Pareto,
    PeerSpec,
    PopulationConfig,
    Uniform,
    churn_schedule,
    draw_population,
    flops_per_step,
    online_fraction,
    parse_population,
    step_seconds,
)

N = 200_000


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


EXAMPLES = [
    Fixed(value=3.5),
    Uniform(low=-1.0, high=4.0),
    LogNormal(median=50e6, sigma=0.8),
    Pareto(scale=2.0, alpha=3.0),
    Choice(values=(1.0, 10.0, 100.0), weights=(0.5, 0.3, 0.2)),
]


# --- distributions -------------------------------------------------------------------------


@pytest.mark.parametrize("dist", EXAMPLES, ids=lambda d: d.kind)
def test_sample_shape_dtype_and_determinism(dist: Any) -> None:
    a = dist.sample(rng(7), 1000)
    assert a.shape == (1000,) and a.dtype == np.float64
    assert np.array_equal(a, dist.sample(rng(7), 1000))
    assert dist.sample(rng(7), 0).shape == (0,)
    lo, hi, _ = dist.support()
    assert a.min() >= lo and a.max() <= hi
    if not isinstance(dist, Fixed):
        assert not np.array_equal(a, dist.sample(rng(8), 1000))


@pytest.mark.parametrize("dist", EXAMPLES, ids=lambda d: d.kind)
def test_large_sample_mean_matches_mean(dist: Any) -> None:
    a = dist.sample(rng(1), N)
    assert a.mean() == pytest.approx(dist.mean(), rel=0.02, abs=0.02)


@pytest.mark.parametrize("n", [-1, 2.5, True])
def test_sample_rejects_bad_sizes(n: Any) -> None:
    with pytest.raises(ValueError, match="sample size"):
        Uniform(low=0, high=1).sample(rng(), n)


def test_fixed_is_constant_and_may_be_infinite() -> None:
    assert np.array_equal(Fixed(value=2.0).sample(rng(), 5), np.full(5, 2.0))
    assert np.all(np.isinf(Fixed(value=math.inf).sample(rng(), 3)))
    assert Fixed(value=math.inf).mean() == math.inf


def test_uniform_statistics() -> None:
    a = Uniform(low=2.0, high=5.0).sample(rng(), N)
    assert a.min() >= 2.0 and a.max() < 5.0
    assert a.var() == pytest.approx(9 / 12, rel=0.02)
    assert np.mean(a < 3.0) == pytest.approx(1 / 3, abs=0.01)


def test_lognormal_statistics() -> None:
    d = LogNormal(median=50e6, sigma=0.8)
    a = d.sample(rng(), N)
    assert a.min() > 0
    assert np.median(a) == pytest.approx(50e6, rel=0.02)
    assert np.log(a).std() == pytest.approx(0.8, rel=0.02)
    assert d.mean() == pytest.approx(50e6 * math.exp(0.32))
    assert np.all(LogNormal(median=3.0, sigma=0.0).sample(rng(), 10) == pytest.approx(3.0))


def test_pareto_is_type_one_with_heavy_tail() -> None:
    d = Pareto(scale=2.0, alpha=1.5)
    a = d.sample(rng(), N)
    assert a.min() >= 2.0
    assert np.median(a) == pytest.approx(2.0 * 2 ** (1 / 1.5), rel=0.02)
    for x in (4.0, 20.0):  # survival function (scale / x)^alpha
        assert np.mean(a > x) == pytest.approx((2.0 / x) ** 1.5, rel=0.05)
    assert d.mean() == pytest.approx(6.0)
    assert Pareto(scale=1.0, alpha=1.0).mean() == math.inf


def test_choice_frequencies_follow_weights() -> None:
    a = EXAMPLES[4].sample(rng(), N)
    assert set(np.unique(a).tolist()) == {1.0, 10.0, 100.0}
    for value, weight in [(1.0, 0.5), (10.0, 0.3), (100.0, 0.2)]:
        assert np.mean(a == value) == pytest.approx(weight, abs=0.01)


def test_choice_defaults_to_equal_weights_and_ignores_zero_weights() -> None:
    a = Choice(values=(1.0, 2.0)).sample(rng(), N)
    assert np.mean(a == 1.0) == pytest.approx(0.5, abs=0.01)
    c = Choice(values=(-5.0, 3.0, math.inf), weights=(0, 1, 0))
    assert c.support() == (3.0, 3.0, True)
    assert c.mean() == 3.0 and np.all(c.sample(rng(), 100) == 3.0)
    assert Choice(values=(1.0, math.inf)).mean() == math.inf


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (Fixed, {"value": math.nan}),
        (Uniform, {"low": 2.0, "high": 2.0}),
        (Uniform, {"low": 0.0, "high": math.inf}),
        (LogNormal, {"median": 0.0, "sigma": 1.0}),
        (LogNormal, {"median": 1.0, "sigma": -0.1}),
        (Pareto, {"scale": 1.0, "alpha": 0.05}),
        (Pareto, {"scale": -1.0, "alpha": 2.0}),
        (Choice, {"values": ()}),
        (Choice, {"values": (1.0, math.nan)}),
        (Choice, {"values": (1.0, 2.0), "weights": (1.0,)}),
        (Choice, {"values": (1.0, 2.0), "weights": (1.0, -1.0)}),
        (Choice, {"values": (1.0, 2.0), "weights": (0.0, 0.0)}),
        (Fixed, {"value": 1.0, "extra": 2}),
    ],
)
def test_distributions_reject_bad_parameters(cls: Any, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        cls(**kwargs)


def test_distributions_are_frozen() -> None:
    fixed = Fixed(value=1.0)
    with pytest.raises(ValidationError):
        fixed.value = 2.0  # type: ignore[misc]


# --- config and TOML -----------------------------------------------------------------------

SNIPPET = """
[population]
peers = 100
flops = {kind = "pareto", scale = 1e12, alpha = 1.5}
mfu = {kind = "uniform", low = 0.2, high = 0.5}
up_bps = {kind = "lognormal", median = 50e6, sigma = 0.8}
down_bps = 100e6
rtt_s = {kind = "choice", values = [0.02, 0.1], weights = [3, 1]}
session_s = {kind = "lognormal", median = 7200, sigma = 1.0}
offline_s = {kind = "fixed", value = inf}
fail_mid_round = 0.05
"""


def test_toml_snippet_parses() -> None:
    cfg = parse_population(tomllib.loads(SNIPPET)["population"])
    assert cfg.peers == 100
    assert cfg.flops == Pareto(scale=1e12, alpha=1.5)
    assert cfg.mfu == Uniform(low=0.2, high=0.5)
    assert cfg.up_bps == LogNormal(median=50e6, sigma=0.8)
    assert cfg.down_bps == Fixed(value=100e6)  # a bare number is a fixed value
    assert cfg.rtt_s == Choice(values=(0.02, 0.1), weights=(3.0, 1.0))
    assert cfg.offline_s == Fixed(value=math.inf)
    assert cfg.fail_mid_round == 0.05


@pytest.mark.parametrize("raw", [{}, tomllib.loads(SNIPPET)["population"]])
def test_toml_round_trip(raw: dict[str, Any]) -> None:
    cfg = parse_population(raw)
    text = tomli_w.dumps({"population": cfg.model_dump(exclude_none=True)})
    assert parse_population(tomllib.loads(text)["population"]) == cfg


def test_defaults_are_valid_and_sensible() -> None:
    cfg = PopulationConfig()
    assert cfg == parse_population({})
    assert cfg.peers >= 1 and 0 <= cfg.fail_mid_round < 0.5
    assert 0 < online_fraction(cfg) < 1
    peers = draw_population(cfg, 0)
    assert all(0 < p.mfu <= 1 and p.up_bps > 0 and p.down_bps > 0 for p in peers)


@pytest.mark.parametrize(
    ("raw", "key", "words"),
    [
        ({"peers": 0}, "population.peers", "greater than or equal to 1"),
        ({"peers": "many"}, "population.peers", "valid integer"),
        ({"size": 3}, "population.size", "allowed keys here are: down_bps"),
        ({"flops": {"kind": "gauss"}}, "population.flops.kind", "allowed kinds are: fixed"),
        ({"flops": {"median": 1.0}}, "population.flops", "needs a 'kind'"),
        ({"flops": "fast"}, "population.flops", "give a number or a table"),
        ({"flops": True}, "population.flops", "give a number or a table"),
        (
            {"flops": {"kind": "lognormal", "median": 1, "sigma": 1, "mean": 2}},
            "population.flops.mean",
            "allowed keys here are: kind, median, sigma",
        ),
        (
            {"flops": {"kind": "lognormal", "median": -1, "sigma": 1}},
            "population.flops.median",
            "greater than 0",
        ),
        ({"flops": {"kind": "uniform", "low": 3, "high": 2}}, "population.flops", "less than"),
        (
            {"flops": {"kind": "uniform", "low": 0, "high": math.inf}},
            "population.flops.high",
            "finite number",
        ),
        ({"flops": 0}, "population.flops", "must be positive"),
        ({"flops": math.inf}, "population.flops", "must be finite"),
        ({"up_bps": {"kind": "uniform", "low": 0, "high": 1}}, "population.up_bps", "positive"),
        (
            {"down_bps": {"kind": "choice", "values": [1e6, math.inf]}},
            "population.down_bps",
            "can draw inf, but values must be finite",
        ),
        (
            {"flops": {"kind": "pareto", "scale": 1, "alpha": 0.01}},
            "population.flops.alpha",
            "greater than or equal to 0.1",
        ),
        (
            {"mfu": {"kind": "lognormal", "median": 0.4, "sigma": 0.1}},
            "population.mfu",
            "unbounded values, but values must be ≤ 1.0",
        ),
        ({"mfu": 1.5}, "population.mfu", "≤ 1.0"),
        ({"rtt_s": -0.1}, "population.rtt_s", "non-negative"),
        ({"session_s": 0}, "population.session_s", "positive"),
        ({"offline_s": -1}, "population.offline_s", "non-negative"),
        ({"fail_mid_round": 1.5}, "population.fail_mid_round", "less than or equal to 1"),
        (
            {"rtt_s": {"kind": "choice", "values": [0.1, 0.2], "weights": [1]}},
            "population.rtt_s",
            "same length",
        ),
        ({"rtt_s": {"kind": "choice", "values": []}}, "population.rtt_s.values", "at least 1"),
        ({"rtt_s": {"kind": "fixed", "value": math.nan}}, "population.rtt_s.value", "not nan"),
    ],
)
def test_bad_input_is_one_sentence_naming_the_key(
    raw: dict[str, Any], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_population(raw)
    msg = str(info.value)
    assert f"'{key}" in msg or key in msg
    assert words in msg
    assert "\n" not in msg and "Traceback" not in msg and "pydantic" not in msg.lower()


def test_error_prefix_follows_where_the_table_sits() -> None:
    with pytest.raises(ConfigError, match=r"'swarm\.population\.peers'"):
        parse_population({"peers": -1}, prefix="swarm.population")
    with pytest.raises(ConfigError, match="must be a table"):
        parse_population([1, 2])  # type: ignore[arg-type]


# --- peers ---------------------------------------------------------------------------------


def population(**kw: Any) -> PopulationConfig:
    return parse_population(kw)


def test_draw_population_is_deterministic_with_ids_in_order() -> None:
    cfg = population(peers=50)
    a = draw_population(cfg, 3)
    assert a == draw_population(cfg, 3)
    assert [p.peer_id for p in a] == [f"peer-{i}" for i in range(50)]
    assert a != draw_population(cfg, 4)
    assert all(isinstance(p.flops, float) for p in a)


def test_draw_population_stays_in_range() -> None:
    cfg = population(
        peers=2000,
        flops={"kind": "pareto", "scale": 1e12, "alpha": 1.2},
        mfu={"kind": "uniform", "low": 0.1, "high": 0.6},
        up_bps={"kind": "lognormal", "median": 20e6, "sigma": 1.0},
        down_bps=100e6,
        rtt_s={"kind": "choice", "values": [0.02, 0.05, 0.2]},
    )
    peers = draw_population(cfg, 0)
    assert min(p.flops for p in peers) >= 1e12
    assert max(p.flops for p in peers) > 50e12  # the heavy tail shows up
    assert all(0.1 <= p.mfu < 0.6 for p in peers)
    assert all(p.up_bps > 0 and p.down_bps == 100e6 for p in peers)
    assert {p.rtt_s for p in peers} == {0.02, 0.05, 0.2}


def test_a_bigger_population_only_adds_peers() -> None:
    small = draw_population(population(peers=10), 5)
    big = draw_population(population(peers=30), 5)
    assert big[:10] == small


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_draw_population_rejects_bad_seeds(seed: Any) -> None:
    with pytest.raises(ValueError, match="seed"):
        draw_population(PopulationConfig(), seed)


# --- churn ---------------------------------------------------------------------------------


def check_intervals(intervals: list[tuple[float, float]], horizon: float) -> None:
    assert intervals and intervals[0][0] == 0.0  # everyone starts online
    for start, end in intervals:
        assert 0 <= start < end <= horizon
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert end < start  # ordered, disjoint, and separated by time away


def test_churn_intervals_are_ordered_disjoint_and_within_horizon() -> None:
    cfg = population(peers=40)
    peers = draw_population(cfg, 0)
    horizon = 3 * 24 * 3600.0
    sched = churn_schedule(cfg, peers, horizon, seed=1)
    assert list(sched) == [p.peer_id for p in peers]
    for intervals in sched.values():
        check_intervals(intervals, horizon)
    assert any(len(v) > 3 for v in sched.values())


def test_churn_is_deterministic_and_per_peer() -> None:
    cfg = population(peers=20)
    peers = draw_population(cfg, 0)
    a = churn_schedule(cfg, peers, 1e5, seed=2)
    assert a == churn_schedule(cfg, peers, 1e5, seed=2)
    assert a != churn_schedule(cfg, peers, 1e5, seed=3)
    subset = churn_schedule(cfg, peers[5:8], 1e5, seed=2)
    assert subset == {pid: a[pid] for pid in subset}  # independent of the other peers
    assert len({tuple(v) for v in a.values()}) == len(a)  # peers do not share a schedule


def test_a_longer_horizon_extends_a_shorter_one() -> None:
    cfg = population(peers=10)
    peers = draw_population(cfg, 0)
    short = churn_schedule(cfg, peers, 1e5, seed=0)
    long = churn_schedule(cfg, peers, 1e6, seed=0)
    for pid, intervals in short.items():
        head = [(s, min(e, 1e5)) for s, e in long[pid] if s < 1e5]
        assert head == intervals


@pytest.mark.parametrize(
    ("session", "offline"),
    [
        ({"kind": "lognormal", "median": 3600, "sigma": 1.0}, {"kind": "fixed", "value": 1200}),
        ({"kind": "uniform", "low": 100, "high": 500}, {"kind": "pareto", "scale": 50, "alpha": 3}),
        (600, {"kind": "choice", "values": [60, 6000], "weights": [3, 1]}),
    ],
)
def test_long_run_online_fraction(session: Any, offline: Any) -> None:
    cfg = population(peers=200, session_s=session, offline_s=offline)
    expected = cfg.session_s.mean() / (cfg.session_s.mean() + cfg.offline_s.mean())
    assert online_fraction(cfg) == pytest.approx(expected)
    horizon = 500 * (cfg.session_s.mean() + cfg.offline_s.mean())
    sched = churn_schedule(cfg, draw_population(cfg, 0), horizon, seed=0)
    online = sum(e - s for v in sched.values() for s, e in v)
    assert online / (cfg.peers * horizon) == pytest.approx(expected, abs=0.015)


def test_a_peer_that_never_returns_has_one_session() -> None:
    cfg = population(
        peers=50, session_s={"kind": "uniform", "low": 10, "high": 100}, offline_s=math.inf
    )
    sched = churn_schedule(cfg, draw_population(cfg, 0), 1e6, seed=0)
    for intervals in sched.values():
        assert len(intervals) == 1 and intervals[0][0] == 0.0 and 10 <= intervals[0][1] < 100
    assert online_fraction(cfg) == 0.0


def test_some_peers_never_return() -> None:
    cfg = population(peers=100, session_s=10, offline_s={"kind": "choice", "values": [5, math.inf]})
    sched = churn_schedule(cfg, draw_population(cfg, 0), 1e4, seed=0)
    for intervals in sched.values():
        check_intervals(intervals, 1e4)
        assert intervals[-1][1] < 1e4  # a finite absence is eventually followed by an endless one
    assert {len(v) for v in sched.values()} >= {1, 2}


def test_endless_sessions_and_zero_absences_stay_online() -> None:
    for cfg in (population(peers=3, session_s=math.inf), population(peers=3, offline_s=0)):
        sched = churn_schedule(cfg, draw_population(cfg, 0), 5e4, seed=0)
        assert all(v == [(0.0, 5e4)] for v in sched.values())
    assert online_fraction(population(session_s=math.inf, offline_s=math.inf)) == 1.0


def test_a_session_longer_than_the_horizon_is_cut() -> None:
    cfg = population(peers=2, session_s=100, offline_s=100)
    sched = churn_schedule(cfg, draw_population(cfg, 0), 250.0, seed=0)
    assert sched["peer-0"] == [(0.0, 100.0), (200.0, 250.0)]
    sched = churn_schedule(cfg, draw_population(cfg, 0), 150.0, seed=0)
    assert sched["peer-1"] == [(0.0, 100.0)]


@pytest.mark.parametrize("horizon", [0.0, -1.0, math.inf, math.nan])
def test_churn_rejects_bad_horizons(horizon: float) -> None:
    with pytest.raises(ValueError, match="horizon"):
        churn_schedule(PopulationConfig(), draw_population(PopulationConfig(), 0), horizon, 0)


def test_churn_rejects_duplicate_ids_and_bad_seeds() -> None:
    peer = draw_population(PopulationConfig(), 0)[0]
    with pytest.raises(ValueError, match="unique"):
        churn_schedule(PopulationConfig(), [peer, peer], 10.0, 0)
    with pytest.raises(ValueError, match="seed"):
        churn_schedule(PopulationConfig(), [peer], 10.0, -1)
    assert churn_schedule(PopulationConfig(), [], 10.0, 0) == {}


# --- compute time --------------------------------------------------------------------------


def test_flops_per_step_is_six_n_d() -> None:
    assert flops_per_step(1_000_000_000, 1024) == 6.144e12
    assert flops_per_step(0, 10) == 0.0
    assert flops_per_step(10**12, 10**7) == 6e19
    with pytest.raises(ValueError, match="non-negative"):
        flops_per_step(-1, 10)


def test_step_seconds_divides_by_effective_speed() -> None:
    peer = PeerSpec("p", flops=165e12, mfu=0.4, up_bps=1e8, down_bps=1e8, rtt_s=0.05)
    assert step_seconds(66e12, peer) == pytest.approx(1.0)
    # a 1B-parameter model, 512 sequences of 1024 tokens, on an RTX-4090-class peer at 40% MFU
    assert step_seconds(flops_per_step(10**9, 512 * 1024), peer) == pytest.approx(47.66, rel=1e-3)
    assert step_seconds(0.0, peer) == 0.0
    with pytest.raises(ValueError, match="FLOPs per step"):
        step_seconds(-1.0, peer)
    with pytest.raises(ValueError, match="FLOPs per step"):
        step_seconds(math.nan, peer)
