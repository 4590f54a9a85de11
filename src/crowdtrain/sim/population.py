"""The volunteers of a simulated scenario, drawn from distributions: speed, links and churn.

A scenario describes its population with a `PopulationConfig`: how many peers, and for each
property a distribution to draw from (`Fixed`, `Uniform`, `LogNormal`, `Pareto` or `Choice`,
told apart by their ``kind`` key in TOML, e.g. ``up_bps = {kind = "lognormal", median = 50e6,
sigma = 0.8}``; a bare number means `Fixed`). Heavy-tailed `Pareto` and `LogNormal` speeds give
folding@home-like populations, where a few machines are far faster than the median one.

Everything here is pure and deterministic for a seed:

- `draw_population` gives each peer its compute speed (FLOP/s), model FLOPs utilization (MFU),
  uplink and downlink bandwidth (bit/s) and round-trip time (s). Each property has its own random
  stream, so peer *i* draws the same values whatever the population size.
- `churn_schedule` gives each peer its online intervals within a horizon: an alternating renewal
  process of sessions (``session_s``) and absences (``offline_s``). By the renewal-reward theorem
  the long-run online fraction is E[session] / (E[session] + E[offline]) (`online_fraction`).
  Each peer's stream is keyed by its id, so schedules do not depend on the other peers, and a
  longer horizon extends a shorter one.
- `step_seconds` and `flops_per_step` turn a model size into compute time with the training-FLOPs
  rule C ≈ 6·N·D of Kaplan et al. 2020, "Scaling Laws for Neural Language Models"
  (arXiv:2001.08361): about 6 FLOPs per parameter per token for the forward and backward pass.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from crowdtrain.config import ConfigError

FloatArray = npt.NDArray[np.float64]

KINDS = ("fixed", "uniform", "lognormal", "pareto", "choice")


def _count(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"the sample size must be a non-negative integer, not {n!r}")
    return int(n)


class _Dist(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def support(self) -> tuple[float, float, bool]:
        """The infimum and supremum of the values drawn, and whether the infimum can be drawn."""
        raise NotImplementedError

    def mean(self) -> float:
        """The expected value (``inf`` when it does not exist)."""
        raise NotImplementedError

    def sample(self, rng: np.random.Generator, n: int) -> FloatArray:
        """Draw `n` independent values as a float64 array of shape ``(n,)``."""
        raise NotImplementedError


class Fixed(_Dist):
    """Always `value`; ``inf`` is allowed where the key says so (an absence that never ends)."""

    kind: Literal["fixed"] = "fixed"
    value: float

    @field_validator("value")
    @classmethod
    def _not_nan(cls, v: float) -> float:
        if math.isnan(v):
            raise ValueError("value must be a number, not nan")
        return v

    def support(self) -> tuple[float, float, bool]:
        return self.value, self.value, True

    def mean(self) -> float:
        return self.value

    def sample(self, rng: np.random.Generator, n: int) -> FloatArray:
        return np.full(_count(n), self.value, dtype=np.float64)


class Uniform(_Dist):
    """Uniform on [low, high)."""

    kind: Literal["uniform"] = "uniform"
    low: float = Field(allow_inf_nan=False)
    high: float = Field(allow_inf_nan=False)

    @model_validator(mode="after")
    def _ordered(self) -> Uniform:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be less than high ({self.high})")
        return self

    def support(self) -> tuple[float, float, bool]:
        return self.low, self.high, True

    def mean(self) -> float:
        return (self.low + self.high) / 2

    def sample(self, rng: np.random.Generator, n: int) -> FloatArray:
        return rng.uniform(self.low, self.high, _count(n))


class LogNormal(_Dist):
    """exp(N(ln median, sigma²)): positive and right-skewed; half the draws lie below `median`."""

    kind: Literal["lognormal"] = "lognormal"
    median: float = Field(gt=0.0, allow_inf_nan=False)
    sigma: float = Field(ge=0.0, le=10.0)

    def support(self) -> tuple[float, float, bool]:
        if self.sigma == 0:
            return self.median, self.median, True
        return 0.0, math.inf, False

    def mean(self) -> float:
        return self.median * math.exp(self.sigma**2 / 2)

    def sample(self, rng: np.random.Generator, n: int) -> FloatArray:
        return rng.lognormal(math.log(self.median), self.sigma, _count(n))


class Pareto(_Dist):
    """Pareto type I: P(X > x) = (scale / x)^alpha for x ≥ scale; heavy-tailed (small alpha)."""

    kind: Literal["pareto"] = "pareto"
    scale: float = Field(gt=0.0, allow_inf_nan=False)
    alpha: float = Field(ge=0.1, allow_inf_nan=False)  # smaller would overflow to inf

    def support(self) -> tuple[float, float, bool]:
        return self.scale, math.inf, True

    def mean(self) -> float:
        return self.alpha * self.scale / (self.alpha - 1) if self.alpha > 1 else math.inf

    def sample(self, rng: np.random.Generator, n: int) -> FloatArray:
        # numpy's pareto() is the Lomax (Pareto II) law; shifting by one and scaling gives type I.
        return self.scale * (1.0 + rng.pareto(self.alpha, _count(n)))


class Choice(_Dist):
    """One of `values`, with probabilities proportional to `weights` (equal when left out)."""

    kind: Literal["choice"] = "choice"
    values: tuple[float, ...] = Field(min_length=1, max_length=10_000)
    weights: tuple[float, ...] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Choice:
        if any(math.isnan(v) for v in self.values):
            raise ValueError("values must be numbers, not nan")
        if self.weights is None:
            return self
        if len(self.weights) != len(self.values):
            raise ValueError(
                f"weights and values must have the same length, not {len(self.weights)} "
                f"and {len(self.values)}"
            )
        if not all(math.isfinite(w) and w >= 0 for w in self.weights):
            raise ValueError("weights must be finite and non-negative")
        if sum(self.weights) <= 0:
            raise ValueError("weights must not all be zero")
        return self

    def _probabilities(self) -> FloatArray:
        w = np.ones(len(self.values)) if self.weights is None else np.array(self.weights)
        return np.asarray(w / w.sum(), dtype=np.float64)

    def support(self) -> tuple[float, float, bool]:
        drawn = [v for v, p in zip(self.values, self._probabilities(), strict=True) if p > 0]
        return min(drawn), max(drawn), True

    def mean(self) -> float:
        p = self._probabilities()
        drawn = p > 0
        return float(np.dot(np.array(self.values)[drawn], p[drawn]))

    def sample(self, rng: np.random.Generator, n: int) -> FloatArray:
        values = np.array(self.values, dtype=np.float64)
        return np.asarray(rng.choice(values, size=_count(n), p=self._probabilities()))


def _number_is_fixed(raw: Any) -> Any:
    """A bare number in TOML stands for ``{kind = "fixed", value = number}``."""
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return {"kind": "fixed", "value": raw}
    return raw


Dist = Annotated[
    Fixed | Uniform | LogNormal | Pareto | Choice,
    Field(discriminator="kind"),
    BeforeValidator(_number_is_fixed),
]
"""A distribution in a config, chosen by its ``kind`` key."""


def _check_range(
    dist: _Dist, *, positive: bool, at_most: float | None = None, allow_inf: bool = False
) -> _Dist:
    """Raise ValueError (one sentence) unless every value `dist` can draw fits the key's range."""
    lo, hi, lo_drawn = dist.support()
    kind = getattr(dist, "kind", "")
    top = "unbounded values" if math.isinf(hi) and not isinstance(dist, Fixed | Choice) else hi
    if positive and (lo < 0 or (lo == 0 and lo_drawn)):
        raise ValueError(f"the {kind} distribution can draw {lo}, but values must be positive")
    if not positive and lo < 0:
        raise ValueError(f"the {kind} distribution can draw {lo}, but values must be non-negative")
    if at_most is not None and hi > at_most:
        raise ValueError(f"the {kind} distribution can draw {top}, but values must be ≤ {at_most}")
    if not allow_inf and math.isinf(hi) and isinstance(dist, Fixed | Choice):
        raise ValueError(f"the {kind} distribution can draw inf, but values must be finite")
    return dist


