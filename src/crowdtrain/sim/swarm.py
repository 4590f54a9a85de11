"""In-process swarm: N virtual volunteers driven through the real protocol core, no network.

Each round every volunteer asks the protocol for work, trains with `LocalTrainer` on exactly the
batches its work order names, compresses its pseudo-gradient with the run's codec (keeping the
error-feedback residual when the codec or outer optimizer uses one), and the coordinator side
decodes the payload and hands it to the protocol. So the numerics and the wire bytes are those
of the networked system; only time is virtual (a counter) and transfers are instant. The
discrete-event simulator with network and compute costs builds on this.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crowdtrain import codec
from crowdtrain.adversary import Attacker, Claim, RoundView, encode_forgery, idle_start
from crowdtrain.client.volunteer import CarriedWork, replay_work
from crowdtrain.config import RunConfig
from crowdtrain.data import (
    BatchSampler,
    DataManifest,
    ShardStore,
    ensure_packed_for,
    eval_batches,
)
from crowdtrain.data.probe import ShardProbe
from crowdtrain.models import initial_state
from crowdtrain.protocol import (
    Banned,
    ContributionMalformed,
    ContributionSubmitted,
    Decision,
    Flagged,
    PeerJoined,
    PriorWork,
    Rejected,
    RoundClosed,
    RoundProtocol,
    RunFinished,
    Tick,
    VerificationSubmitted,
    VerifyOrder,
    WorkOrder,
    WorkRequested,
)
from crowdtrain.robust import DictSource
from crowdtrain.train import Contribution, LocalTrainer, evaluate


@dataclass(frozen=True)
class RoundRow:
    """One line of the per-round table."""

    round: int
    train_loss: float
    eval_loss: float
    contributions: int
    bytes_up: int


@dataclass
class SwarmResult:
    """What a swarm run produced: the per-round table, the evaluation losses, and what the
    verification pipeline did (peers flagged or rejected at least once, bans, spot-checks)."""

    rounds: list[RoundRow] = field(default_factory=list)
    initial_eval_loss: float = math.nan
    final_eval_loss: float = math.nan
    attackers: list[str] = field(default_factory=list)
    flagged: list[str] = field(default_factory=list)
    banned: dict[str, str] = field(default_factory=dict)
    train_steps: int = 0
    verify_steps: int = 0
    scored: int = 0
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    submissions: list[tuple[str, int]] = field(default_factory=list)  # (peer, round) uploads

    def to_json(self) -> dict[str, Any]:
        """The JSON document of `crowdtrain simulate --json`."""
        return {
            "rounds": [asdict(r) for r in self.rounds],
            "initial_eval_loss": self.initial_eval_loss,
            "final_eval_loss": self.final_eval_loss,
            "attackers": self.attackers,
            "flagged": self.flagged,
            "banned": self.banned,
            "train_steps": self.train_steps,
            "verify_steps": self.verify_steps,
            "scored": self.scored,
            "verdicts": self.verdicts,
            "submissions": [list(s) for s in self.submissions],
        }


class _CounterClock:
    """Virtual time: advances only when the driver says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def uses_error_feedback(config: RunConfig) -> bool:
    """Whether volunteers keep a compression residual (top-k codec or SparseLoCo outer step)."""
    return config.codec.name == "topk2bit" or config.outer.optimizer == "error_feedback"


def load_shards(manifest: DataManifest, data_dir: Path) -> dict[str, np.ndarray]:
    """Load (and verify) every shard of a packed corpus into memory, keyed by sha256."""
    store = ShardStore(data_dir)
    ids = list(manifest.train_ids) + list(manifest.val_ids)
    return {sha: store.load(sha, verify=True) for sha in ids}


