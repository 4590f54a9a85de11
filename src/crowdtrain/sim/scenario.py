"""Scenarios: a run config plus the volunteers that take part, loaded from TOML.

Built-in scenarios live in `crowdtrain/scenarios/<name>.toml` inside the package; a path to a
TOML file works too. A scenario file has a `[run]` table (a `RunConfig`) and a `[swarm]` table,
and comes in one of two kinds:

* an **in-process swarm** scenario (`sim.swarm`): ``[swarm]`` says how many volunteers train,
  all in lockstep, and which of them attack;
* a **discrete-event** scenario (`sim.des`), which has a ``[population]`` table (the volunteers'
  speed, links and churn, drawn from distributions with the run's seed, see `sim.population`)
  and a ``[target]`` table (the real-world model whose costs the virtual clock charges while
  the numerics run on the run's small proxy model). Optional ``[coordinator]`` (its ingress and
  egress in bit/s) and ``[churn]`` (whether peers come and go, until which virtual time, and
  whether they say goodbye) tables apply to it too. Its ``[swarm]`` table only sets evaluation.

The discrete-event simulator and its real-world scaling follow DiLoCo (Douillard et al. 2023,
arXiv:2311.08105): the round structure, not the proxy's loss, is what carries over to the target.
"""

from __future__ import annotations

import math
import statistics
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from crowdtrain.adversary import ATTACKS
from crowdtrain.config import BroadcastConfig, CodecConfig, ConfigError, RunConfig, parse_config
from crowdtrain.sim.coordinator_cost import close_cost
from crowdtrain.sim.network import transfer_time
from crowdtrain.sim.population import (
    PeerSpec,
    PopulationConfig,
    churn_schedule,
    draw_population,
    parse_population,
    step_seconds,
)

if TYPE_CHECKING:
    from crowdtrain.sim.des import SimResult, Target

Interval = tuple[float, float]