#: The distribution keys of a population and the range each one's values must lie in.
_RANGES: dict[str, Callable[[_Dist], _Dist]] = {
    "flops": functools.partial(_check_range, positive=True),
    "mfu": functools.partial(_check_range, positive=True, at_most=1.0),
    "up_bps": functools.partial(_check_range, positive=True),
    "down_bps": functools.partial(_check_range, positive=True),
    "rtt_s": functools.partial(_check_range, positive=False),
    "session_s": functools.partial(_check_range, positive=True, allow_inf=True),
    "offline_s": functools.partial(_check_range, positive=False, allow_inf=True),
}


class PopulationConfig(BaseModel):
    """The volunteers of a scenario: how many, and the distributions their properties follow.

    Units: FLOP/s for `flops`, a fraction in (0, 1] for `mfu`, bit/s for `up_bps` and
    `down_bps`, seconds for the rest. The defaults sketch consumer GPUs on home broadband:
    a median 80 TFLOP/s at 40% MFU, 20 Mbit/s up and 100 Mbit/s down, 20–200 ms round trips,
    sessions of a few hours with about an hour away between them (online 80% of the time), and
    a 1% chance that a peer vanishes in the middle of any round it works on.
    ``session_s = inf`` is a peer that never leaves; ``offline_s = inf`` is one that never comes
    back after its first session.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    peers: int = Field(16, ge=1, le=1_000_000)
    flops: Dist = LogNormal(median=80e12, sigma=0.5)
    mfu: Dist = Fixed(value=0.4)
    up_bps: Dist = LogNormal(median=20e6, sigma=0.8)
    down_bps: Dist = LogNormal(median=100e6, sigma=0.8)
    rtt_s: Dist = Uniform(low=0.02, high=0.2)
    session_s: Dist = LogNormal(median=4 * 3600.0, sigma=1.0)
    offline_s: Dist = LogNormal(median=3600.0, sigma=1.0)
    fail_mid_round: float = Field(0.01, ge=0.0, le=1.0)

    @field_validator(*_RANGES)
    @classmethod
    def _in_range(cls, d: _Dist, info: ValidationInfo) -> _Dist:
        return _RANGES[str(info.field_name)](d)  # field_name is set for every field validator


_DIST_MODELS: dict[str, type[BaseModel]] = {
    "fixed": Fixed,
    "uniform": Uniform,
    "lognormal": LogNormal,
    "pareto": Pareto,
    "choice": Choice,
}


def _describe(error: Any, prefix: str) -> str:
    """Turn the first pydantic error into one sentence naming the population key."""
    loc = [str(part) for part in error["loc"]]
    tag = None
    if len(loc) > 1 and loc[0] in _RANGES and loc[1] in _DIST_MODELS:
        tag = loc.pop(1)  # pydantic puts the union's tag in the location; a person never wrote it
    key = ".".join([prefix, *loc]) if prefix else ".".join(loc)
    kind = error["type"]
    got = error.get("input")
    msg = str(error["msg"]).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        model: type[BaseModel] = _DIST_MODELS[tag] if tag else PopulationConfig
        allowed = ", ".join(sorted(model.model_fields))
        return f"unknown config key '{key}'; allowed keys here are: {allowed}"
    if kind == "union_tag_invalid":
        bad = error.get("ctx", {}).get("tag", "")
        return f"config key '{key}.kind' is {bad!r}; allowed kinds are: {', '.join(KINDS)}"
    if kind == "union_tag_not_found":
        return f"config key '{key}' needs a 'kind', one of: {', '.join(KINDS)}"
    if kind == "model_attributes_type":
        return f"config key '{key}' is {got!r}; give a number or a table with a 'kind'"
    if kind == "value_error":
        return f"config key '{key}': {msg}"
    return f"config key '{key}' is {got!r}: {msg[:1].lower()}{msg[1:]}"


def parse_population(raw: dict[str, Any], prefix: str = "population") -> PopulationConfig:
    """Validate a population mapping; raise ConfigError with one sentence when it is bad.

    `prefix` is where the mapping sits in its file (``population`` for a scenario's
    ``[population]`` table); error messages name keys under it, e.g. ``population.flops.sigma``.
    """
    if not isinstance(raw, dict):
        where = prefix or "the population"
        raise ConfigError(f"config key '{where}' must be a table, not {type(raw).__name__}")
    try:
        return PopulationConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0], prefix)) from None


@dataclass(frozen=True)
class PeerSpec:
    """One simulated volunteer: compute speed (FLOP/s), MFU, links (bit/s) and round trip (s)."""

    peer_id: str
    flops: float
    mfu: float
    up_bps: float
    down_bps: float
    rtt_s: float


def _seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"the seed must be a non-negative integer, not {seed!r}")
    return seed


_POPULATION_STREAM = 0x706F70  # "pop": keeps the population's draws apart from churn's
_CHURN_STREAM = 0x636875  # "chu"


def draw_population(cfg: PopulationConfig, seed: int) -> list[PeerSpec]:
    """Draw `cfg.peers` peers, ids ``peer-0``, ``peer-1``, ...; the same seed gives the same peers.

    Each property comes from its own random stream, so a larger population only adds peers:
    the first peers are the same as in a smaller one drawn with the same seed.
    """
    streams = np.random.SeedSequence([_POPULATION_STREAM, _seed(seed)]).spawn(5)
    dists = (cfg.flops, cfg.mfu, cfg.up_bps, cfg.down_bps, cfg.rtt_s)
    columns = [
        d.sample(np.random.default_rng(s), cfg.peers).tolist()
        for d, s in zip(dists, streams, strict=True)
    ]
    return [PeerSpec(f"peer-{i}", *(float(col[i]) for col in columns)) for i in range(cfg.peers)]


def _peer_key(peer_id: str) -> int:
    return int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:8], "little")


def _intervals(
    cfg: PopulationConfig, rng: np.random.Generator, horizon_s: float
) -> list[tuple[float, float]]:
    """One peer's online intervals: sessions and absences alternate from an online start at 0."""
    out: list[tuple[float, float]] = []
    t = 0.0
    chunk = 16
    while t < horizon_s:
        sessions = cfg.session_s.sample(rng, chunk)
        offline = cfg.offline_s.sample(rng, chunk)
        cycle_ends = t + np.cumsum(sessions + offline)
        starts = np.concatenate(([t], cycle_ends[:-1]))
        ends = np.minimum(starts + sessions, horizon_s)
        keep = starts < horizon_s
        for start, end in zip(starts[keep].tolist(), ends[keep].tolist(), strict=True):
            if out and start <= out[-1][1]:  # no time away: the two sessions are one stretch
                out[-1] = (out[-1][0], max(out[-1][1], end))
            else:
                out.append((start, end))
        t = float(cycle_ends[-1])
        chunk = min(chunk * 2, 4096)
    return out