@dataclass
class RunData:
    """What an in-process run needs from its corpus: shards, evaluation and scoring batches."""

    manifest: DataManifest
    shards: dict[str, np.ndarray]
    evals: list[tuple[torch.Tensor, torch.Tensor]]
    probe: ShardProbe

    @classmethod
    def load(cls, config: RunConfig, eval_batch_count: int, eval_batch_size: int) -> RunData:
        """Pack the corpus if needed, load it, and set torch's thread count for the run."""
        torch.set_num_threads(config.inner.threads)
        manifest = ensure_packed_for(config.data)
        shards = load_shards(manifest, Path(config.data.dir))
        evals = eval_batches(
            shards,
            manifest.val_ids,
            batch_size=eval_batch_size,
            context=config.model.context,
            n_batches=eval_batch_count,
            seed=config.data.seed,
        )
        probe = ShardProbe(
            shards,
            manifest.val_ids,
            train_batch_size=config.data.batch_size,
            batch_size=config.defence.score_batch_size,
            context=config.model.context,
            seed=config.data.seed,
        )
        return cls(manifest, shards, evals, probe)


def trainer_for(config: RunConfig, shared: LocalTrainer) -> LocalTrainer:
    """A volunteer's trainer: its own when AdamW state persists across rounds, else `shared`
    (a fresh optimizer each round makes sharing one model safe and cheaper)."""
    if config.inner.keep_optimizer_state:
        return LocalTrainer(config.model, config.inner)
    return shared


def batch_sampler(
    order: WorkOrder | VerifyOrder | PriorWork,
    peer: str,
    shards: Mapping[str, np.ndarray],
    config: RunConfig,
) -> BatchSampler:
    """The batch stream a work order (a replayed one, or a replay's prior work) names for `peer`."""
    return BatchSampler(
        shards,
        order.shard_ids,
        seed=order.seed,
        round=order.round,
        peer=peer,
        batch_size=config.data.batch_size,
        context=config.model.context,
    )


class Volunteer:
    """One virtual volunteer: its trainer (or a shared one), its residual, maybe an attack."""

    def __init__(
        self, peer_id: str, trainer: LocalTrainer, attacker: Attacker | None = None
    ) -> None:
        self.peer_id = peer_id
        self.trainer = trainer
        self.attacker = attacker
        self.residual: dict[str, torch.Tensor] | None = None

    def train(
        self,
        order: WorkOrder | VerifyOrder,
        base: Mapping[str, torch.Tensor],
        shards: Mapping[str, np.ndarray],
        config: RunConfig,
        carried: CarriedWork | None = None,
    ) -> Contribution:
        """Train on the batches a work order (or the replayed order of a spot-check) names.

        With `carried`, the first steps are overlapped work of the previous round, rebased onto
        `base` exactly as the networked volunteer does it (`client.volunteer.replay_work`).
        """
        peer = order.target if isinstance(order, VerifyOrder) else self.peer_id
        steps = order.steps if isinstance(order, VerifyOrder) else order.max_steps
        batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(
            batch_sampler(order, peer, shards, config)
        )
        if self.attacker is not None and isinstance(order, WorkOrder):
            batches = self.attacker.poison(batches, config.model.vocab_size)
        return replay_work(
            self.trainer.train,
            base,
            batches,
            step_offset=order.step_offset,
            steps=steps,
            carried=carried,
        )

    def work(
        self,
        order: WorkOrder,
        base: Mapping[str, torch.Tensor],
        shards: Mapping[str, np.ndarray],
        config: RunConfig,
        feedback: bool,
        carried: CarriedWork | None = None,
    ) -> tuple[bytes, Contribution]:
        """Train on the work order (after `carried` overlapped steps, see `train`); return the
        wire payload and the local result."""
        result = self.train(order, base, shards, config, carried)
        if feedback and self.residual is None:
            self.residual = {}
        return codec.encode(result.delta, config.codec, residual=self.residual), result

    def attack(
        self,
        order: WorkOrder,
        base: Mapping[str, torch.Tensor],
        shards: Mapping[str, np.ndarray],
        config: RunConfig,
        view: RoundView,
    ) -> tuple[bytes, Claim]:
        """Train (unless the attack skips it), forge, and encode what the attacker sends."""
        assert self.attacker is not None
        if self.attacker.trains:
            local = self.train(order, base, shards, config)
            honest = local.delta
            claim = Claim(local.samples, local.tokens, local.steps, local.loss_mean)
        else:
            honest, claim = idle_start(
                base,
                max_steps=order.max_steps,
                batch_size=config.data.batch_size,
                context=config.model.context,
            )
        forgery = self.attacker.forge(honest, claim, view)
        return encode_forgery(forgery, config.codec), forgery.claim


