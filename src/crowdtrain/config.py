"""Run configuration: pydantic models loaded from TOML, and the config's content hash.

One place to see a run (as in torchtitan): the model, the data, the inner optimizer
(DiLoCo's AdamW, Douillard et al. 2023, arXiv:2311.08105), the outer optimizer, the wire codec,
the aggregation rule and the round policy. Unknown keys and bad values are rejected with one
sentence that names the key and what is allowed. The resolved config has a stable content hash,
which the run manifest pins.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)


class ConfigError(ValueError):
    """A configuration file or value is unusable; the message is one sentence for a person."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ArchName = Literal["gpt", "mlp"]
CodecName = Literal["fp32", "fp16", "bf16", "int8", "int4", "topk2bit"]
AggregatorName = Literal["mean", "median", "trimmed_mean", "centered_clip"]
OuterName = Literal["nesterov", "sgd", "adam", "error_feedback"]
StalePolicy = Literal["reject", "accept"]
InnerState = Literal["fresh", "kept", "published", "derived"]
SpotCheckMode = Literal["off", "peer", "coordinator"]
ScoringMode = Literal["auto", "coordinator", "peer"]


class ModelConfig(_Strict):
    """A built-in architecture, chosen by name, and its size."""

    arch: ArchName = "gpt"
    vocab_size: int = Field(256, ge=2, le=65536)
    context: int = Field(128, ge=2, le=8192)
    width: int = Field(128, ge=4, le=16384)
    depth: int = Field(4, ge=1, le=256)
    heads: int = Field(4, ge=1, le=256)
    mlp_ratio: int = Field(4, ge=1, le=16)
    init_seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.arch == "gpt" and self.width % self.heads:
            raise ValueError(f"model.width ({self.width}) must be a multiple of model.heads")
        return self


class DataConfig(_Strict):
    """Where the corpus comes from, how it is packed into shards, and how batches are drawn."""

    source: str = "stdlib"
    dir: str = "data/stdlib"
    include: tuple[str, ...] = ("*.py",)
    shard_bytes: int = Field(1 << 20, ge=1024, le=1 << 30)
    val_fraction: float = Field(0.02, gt=0.0, lt=0.5)
    batch_size: int = Field(16, ge=1, le=65536)
    shards_per_peer: int = Field(4, ge=1, le=100_000)
    seed: int = Field(0, ge=0)