def churn_schedule(
    cfg: PopulationConfig, peers: list[PeerSpec], horizon_s: float, seed: int
) -> dict[str, list[tuple[float, float]]]:
    """Each peer's online intervals ``[start, end)`` within ``[0, horizon_s)``, in time order.

    Every peer is online at time 0 and then alternates a session drawn from `cfg.session_s`
    with an absence drawn from `cfg.offline_s` (``inf`` = gone for good). Intervals are disjoint
    and separated by time away (back-to-back sessions are merged); the last is cut at the
    horizon. A peer's schedule depends only on the seed, its id and the config, so it is the
    same whatever the other peers, and a longer horizon extends a shorter one.
    """
    if not (isinstance(horizon_s, int | float) and 0 < horizon_s < math.inf):
        raise ValueError(
            f"the horizon must be a positive finite number of seconds, not {horizon_s}"
        )
    ids = [p.peer_id for p in peers]
    if len(set(ids)) != len(ids):
        raise ValueError("peer ids must be unique to draw a churn schedule")
    base = [_CHURN_STREAM, _seed(seed)]
    return {
        pid: _intervals(cfg, np.random.default_rng([*base, _peer_key(pid)]), float(horizon_s))
        for pid in ids
    }


def online_fraction(cfg: PopulationConfig) -> float:
    """The long-run fraction of time a peer is online: E[session] / (E[session] + E[offline])."""
    session, offline = cfg.session_s.mean(), cfg.offline_s.mean()
    if math.isinf(session):
        return 1.0
    if math.isinf(offline):
        return 0.0
    return session / (session + offline)


def flops_per_step(params: int, tokens: int) -> float:
    """Training FLOPs of one optimizer step: 6 × params × tokens (Kaplan et al. 2020)."""
    if params < 0 or tokens < 0:
        raise ValueError(f"params ({params}) and tokens ({tokens}) must be non-negative")
    return float(6 * params * tokens)


def step_seconds(flops_per_step: float, peer: PeerSpec) -> float:
    """Seconds `peer` needs for a step of `flops_per_step` FLOPs: FLOPs / (FLOP/s × MFU)."""
    if not flops_per_step >= 0:
        raise ValueError(f"the FLOPs per step must be non-negative, not {flops_per_step}")
    return flops_per_step / (peer.flops * peer.mfu)