def decode_submission(
    peer_id: str,
    order: WorkOrder,
    payload: bytes,
    claim: Claim,
    shapes: Mapping[str, tuple[int, ...]],
) -> ContributionSubmitted | ContributionMalformed:
    """The coordinator's side of an upload: the format stage, then a submission event."""
    try:
        delta = codec.decode(payload, shapes)
    except codec.PayloadError as exc:
        return ContributionMalformed(peer_id, order.round, str(exc))
    return ContributionSubmitted(
        peer_id=peer_id,
        round=order.round,
        base_version=order.base_version,
        delta=DictSource(delta),
        samples=claim.samples,
        tokens=claim.tokens,
        steps=claim.steps,
        train_loss=claim.train_loss,
        payload_bytes=len(payload),
    )


def _claim(result: Contribution) -> Claim:
    return Claim(result.samples, result.tokens, result.steps, result.loss_mean)


@dataclass
class _Swarm:
    """The state of one in-process run: protocol, volunteers, bases of recent versions."""

    config: RunConfig
    protocol: RoundProtocol
    volunteers: list[Volunteer]
    shards: dict[str, np.ndarray]
    feedback: bool
    bases: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    train_steps: int = 0
    verify_steps: int = 0
    flagged: set[str] = field(default_factory=set)
    banned: dict[str, str] = field(default_factory=dict)
    submissions: list[tuple[str, int]] = field(default_factory=list)
    closed: RoundClosed | None = None
    finished: bool = False

    def act(self, decisions: list[Decision]) -> None:
        """Follow up on decisions: note closes and bans; replay coordinator spot-checks."""
        for d in decisions:
            if isinstance(d, RoundClosed):
                self.closed = d
            elif isinstance(d, RunFinished):
                self.finished = True
            elif isinstance(d, Flagged) or (
                isinstance(d, Rejected) and d.code in ("bad_claim", "bad_payload")
            ):
                self.flagged.add(d.peer_id)
            elif isinstance(d, Banned):
                self.banned[d.peer_id] = d.reason
            elif isinstance(d, VerifyOrder) and not d.peer_id:
                self.verify(self.volunteers[0], d)  # the coordinator replays it itself

    def verify(self, verifier: Volunteer, order: VerifyOrder) -> None:
        """Replay a spot-checked work order and submit Δ'."""
        replay = verifier.train(order, self.bases[order.base_version], self.shards, self.config)
        self.verify_steps += replay.steps
        event = VerificationSubmitted(
            order.check_id, order.peer_id, DictSource(replay.delta), replay.steps
        )
        self.act(self.protocol.handle(event))

    def round(self) -> None:
        """Every volunteer asks for work (honest ones first) and does it."""
        protocol, config = self.protocol, self.config
        base = {k: t.clone() for k, t in protocol.params.items()}
        self.bases[protocol.version] = base
        for old in [v for v in self.bases if v < protocol.version - 4]:
            del self.bases[old]
        honest: list[dict[str, torch.Tensor]] = []
        attackers = sum(
            1 for v in self.volunteers if v.attacker is not None and v.peer_id not in self.banned
        )
        # Every volunteer asks first (as real ones do at a round's start), then all train.
        orders = [(v, self._next_order(v)) for v in self.volunteers]
        for v, order in orders:
            if order is None:
                continue
            if v.attacker is None:
                payload, local = v.work(order, base, self.shards, config, self.feedback)
                self.train_steps += local.steps
                claim = _claim(local)
                honest.append(local.delta)  # what a copycat or colluder sees of this peer
            else:
                view = RoundView(
                    round=order.round,
                    peers=len(self.volunteers),
                    attackers=attackers,
                    honest=honest,
                    others=honest,
                )
                payload, claim = v.attack(order, base, self.shards, config, view)
                self.train_steps += claim.steps if v.attacker.trains else 0
            event = decode_submission(v.peer_id, order, payload, claim, protocol.shapes)
            self.submissions.append((v.peer_id, order.round))
            self.act(protocol.handle(event))

    def _next_order(self, v: Volunteer) -> WorkOrder | None:
        while True:
            (decision,) = self.protocol.handle(WorkRequested(v.peer_id))
            if isinstance(decision, VerifyOrder):
                self.verify(v, decision)
                continue
            return decision if isinstance(decision, WorkOrder) else None