class InnerConfig(_Strict):
    """The inner loop on each volunteer: AdamW with warmup + cosine (DiLoCo defaults).

    ``optimizer_state`` is where each round's AdamW moments start (``train/moments.py``):

    - ``"derived"`` (default): each volunteer derives them at its round's first step from
      public data and its own assigned batch: the first moment from the outer update the
      coordinator publishes as mean steps, the second from the spread of that batch's gradient
      over ``moment_batches`` micro-batches, for the mean of as many gradients as the round
      before averaged contributions. A round stays a pure function of public inputs and its
      batches, so any verifier can replay it, and the coordinator runs no model pass.
    - ``"published"``: from the moments the coordinator publishes with θ, derived from public
      data only (the outer update and gradients at the new θ on ``moment_batches`` batches of
      its own), so rounds are replayable too; the gradients are a model pass in every close.
    - ``"fresh"``: from zeros every round (replayable; the first steps of each round are
      sign-like).
    - ``"kept"``: each volunteer keeps its own moments across rounds, as in the DiLoCo paper;
      nobody else knows them, so its rounds cannot be replayed and spot-checks are off.

    ``moment_batches`` is how many micro-batches (derived) or batches (published) the second
    moment is estimated from; from them comes the second moment of the *mean* of the round's
    contributions' gradients, the one data-parallel AdamW on that many workers divides by
    (``train.moments.second_moment``). ``beta2`` defaults to 0.99 rather than GPT-3's 0.95:
    a round then keeps most of that published estimate through its inner steps (0.99²⁵ ≈ 0.78),
    and on the quick benchmark setting 0.99 was the best of 0.95 / 0.99 / 0.999 for
    data-parallel training and for DiLoCo alike (docs/BENCHMARKS.md). The older
    ``keep_optimizer_state = true/false`` is read as ``"kept"``/``"fresh"``.
    """

    lr: float = Field(3e-3, gt=0.0, le=10.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.1, ge=0.0, le=10.0)
    warmup_steps: int = Field(20, ge=0)
    total_steps: int = Field(1000, ge=1)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    grad_clip: float = Field(1.0, gt=0.0)
    budget: Literal["steps", "seconds"] = "steps"
    steps: int = Field(50, ge=1, le=1_000_000)
    seconds: float = Field(30.0, gt=0.0, le=86_400.0)
    threads: int = Field(1, ge=1, le=1024)
    optimizer_state: InnerState = "derived"
    moment_batches: int = Field(4, ge=1, le=1024)
    overlap: bool = True
    # "muon": Muon (orthogonalized momentum, Jordan et al. 2024; torch.optim.Muon) for the
    # hidden weight matrices and AdamW for the rest, as MuLoCo (arXiv:2505.23725) pairs it
    # with DiLoCo. Its momentum has no published form, so it needs optimizer_state fresh or
    # kept.
    optimizer: Literal["adamw", "muon"] = "adamw"

    @model_validator(mode="after")
    def _muon_state(self) -> InnerConfig:
        if self.optimizer == "muon" and self.optimizer_state in ("published", "derived"):
            raise ValueError(
                'inner.optimizer = "muon" has no published or derived moments: set '
                'inner.optimizer_state to "fresh" (replayable) or "kept"'
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _legacy_keep_state(cls, data: Any) -> Any:
        if isinstance(data, dict) and "keep_optimizer_state" in data:
            data = dict(data)
            keep = data.pop("keep_optimizer_state")
            if not isinstance(keep, bool):
                raise ValueError("inner.keep_optimizer_state must be true or false")
            if "optimizer_state" in data:
                raise ValueError(
                    "set inner.optimizer_state or the older inner.keep_optimizer_state, not both"
                )
            data["optimizer_state"] = "kept" if keep else "fresh"
        return data

    @property
    def base_moments(self) -> bool:
        """Whether each round's base carries moments (published or the mean steps of derived)."""
        return self.optimizer_state in ("published", "derived")

    @property
    def keep_optimizer_state(self) -> bool:
        """Whether each volunteer keeps its own AdamW moments across rounds."""
        return self.optimizer_state == "kept"


Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
#: Adam's ``betas`` and ``eps`` when the config does not set them.
ADAM_DEFAULTS: tuple[tuple[float, float], float] = ((0.9, 0.99), 1e-8)


class OuterConfig(_Strict):
    """The outer optimizer applied to the aggregate pseudo-gradient on the coordinator.

    A stock ``torch.optim`` optimizer fed the aggregate Δ as its gradient (``crowdtrain.outer``):

    - ``"nesterov"``: SGD with Nesterov ``momentum``, DiLoCo's outer step (lr 0.7, momentum 0.9).
    - ``"sgd"``: SGD with heavy-ball ``momentum``; lr 1 with momentum 0 is plain averaging.
    - ``"adam"``: Adam with ``betas`` and ``eps``, no weight decay; ``momentum`` is unused. Its
      step is about ``lr`` per weight whatever the scale of Δ, so it wants a far smaller ``lr``
      than the SGD family's 0.7.
    - ``"error_feedback"``: SparseLoCo's plain SGD, ``momentum`` unused; volunteers keep an
      error-feedback residual that stands in for momentum.

    ``betas`` and ``eps`` are Adam's alone: set for another optimizer, they are an error, and
    they are left out of the config's JSON (so out of its hash) unless ``optimizer`` is
    ``"adam"``. Their defaults are β = (0.9, 0.99), not torch's (0.9, 0.999): runs last tens to
    hundreds of outer steps, and β₂ = 0.999 would average Δ² over about a thousand; ε = 1e-8.
    """

    optimizer: OuterName = "nesterov"
    lr: float = Field(0.7, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    betas: tuple[Beta, Beta] = ADAM_DEFAULTS[0]
    eps: float = Field(ADAM_DEFAULTS[1], gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _adam_settings_only_for_adam(self) -> OuterConfig:
        if self.optimizer != "adam" and (self.betas, self.eps) != ADAM_DEFAULTS:
            raise ValueError(
                f"outer.betas and outer.eps apply only to outer.optimizer 'adam', "
                f"not {self.optimizer!r}"
            )
        return self

    @model_serializer(mode="wrap")
    def _without_unused_settings(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Leaving Adam's settings out for the other optimizers keeps the hash of every config
        # written before they existed, so existing state directories and manifests still match.
        data: dict[str, Any] = handler(self)
        if self.optimizer != "adam":
            data.pop("betas", None)
            data.pop("eps", None)
        return data


class CodecConfig(_Strict):
    """How a pseudo-gradient is compressed on the wire."""

    name: CodecName = "int8"
    block_size: int = Field(64, ge=8, le=1 << 20)
    chunk_size: int = Field(4096, ge=16, le=1 << 24)
    topk: int = Field(64, ge=1, le=1 << 20)
    ef_decay: float = Field(1.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _topk_fits(self) -> CodecConfig:
        if self.topk > self.chunk_size:
            raise ValueError(
                f"codec.topk ({self.topk}) must not exceed codec.chunk_size ({self.chunk_size})"
            )
        return self


class BroadcastConfig(_Strict):
    """How θ_{r+1} travels to volunteers (``protocol.broadcast``).

    ``"fp32"``: θ_{r+1} is the outer step's result, sent whole. ``"int8"``/``"int4"``: the outer
    update θ_{r+1} − θ_r is compressed blockwise with error feedback (the coordinator keeps what
    compression dropped and sends it with the next update), and θ_{r+1} is *defined* as θ_r plus
    the decoded update: exactly what a volunteer holding θ_r reconstructs, so replays stay exact.
    int8 is the default: in three runs of the quick benchmark it ended 0.02–0.34% below the
    exact broadcast (docs/BENCHMARKS.md, "Compressed weight broadcast").
    """

    codec: Literal["fp32", "int8", "int4"] = "int8"
    block_size: int = Field(64, ge=8, le=1 << 20)

    def spec(self) -> CodecConfig:
        """The codec settings the update is encoded with (error feedback without decay)."""
        return CodecConfig(name=self.codec, block_size=self.block_size, ef_decay=1.0)


class AggregationConfig(_Strict):
    """The robust aggregation rule and its parameters."""

    method: AggregatorName = "centered_clip"
    trim_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    bucket_size: int = Field(2, ge=1, le=1024)
    clip_iters: int = Field(1, ge=1, le=100)
    clip_tau: float | None = Field(None, gt=0.0)
    fragment_numel: int = Field(1 << 20, ge=1024, le=1 << 30)


class RoundsConfig(_Strict):
    """The round policy: how many rounds, quorum, deadline and staleness."""

    total: int = Field(20, ge=1, le=10_000_000)
    quorum: int = Field(1, ge=1, le=1_000_000)
    deadline_s: float = Field(120.0, gt=0.0)
    # The fraction of the round after which a newcomer waits for the next round (the quorum
    # reached); None: derived per round by `RunConfig.join_window_s`.
    join_window: float | None = Field(None, gt=0.0, le=1.0)
    # A peer asking after the join window (the quorum reached, a seconds budget) gets an order
    # for the round's remaining work time, if at least this fraction of `inner.seconds` is
    # left; otherwise it waits for the next round (1: never, as with a steps budget).
    late_order_min: float = Field(0.25, gt=0.0, le=1.0)
    peer_timeout_s: float = Field(60.0, gt=0.0)
    max_peers_per_round: int = Field(64, ge=1, le=1_000_000)
    late: StalePolicy = "reject"
    late_weight: float = Field(0.5, ge=0.0, le=1.0)


class DefenceConfig(_Strict):
    """The coordinator's verification pipeline for untrusted contributions (docs/SECURITY.md).

    Stages, in order: format (always on: the codec's checks), norm screening against the round's
    median, copy detection (within the round and against recent rounds), the claimed-samples
    check, robust aggregation (``aggregation``), usefulness scoring, recomputation spot-checks,
    and reputation with probation and bans. ``enabled = false`` turns off every stage except
    format, which is what the robustness benchmark's undefended runs use.
    """

    enabled: bool = True
    norm_low: float = Field(0.2, ge=0.0, lt=1.0)
    norm_high: float = Field(4.0, gt=1.0)
    copy_min_cos: float = Field(0.99, gt=0.0, le=1.0)
    copy_ratio: float = Field(0.1, ge=0.0, le=1.0)
    copy_history_rounds: int = Field(4, ge=0, le=1000)
    fingerprint_blocks: int = Field(256, ge=1, le=1 << 20)
    fingerprint_block_len: int = Field(64, ge=1, le=1 << 16)
    claims_slack: float = Field(2.0, ge=1.0)
    score_per_round: int = Field(4, ge=0, le=100_000)
    # Also score every eligible contribution of a peer that is not established (newcomers on
    # probation, peers with a failed check): risk first, so that a flood of fresh identities
    # is scored in full, not 4 a round (usefulness's absolute test needs no majority).
    score_newcomers: bool = True
    score_min_steps: int = Field(5, ge=1)
    score_batch_size: int = Field(16, ge=1, le=65536)
    score_min_gain: float = Field(0.0)
    score_heldout_tol: float = Field(0.05, ge=0.0)
    score_rel_gain: float = Field(0.3, ge=0.0, le=1.0)
    score_z: float = Field(2.0, ge=0.0)
    # Where usefulness scoring runs: on the coordinator as contributions arrive (before the
    # aggregation, so a flagged one is left out), or as score orders on volunteers in good
    # standing (after the close: a failure voids the credit and strikes, as a failed
    # spot-check does). "auto": the coordinator up to SCORING_ON_COORDINATOR_MAX_PARAMS
    # parameters, volunteers above (`scores_on_peers`).
    scoring: ScoringMode = "auto"
    spot_check: SpotCheckMode = "peer"
    # A peer that has passed no check is drawn with this probability in each round: 0.37
    # leaves a cheater that never passes one (0.63^10 =) 0.98% of escaping 10 rounds, the
    # defences issue's bound (docs/SECURITY.md, measured by bench/escape_probability.py).
    # Each passed check halves it, down to `check_p_min`.
    check_p_new: float = Field(0.37, ge=0.0, le=1.0)
    check_p_min: float = Field(0.02, ge=0.0, le=1.0)
    check_tolerance: float = Field(0.05, gt=0.0)
    # Verifiers' replays that must agree before a spot-check fails (peer mode), so that one
    # lying verifier cannot frame an honest peer; and before it passes (2: one colluding
    # verifier cannot clear a cheat either, at twice the replays). A split asks for more.
    check_fail_quorum: int = Field(2, ge=1, le=8)
    check_pass_quorum: int = Field(1, ge=1, le=8)
    # Whether the coordinator replays a check itself before the verifiers' agreed mismatch
    # counts (it then decides, and overrules the verifiers it disagrees with), so colluding
    # verifiers cannot frame an honest peer however many they are: a replay per failure, paid
    # only when one is reported. "auto": where the coordinator scores (`scores_on_peers`).
    check_confirm: Literal["auto", "coordinator", "off"] = "auto"
    reputation_initial: float = Field(0.3, ge=0.0, le=1.0)
    reputation_gain: float = Field(0.2, gt=0.0, le=1.0)
    reputation_slash: float = Field(0.5, ge=0.0, lt=1.0)
    trust_threshold: float = Field(0.5, ge=0.0, le=1.0)
    probation_rounds: int = Field(2, ge=0)
    probation_weight: float = Field(0.5, gt=0.0, le=1.0)
    # The most of a round's aggregation weight that peers on probation hold together, however
    # many they are (when the round has an established contribution): sybils cannot outweigh.
    probation_share: float = Field(0.25, gt=0.0, lt=1.0)
    ban_strikes: float = Field(3.0, gt=0.0)
    strike_forgive: float = Field(0.25, ge=0.0)
    check_strikes: float = Field(3.0, gt=0.0)


class RunConfig(_Strict):
    """A whole run: everything a coordinator needs to start, and what the manifest pins.

    ``outer.lr`` and ``outer.momentum``, when the config leaves them out, are derived from the
    run by ``derive_outer`` (Nesterov and SGD only); the resolved config holds the values.
    """

    name: str = Field("crowdtrain", min_length=1, max_length=128)
    seed: int = Field(0, ge=0)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    inner: InnerConfig = InnerConfig()
    outer: OuterConfig = OuterConfig()
    codec: CodecConfig = CodecConfig()
    broadcast: BroadcastConfig = BroadcastConfig()
    aggregation: AggregationConfig = AggregationConfig()
    rounds: RoundsConfig = RoundsConfig()
    defence: DefenceConfig = DefenceConfig()

    @model_validator(mode="before")
    @classmethod
    def _derive_outer(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        outer = data.get("outer", {})
        if not isinstance(outer, dict) or outer.get("optimizer", "nesterov") not in DERIVED_FOR:
            return data
        if "lr" in outer and "momentum" in outer:
            return data
        rule = derive_outer(data)
        filled = {"lr": rule.lr, "momentum": rule.momentum, **outer}
        return {**data, "outer": filled}

    def join_window_s(self, round_seconds: float, orders: int) -> float:
        """Seconds after a round opens during which a newcomer still gets a work order, once
        the round has `orders` orders out (and its quorum).

        An explicit ``rounds.join_window`` is that fraction of the round. Otherwise the window
        is the round's work divided among its orders: a peer joining d seconds late holds the
        round's close about d seconds, and adds one contribution to the `orders` the round
        already has, so it pays for itself while d < T / orders, with T the round's work time
        (``inner.seconds`` of a seconds budget, else the round's deadline). Measured on
        consumer-1b in docs/SIMULATIONS.md: 11% more loss per online FLOP than a fixed half
        round, 1.6% more than a fixed tenth.
        """
        if self.rounds.join_window is not None:
            return self.rounds.join_window * round_seconds
        work = self.inner.seconds if self.inner.budget == "seconds" else round_seconds
        return min(round_seconds, work) / max(1, orders)

    def late_order_s(self, since_open: float) -> float | None:
        """The work seconds of an order handed out `since_open` seconds into a round, past its
        join window: what is left of the round's `inner.seconds`, so that the late peer ends
        about when the others do and holds no close; None (it waits for the next round) for
        a steps budget or when less than `rounds.late_order_min` of the round's work is left.
        The late contribution is weighted by the samples it trained, as every other is."""
        if self.inner.budget != "seconds":
            return None
        left = self.inner.seconds - max(0.0, since_open)
        return left if left >= self.rounds.late_order_min * self.inner.seconds else None


@dataclass(frozen=True)
class OuterRule:
    """Outer settings derived for a run, and why (``config show`` prints the reason)."""

    lr: float
    momentum: float
    reason: str


#: The outer optimizers whose lr and momentum are derived when the config leaves them out.
DERIVED_FOR = ("nesterov", "sgd")


def derive_outer(raw: Mapping[str, Any]) -> OuterRule:
    """The outer lr and momentum for a run, from its raw config (defaults where unset).

    Fitted to the sweeps of docs/BENCHMARKS.md ("Outer-step settings: the rule"). The outer
    step amplifies the mean pseudo-gradient by up to lr/(1 − μ); the DiLoCo paper's 0.7 / 0.9
    (7×) is for hundreds of outer steps and loses in every run of 6–60 rounds measured here.
    """
    inner = raw.get("inner", {}) if isinstance(raw.get("inner", {}), dict) else {}
    rounds = raw.get("rounds", {}) if isinstance(raw.get("rounds", {}), dict) else {}
    state = inner.get("optimizer_state")
    if state is None and "keep_optimizer_state" in inner:
        state = "kept" if inner["keep_optimizer_state"] else "fresh"
    state = state or InnerConfig.model_fields["optimizer_state"].default
    total = rounds.get("total", RoundsConfig.model_fields["total"].default)
    quorum = rounds.get("quorum", RoundsConfig.model_fields["quorum"].default)
    return outer_rule(
        str(state),
        int(total) if isinstance(total, int) else 0,
        int(quorum) if isinstance(quorum, int) else 1,
    )


#: The longest run (in rounds) the sweeps behind ``outer_rule`` measured.
MEASURED_ROUNDS = 60
#: From this many rounds on, with at most MOMENTUM_QUORUM contributions required per round,
#: published or kept AdamW moments get outer momentum (the 4-worker sweeps: plain averaging won
#: at 6 and 12 rounds, lr 0.7 / momentum 0.5 at 30 and 60; with 8-16 contributions a round, on
#: consumer-1b and datacenter-diloco, plain averaging won at 30).
MOMENTUM_ROUNDS = 20
MOMENTUM_QUORUM = 4


def outer_rule(state: str, rounds: int, quorum: int = 1) -> OuterRule:
    """The outer lr and momentum for AdamW state `state` and a run of `rounds` rounds that
    needs `quorum` contributions a round (the fewest it averages)."""
    beyond = (
        f"; this run's {rounds} rounds are beyond the {MEASURED_ROUNDS} the sweeps measured, "
        "so the value is extrapolated"
        if rounds > MEASURED_ROUNDS
        else ""
    )
    if state == "fresh":
        return OuterRule(
            1.0,
            0.5,
            "with AdamW fresh every round, lr 1.0 and momentum 0.5 was best in 3 of the 6 rows "
            "of the sweep (2 and 4 workers, H 10-50, 8-40 rounds) and within 1.2% of the best "
            "in the others" + beyond,
        )
    if rounds >= MOMENTUM_ROUNDS and quorum <= MOMENTUM_QUORUM:
        return OuterRule(
            0.7,
            0.5,
            f"with AdamW moments carried into each round ({state}), {rounds} rounds (at least "
            f"{MOMENTUM_ROUNDS}) and a quorum of {quorum} (at most {MOMENTUM_QUORUM}): lr 0.7 / "
            "momentum 0.5 beat plain averaging at 30 and 60 rounds with 4 workers (H 10 and 5: "
            "by 1.2-1.6% on two seeds, and 1.4%) and lost at 12 and 6 rounds; larger "
            "amplification (lr 1 / momentum 0.5, lr 0.7 / momentum 0.7) lost by 13-14%" + beyond,
        )
    why = (
        f"only {rounds} rounds (fewer than {MOMENTUM_ROUNDS}): plain averaging beat lr 0.7 / "
        "momentum 0.5 at 12 rounds (4 workers, H 25) by 1.5% and at 6; outer momentum needs "
        "rounds to build up"
        if rounds < MOMENTUM_ROUNDS
        else f"a quorum of {quorum} (more than {MOMENTUM_QUORUM}): with 8-16 contributions a "
        "round, plain averaging beat lr 0.7 / momentum 0.5 over 30 rounds on the simulated "
        "consumer-1b (2.0266 against 2.0509) and datacenter-diloco (1.9206 against 1.9884)"
    )
    return OuterRule(
        1.0,
        0.0,
        f"with AdamW moments carried into each round ({state}) and {why}: plain averaging "
        "(lr 1, momentum 0)" + beyond,
    )


def _key(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _allowed_keys(loc: tuple[int | str, ...]) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def _describe(error: Any) -> str:
    """Turn the first pydantic error into one sentence naming the key and what is allowed."""
    loc = tuple(error["loc"])
    key = _key(loc)
    kind = error["type"]
    got = error.get("input")
    if kind == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(loc))
        return f"unknown config key '{key}'; allowed keys here are: {allowed}"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"config key '{key}' is {got!r}; allowed values are {expected}"
    if kind == "value_error":
        return f"bad config: {str(error['msg']).removeprefix('Value error, ')}"
    return f"config key '{key}' is {got!r}: {error['msg'].lower()}"


def parse_config(raw: dict[str, Any]) -> RunConfig:
    """Validate a config mapping; raise ConfigError with one clear sentence when it is bad."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0])) from None


def load_config(path: str | Path | None) -> RunConfig:
    """Load a run config from a TOML file; `None` gives the built-in defaults."""
    return parse_config(load_raw(path))


#: `defence.scoring = "auto"` scores on the coordinator up to this many parameters and on
#: volunteers above: scoring one contribution is four forward passes of the model, about
#: 2.4 s of one CPU core at 10.7M parameters and 10 s at 100M (docs/BENCHMARKS.md,
#: "Coordinator cost per round"), so 4 a round at 50M cost about 20 s of a core.
SCORING_ON_COORDINATOR_MAX_PARAMS = 50_000_000


def scores_on_peers(defence: DefenceConfig, params: int) -> bool:
    """Whether usefulness scoring runs as score orders on volunteers for a model of PARAMS
    parameters (`DefenceConfig.scoring`)."""
    if defence.scoring == "auto":
        return params > SCORING_ON_COORDINATOR_MAX_PARAMS
    return defence.scoring == "peer"


def confirms_on_coordinator(defence: DefenceConfig, params: int) -> bool:
    """Whether the coordinator replays a check that verifiers agreed failed before it counts
    (`DefenceConfig.check_confirm`; "auto": where the coordinator also scores)."""
    if defence.check_confirm == "auto":
        return not scores_on_peers(defence, params)
    return defence.check_confirm == "coordinator"


def derived_settings(raw: Mapping[str, Any]) -> list[str]:
    """One sentence per setting of `raw` (a config file's mapping) that the run derives rather
    than reads, with its value and why."""
    lines = []
    outer = raw.get("outer", {})
    outer = outer if isinstance(outer, dict) else {}
    if outer.get("optimizer", "nesterov") in DERIVED_FOR:
        rule = derive_outer(raw)
        lines += [
            f"outer.{key} = {getattr(rule, key)} (derived: {rule.reason}; set it in [outer] to "
            "override)"
            for key in ("lr", "momentum")
            if key not in outer
        ]
    rounds = raw.get("rounds", {})
    if not isinstance(rounds, dict) or rounds.get("join_window") is None:
        inner = raw.get("inner", {})
        seconds = isinstance(inner, dict) and inner.get("budget") == "seconds"
        work = "the inner.seconds of compute" if seconds else "the round's deadline"
        lines.append(
            f"rounds.join_window: derived each round as {work} divided by the work orders "
            "already out (a newcomer joining d seconds late holds the round about d seconds for "
            "one more contribution); set a fraction of the round in [rounds] to override"
        )
    defence = raw.get("defence", {})
    defence = defence if isinstance(defence, dict) else {}
    scoring_auto = defence.get("scoring", "auto") == "auto"
    confirm_auto = defence.get("check_confirm", "auto") == "auto"
    if scoring_auto or confirm_auto:
        from crowdtrain.models import count_params  # the models import this module

        params = count_params(ModelConfig.model_validate(raw.get("model", {})))
        dcfg = DefenceConfig.model_validate(defence)
        on_peers = scores_on_peers(dcfg, params)
        if scoring_auto:
            side = "above" if on_peers else "at most"
            lines.append(
                f"defence.scoring = {'peer' if on_peers else 'coordinator'} (derived: the model "
                f"has {params:,} parameters, {side} {SCORING_ON_COORDINATOR_MAX_PARAMS:,}; set "
                "it in [defence] to override)"
            )
        if confirm_auto:
            how = "off" if not confirms_on_coordinator(dcfg, params) else "coordinator"
            lines.append(
                f"defence.check_confirm = {how} (derived: the coordinator replays a check that "
                "verifiers agree failed where it also scores; set it in [defence] to override)"
            )
    return lines


def load_raw(path: str | Path | None) -> dict[str, Any]:
    """A config file's TOML as a mapping, not yet validated; `None` gives an empty one."""
    if path is None:
        return {}
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no whitespace) used for every content hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def config_hash(config: RunConfig) -> str:
    """Stable sha256 of the resolved config (defaults filled in), as a hex string."""
    return hashlib.sha256(canonical_json(config.model_dump(mode="json"))).hexdigest()


def allowed_values(name: str) -> tuple[str, ...]:
    """The allowed names for one of the config's choice fields (for CLI help and errors)."""
    table = {
        "arch": ArchName,
        "codec": CodecName,
        "aggregator": AggregatorName,
        "outer": OuterName,
    }
    return tuple(get_args(table[name]))
