"""Swarm scenarios: a run config plus the volunteers that take part, loaded from TOML.

Built-in scenarios live in `crowdtrain/scenarios/<name>.toml` inside the package; a path to a
TOML file works too. A scenario file has a `[swarm]` table and a `[run]` table (a `RunConfig`).
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from crowdtrain.adversary import ATTACKS
from crowdtrain.config import ConfigError, RunConfig, parse_config


class SwarmConfig(BaseModel):
    """Who takes part in an in-process swarm and how the model is evaluated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    peers: int = Field(4, ge=1, le=100_000)
    eval_batches: int = Field(8, ge=1, le=10_000)
    eval_batch_size: int = Field(16, ge=1, le=65_536)
    attack: str | None = None
    attackers: int = Field(0, ge=0, le=100_000)

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


class Scenario(BaseModel):
    """A named swarm scenario."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    swarm: SwarmConfig = SwarmConfig()
    run: RunConfig = RunConfig()


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


def parse_scenario(name: str, raw: dict[str, Any]) -> Scenario:
    """Validate a scenario mapping; raise ConfigError with one sentence when it is bad."""
    raw = dict(raw)
    run = parse_config(raw.pop("run", {}))
    try:
        swarm = SwarmConfig.model_validate(raw.pop("swarm", {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        key = "swarm." + ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"scenario key '{key}': {err['msg'].lower()}") from None
    if raw:
        unknown = ", ".join(sorted(raw))
        raise ConfigError(f"unknown scenario key(s) {unknown}; allowed are: swarm, run")
    return Scenario(name=name, swarm=swarm, run=run)


def load_scenario(name_or_path: str) -> Scenario:
    """Load a built-in scenario by name, or a scenario TOML file by path."""
    name, text = _read(name_or_path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"scenario {name_or_path} is not valid TOML: {exc}") from None
    return parse_scenario(name, raw)