class SwarmConfig(BaseModel):
    """Who takes part in an in-process swarm and how the model is evaluated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    peers: int = Field(4, ge=1, le=100_000)
    eval_batches: int = Field(8, ge=1, le=10_000)
    eval_batch_size: int = Field(16, ge=1, le=65_536)
    attack: str | None = None
    attackers: int = Field(0, ge=0, le=100_000)
    # seed volunteers: the first peers, vouched for by the organizer (established from the start)
    seeds: int = Field(0, ge=0, le=100_000)

    @model_validator(mode="after")
    def _attack_is_known(self) -> SwarmConfig:
        check_attack(self.attack, self.attackers, self.peers)
        return self


def check_attack(attack: str | None, attackers: int, peers: int) -> None:
    """Raise ValueError (one sentence) unless the attack and attacker count make sense."""
    if attack is None:
        if attackers:
            raise ValueError("swarm.attackers needs swarm.attack (an attack name)")
        return
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack '{attack}'; the attacks are: {', '.join(ATTACKS)}")
    if not 0 < attackers < peers:
        raise ValueError(f"the attackers must number between 1 and {peers - 1} (peers less one)")


class TargetConfig(BaseModel):
    """The real-world model a discrete-event scenario stands for (see `sim.des.Target`).

    ``bytes_per_param_up`` defaults to what the run's codec puts on the wire per parameter;
    ``bytes_per_param_down`` to 4 (the weights in fp32), plus the published AdamW moments'
    ``train.moments.BYTES_PER_PARAM`` when its bases carry them (published, or derived: the
    mean steps). With a compressed
    ``broadcast``, a peer that holds the previous version downloads the update instead (its
    codec's bytes per parameter, measured; the second moments it also needs are a few bytes
    per row and the first moments it derives, ``protocol.broadcast``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    params: int = Field(ge=1, le=10**15)
    tokens_per_step: int = Field(ge=1, le=10**12)
    steps_per_proxy_step: float = Field(1.0, gt=0.0, le=1e9, allow_inf_nan=False)
    bytes_per_param_up: float | None = Field(None, gt=0.0, le=1024.0, allow_inf_nan=False)
    bytes_per_param_down: float | None = Field(None, gt=0.0, le=1024.0, allow_inf_nan=False)

    def target(
        self,
        codec_spec: CodecConfig,
        *,
        moments: bool = False,
        broadcast: BroadcastConfig | None = None,
    ) -> Target:
        """The simulator's `Target`, the upload size measured on `codec_spec` when not given;
        with `moments`, every download of θ carries the published moments too; with a
        compressed `broadcast`, returning peers download its update instead."""
        from crowdtrain.sim.des import Target, bytes_per_param
        from crowdtrain.train.moments import BYTES_PER_PARAM

        up, down = self.bytes_per_param_up, self.bytes_per_param_down
        return Target(
            params=self.params,
            tokens_per_step=self.tokens_per_step,
            bytes_per_param_up=bytes_per_param(codec_spec) if up is None else up,
            bytes_per_param_down=(4.0 + (BYTES_PER_PARAM if moments else 0.0))
            if down is None
            else down,
            steps_per_proxy_step=self.steps_per_proxy_step,
            bytes_per_param_update=bytes_per_param(broadcast.spec())
            if broadcast is not None and broadcast.codec != "fp32"
            else None,
        )


class CoordinatorConfig(BaseModel):
    """The coordinator's own links in bit/s (``inf``: not a bottleneck), and what it takes to
    close a round before the next base goes out: by default the cost model fitted to
    `crowdtrain bench coordinator` (`sim.coordinator_cost`) for its ``workers`` aggregation
    threads and its ``flops`` on model passes (None: those CPU threads'), or a fixed
    ``close_s`` in seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_bps: float = Field(math.inf, gt=0.0)
    out_bps: float = Field(math.inf, gt=0.0)
    close_s: float | None = Field(None, ge=0.0, allow_inf_nan=False)
    workers: int = Field(2, ge=1, le=100_000)
    flops: float | None = Field(None, gt=0.0, allow_inf_nan=False)

    def close(self, run: RunConfig, target: Target) -> Callable[[int], float]:
        """Seconds a close of K contributions takes, as a function of K."""
        if self.close_s is not None:
            fixed = self.close_s
            return lambda k: fixed
        return close_cost(
            run, target.params, target.tokens_per_step, workers=self.workers, flops=self.flops
        ).seconds


class ChurnConfig(BaseModel):
    """Whether the peers come and go (sessions and absences of `[population]`).

    ``horizon_s`` is how far into virtual time churn is drawn; past it churn stops (a peer
    online then stays online, one away stays away). Left out, it is a generous bound on the
    run's length (`default_horizon_s`). ``goodbye`` makes a leaving peer tell the coordinator
    instead of going silent.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    horizon_s: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    goodbye: bool = False


class ReportConfig(BaseModel):
    """How `crowdtrain simulate` measures a discrete-event scenario (`sim.study`).

    ``method`` is what the scenario's volunteers run: ``diloco`` (the protocol's rounds, in
    `sim.des`), ``ddp`` (synchronous data-parallel training over the population's links, the
    `datacenter` and `ddp-wan` presets), or ``analytic`` (DiLoCo rounds whose throughput is
    extrapolated by `sim.analytic` for swarms too large to simulate peer by peer, without
    numerics, so without a loss curve). The data-parallel references train the proxy with a
    global batch of every peer's batch at the peak learning rate ``ddp_lr`` (default the run's
    ``inner.lr``), evaluating every ``ddp_eval_every`` steps, for at most ``ddp_max_steps``
    (default twice ``rounds.total × inner.steps``), or until ``target_loss`` (default: the loss
    the swarm ends at) is reached. ``allreduce_bytes_per_param`` is the wire size of a gradient
    in the ring all-reduce (2: bf16).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["diloco", "ddp", "analytic"] = "diloco"
    target_loss: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    ddp_lr: float | None = Field(None, gt=0.0, le=10.0, allow_inf_nan=False)
    ddp_eval_every: int = Field(10, ge=1, le=1_000_000)
    ddp_max_steps: int | None = Field(None, ge=1, le=10_000_000)
    allreduce_bytes_per_param: float = Field(2.0, gt=0.0, le=64.0, allow_inf_nan=False)


class Scenario(BaseModel):
    """A named scenario: in-process swarm, or discrete-event when it has population and target."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    swarm: SwarmConfig = SwarmConfig()
    run: RunConfig = RunConfig()
    population: PopulationConfig | None = None
    target: TargetConfig | None = None
    coordinator: CoordinatorConfig = CoordinatorConfig()
    churn: ChurnConfig = ChurnConfig()
    report: ReportConfig = ReportConfig()

    @property
    def discrete_event(self) -> bool:
        """Whether `sim.des` runs this scenario (it has a population and a target)."""
        return self.population is not None and self.target is not None


def builtin_scenarios() -> list[str]:
    """Names of the scenarios shipped inside the package."""
    folder = resources.files("crowdtrain") / "scenarios"
    return sorted(
        p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")
    )


def _read(name_or_path: str) -> tuple[str, str]:
    if name_or_path in builtin_scenarios():
        text = (resources.files("crowdtrain") / "scenarios" / f"{name_or_path}.toml").read_text()
        return name_or_path, text
    path = Path(name_or_path)
    if path.suffix == ".toml":
        try:
            return path.stem, path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read scenario file {path}: {exc.strerror}") from None
    names = ", ".join(builtin_scenarios())
    raise ConfigError(f"unknown scenario '{name_or_path}'; built-in scenarios are: {names}")


_SECTIONS = ("swarm", "run", "population", "target", "coordinator", "churn", "report")
_DES_SWARM_KEYS = ("eval_batches", "eval_batch_size")


def _section(section: str, model: type[BaseModel], raw: Any) -> Any:
    """Validate one table of a scenario; raise ConfigError (one sentence) naming the bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"scenario key '{section}' must be a table, not {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join([section, *(str(p) for p in err["loc"])])
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(model.model_fields)
            raise ConfigError(
                f"unknown scenario key '{key}'; allowed keys here are: {allowed}"
            ) from None
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"scenario key '{key}': {msg[:1].lower()}{msg[1:]}") from None


def parse_scenario(name: str, raw: dict[str, Any]) -> Scenario:
    """Validate a scenario mapping; raise ConfigError with one sentence when it is bad."""
    raw = dict(raw)
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(
            f"unknown scenario key(s) {', '.join(unknown)}; allowed are: {', '.join(_SECTIONS)}"
        )
    run = parse_config(raw.get("run", {}))
    swarm_raw = raw.get("swarm", {})
    population = None
    if "population" in raw:
        population = parse_population(raw["population"], prefix="population")
    target = _section("target", TargetConfig, raw["target"]) if "target" in raw else None
    coordinator = _section("coordinator", CoordinatorConfig, raw.get("coordinator", {}))
    churn = _section("churn", ChurnConfig, raw.get("churn", {}))
    report = _section("report", ReportConfig, raw.get("report", {}))
    if (population is None) != (target is None):
        has, lacks = ("population", "target") if target is None else ("target", "population")
        raise ConfigError(
            f"scenario {name} has a [{has}] table but no [{lacks}] table; a discrete-event "
            "scenario needs both"
        )
    if population is None:
        extra = [k for k in ("coordinator", "churn", "report") if k in raw]
        if extra:
            raise ConfigError(
                f"scenario key '{extra[0]}' applies only to discrete-event scenarios, which "
                "have [population] and [target] tables"
            )
    else:
        stray = sorted(set(swarm_raw) - set(_DES_SWARM_KEYS)) if isinstance(swarm_raw, dict) else []
        if stray:
            raise ConfigError(
                f"scenario key 'swarm.{stray[0]}' does not apply to a discrete-event scenario "
                "(its peers come from [population]; attacks are not supported there yet)"
            )
        if run.rounds.quorum > population.peers:
            raise ConfigError(
                f"scenario key 'run.rounds.quorum' is {run.rounds.quorum}, more than the "
                f"{population.peers} peers of population.peers"
            )
    swarm = _section("swarm", SwarmConfig, swarm_raw)
    return Scenario(
        name=name,
        swarm=swarm,
        run=run,
        population=population,
        target=target,
        coordinator=coordinator,
        churn=churn,
        report=report,
    )


def load_scenario(name_or_path: str) -> Scenario:
    """Load a built-in scenario by name, or a scenario TOML file by path."""
    name, text = _read(name_or_path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"scenario {name_or_path} is not valid TOML: {exc}") from None
    return parse_scenario(name, raw)


# --- discrete-event scenarios ------------------------------------------------------------------


@dataclass(frozen=True)
class DesSetup:
    """What `sim.des.simulate` needs for a discrete-event scenario, drawn with the run's seed."""

    run: RunConfig
    population: list[PeerSpec]
    target: Target
    online: dict[str, list[Interval]] | None  # None: no churn, every peer always online
    horizon_s: float | None  # how far churn was drawn (None without churn)
    fail_mid_round: float = 0.0  # chance that a work order crashes part-way (with churn on)


def _round_estimate_s(
    run: RunConfig, peer: PeerSpec, target: Target, coordinator: CoordinatorConfig
) -> float:
    """Seconds one peer needs for a round alone: download, its fitted steps, upload."""
    from crowdtrain.sim.des import budget_steps

    step_s = step_seconds(target.flops_per_proxy_step, peer)
    steps = budget_steps(run.inner.budget, run.inner.steps, run.inner.seconds, step_s)
    down = transfer_time(target.download_bytes, min(peer.down_bps, coordinator.out_bps), peer.rtt_s)
    up = transfer_time(target.upload_bytes, min(peer.up_bps, coordinator.in_bps), peer.rtt_s)
    return down + steps * step_s + up


def default_horizon_s(
    run: RunConfig, peers: list[PeerSpec], target: Target, coordinator: CoordinatorConfig
) -> float:
    """A generous bound on a run's virtual length, how far churn is drawn by default: four
    times ``rounds.total`` rounds that each last the deadline or the slowest peer's round
    (download, compute, upload), whichever is longer."""
    slowest = max(_round_estimate_s(run, p, target, coordinator) for p in peers)
    return 4.0 * run.rounds.total * max(run.rounds.deadline_s, slowest)


def des_setup(scenario: Scenario, run: RunConfig | None = None) -> DesSetup:
    """Draw the population and churn of a discrete-event scenario (with `run`, when given,
    in place of the scenario's run config, e.g. with fewer rounds)."""
    if scenario.population is None or scenario.target is None:
        raise ConfigError(f"scenario {scenario.name} is not a discrete-event scenario")
    run = scenario.run if run is None else run
    peers = draw_population(scenario.population, run.seed)
    target = scenario.target.target(
        run.codec, moments=run.inner.base_moments, broadcast=run.broadcast
    )
    churn = scenario.churn
    if not churn.enabled:
        return DesSetup(run, peers, target, None, None)
    horizon = churn.horizon_s or default_horizon_s(run, peers, target, scenario.coordinator)
    online = online_schedule(scenario.population, peers, horizon, run.seed)
    return DesSetup(run, peers, target, online, horizon, scenario.population.fail_mid_round)


def online_schedule(
    population: PopulationConfig, peers: list[PeerSpec], horizon_s: float, seed: int
) -> dict[str, list[Interval]]:
    """The peers' online intervals drawn up to `horizon_s`; past it churn stops (a peer online
    then stays online). A longer horizon extends a shorter one (`churn_schedule`)."""
    drawn = churn_schedule(population, peers, horizon_s, seed)
    return {
        pid: [(a, math.inf if b >= horizon_s else b) for a, b in intervals]
        for pid, intervals in drawn.items()
    }


def simulate_scenario(
    scenario: Scenario,
    run: RunConfig | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    setup: DesSetup | None = None,
) -> SimResult:
    """Run a discrete-event scenario with `sim.des.simulate` (see `des_setup` for `run`; a
    `setup` already drawn is used as it is)."""
    from crowdtrain.sim.des import simulate

    setup = des_setup(scenario, run) if setup is None else setup
    return simulate(
        setup.run,
        setup.population,
        setup.target,
        online=setup.online,
        coordinator_in_bps=scenario.coordinator.in_bps,
        coordinator_out_bps=scenario.coordinator.out_bps,
        coordinator_close_s=scenario.coordinator.close(setup.run, setup.target),
        eval_batches=scenario.swarm.eval_batches,
        eval_batch_size=scenario.swarm.eval_batch_size,
        goodbye=scenario.churn.goodbye,
        fail_mid_round=setup.fail_mid_round,
        on_round=on_round,
    )


def utilization_summary(result: SimResult) -> dict[str, float]:
    """Median, min and max of the peers' utilization, and their median bytes up and down."""
    peers = list(result.per_peer.values())
    if not peers:
        return {}
    util = [p["utilization"] for p in peers]
    return {
        "utilization_median": statistics.median(util),
        "utilization_min": min(util),
        "utilization_max": max(util),
        "bytes_up_median": statistics.median(p["bytes_up"] for p in peers),
        "bytes_down_median": statistics.median(p["bytes_down"] for p in peers),
        "bytes_median": statistics.median(p["bytes_up"] + p["bytes_down"] for p in peers),
    }