def run_swarm(
    config: RunConfig,
    peers: int,
    *,
    attack: str | None = None,
    attackers: int = 0,
    eval_batch_count: int = 8,
    eval_batch_size: int = 16,
    on_round: Callable[[RoundRow], None] | None = None,
) -> SwarmResult:
    """Run `peers` in-process volunteers through `config.rounds.total` rounds of the protocol.

    With `attack`, the last `attackers` of them run that attack (crowdtrain.adversary); they ask
    for work after the honest ones, so colluding attacks see the honest updates (worst case).
    """
    if attack is not None and not 0 < attackers < peers:
        raise ValueError(f"--attackers must be between 1 and {peers - 1} (the peers less one)")
    data = RunData.load(config, eval_batch_count, eval_batch_size)
    manifest, shards, evals, probe = data.manifest, data.shards, data.evals, data.probe
    clock = _CounterClock()
    protocol = RoundProtocol(
        config, initial_state(config.model), manifest.train_ids, clock, probe=probe
    )
    shared = LocalTrainer(config.model, config.inner)
    volunteers = []
    for i in range(peers):
        trainer = trainer_for(config, shared)
        bad = attack is not None and i >= peers - attackers
        attacker = Attacker(attack, f"peer-{i}", config.seed) if bad and attack else None
        volunteers.append(Volunteer(f"peer-{i}", trainer, attacker))
    for v in volunteers:
        protocol.handle(PeerJoined(v.peer_id, v.peer_id))
    swarm = _Swarm(config, protocol, volunteers, shards, uses_error_feedback(config))
    result = SwarmResult(initial_eval_loss=evaluate(config.model, protocol.params, evals))
    for step in itertools.count():
        swarm.closed = None
        swarm.round()
        clock.now = float(step + 1)
        if swarm.closed is None:  # someone was refused or banned: the deadline closes it
            clock.now = max(clock.now, protocol.deadline)
            swarm.act(protocol.handle(Tick()))
        closed = swarm.closed
        if closed is None:
            raise RuntimeError("the round did not close after every volunteer contributed")
        row = RoundRow(
            round=closed.round,
            train_loss=closed.train_loss,
            eval_loss=evaluate(config.model, protocol.params, evals),
            contributions=len(closed.contributors),
            bytes_up=closed.payload_bytes,
        )
        result.rounds.append(row)
        if on_round is not None:
            on_round(row)
        if swarm.finished:
            break
    result.final_eval_loss = result.rounds[-1].eval_loss
    result.attackers = [v.peer_id for v in volunteers if v.attacker is not None]
    result.flagged = sorted(swarm.flagged)
    result.banned = dict(swarm.banned)
    result.train_steps, result.verify_steps = swarm.train_steps, swarm.verify_steps
    result.scored = protocol.scored
    result.submissions = list(swarm.submissions)
    result.verdicts = [asdict(v) for v in protocol.verdicts]
    return result
