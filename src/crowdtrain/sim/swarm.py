"""In-process swarm: N virtual volunteers driven through the real protocol core, no network.

Every volunteer is a `VolunteerMachine` (`client/machine.py`), the state machine the networked
client drives; this module carries out its decisions with instant transfers. Each round every
volunteer asks the protocol for work, trains with `LocalTrainer` on exactly the batches its
work order names, compresses its pseudo-gradient with the run's codec (the machine keeps the
error-feedback residual when the codec or outer optimizer uses one), and the coordinator side
decodes the payload and hands it to the protocol. So the numerics and the wire bytes are those
of the networked system; only time is virtual (a counter) and transfers are instant: overlapped
training never gets a step in before the next base is there. The discrete-event simulator
(`sim/des.py`), with network and compute costs, drives the same machines in virtual time.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crowdtrain import codec
from crowdtrain import protocol as pr
from crowdtrain.adversary import Attacker, Claim, RoundView
from crowdtrain.client import events as ve
from crowdtrain.client import machine as vm
from crowdtrain.config import ConfigError, RunConfig
from crowdtrain.data import DataManifest, ShardStore, ensure_packed_for, eval_batches
from crowdtrain.data.probe import ShardProbe
from crowdtrain.models import initial_state
from crowdtrain.robust import DictSource, read_all
from crowdtrain.robust.usefulness import Scorers
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
    diverged: str | None = None  # why training stopped early: θ no longer trains (NaN loss)

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
            "diverged": self.diverged,
        }


def run_swarm(
    config: RunConfig,
    peers: int,
    *,
    attack: str | None = None,
    attackers: int = 0,
    seeds: int = 0,
    eval_batch_count: int = 8,
    eval_batch_size: int = 16,
    eval_every: int = 1,
    on_round: Callable[[RoundRow], None] | None = None,
) -> SwarmResult:
    """Run `peers` in-process volunteers through `config.rounds.total` rounds of the protocol.

    The held-out loss is measured after every `eval_every`-th round and after the last (NaN in
    the rows of the others): a benchmark that needs only the final loss skips the rest.

    With `attack`, the last `attackers` of them run that attack (crowdtrain.adversary); they ask
    for work after the honest ones, so colluding attacks see the honest updates (worst case).
    The first `seeds` join as seed volunteers (`PeerJoined.seed`: established from the start).
    """
    if eval_every < 1:
        raise ValueError(f"eval_every must be at least 1, not {eval_every}")
    if attack is not None and not 0 < attackers < peers:
        raise ValueError(f"--attackers must be between 1 and {peers - 1} (the peers less one)")
    if not 0 <= seeds <= peers - attackers:
        raise ValueError(f"seeds must be honest peers: 0 to {peers - attackers}, not {seeds}")
    data = RunData.load(config, eval_batch_count, eval_batch_size)
    manifest, shards, evals, probe = data.manifest, data.shards, data.evals, data.probe
    clock = _CounterClock()
    protocol = pr.RoundProtocol(
        config, initial_state(config.model), manifest.train_ids, clock, probe=probe
    )
    shared = LocalTrainer(config.model, config.inner)
    swarm = _Swarm(config, protocol, [], shards, val_ids=list(manifest.val_ids))
    for i in range(peers):
        bad = attack is not None and i >= peers - attackers
        attacker = Attacker(attack, f"peer-{i}", config.seed) if bad and attack else None
        machine = vm.VolunteerMachine(
            f"peer-{i}", config, protocol.shapes, attacker=attacker, view=swarm.view
        )
        peer = SimPeer(f"peer-{i}", machine, trainer_for(config, shared))
        peer.feed(ve.Start())
        swarm.peers.append(peer)
        protocol.handle(pr.PeerJoined(peer.peer_id, peer.peer_id, seed=i < seeds))
    result = SwarmResult(initial_eval_loss=evaluate(config.model, protocol.params, evals))
    for step in itertools.count():
        swarm.closed = None
        try:
            swarm.round()
        except FloatingPointError as exc:  # θ itself diverged (an undefended attack): the end
            result.diverged = f"round {protocol.round}: {exc}"
            break
        clock.now = float(step + 1)
        if swarm.closed is None:  # someone was refused or banned: the deadline closes it
            clock.now = max(clock.now, protocol.deadline)
            swarm.act(protocol.handle(pr.Tick()))
        closed = swarm.closed
        if closed is None:
            got = len(protocol.submitted())
            if got < config.rounds.quorum:
                banned = sum(p.standing.banned for p in protocol.peers.values())
                raise ConfigError(
                    f"round {protocol.round} cannot close: its quorum is "
                    f"{config.rounds.quorum} contributions, but only {got} of the "
                    f"{len(protocol.peers)} volunteers' were accepted ({banned} of the volunteers "
                    "banned); lower rounds.quorum or run more volunteers"
                )
            raise RuntimeError("the round did not close after every volunteer contributed")
        measured = swarm.finished or (step + 1) % eval_every == 0
        row = RoundRow(
            round=closed.round,
            train_loss=closed.train_loss,
            eval_loss=evaluate(config.model, protocol.params, evals) if measured else math.nan,
            contributions=len(closed.contributors),
            bytes_up=closed.payload_bytes,
        )
        result.rounds.append(row)
        if on_round is not None:
            on_round(row)
        if swarm.finished:
            break
    result.final_eval_loss = (
        evaluate(config.model, protocol.params, evals)
        if result.diverged or not result.rounds
        else result.rounds[-1].eval_loss
    )
    result.attackers = [p.peer_id for p in swarm.peers if p.machine.attacker is not None]
    result.flagged = sorted(swarm.flagged)
    result.banned = dict(swarm.banned)
    result.train_steps, result.verify_steps = swarm.train_steps, swarm.verify_steps
    result.scored = protocol.scored
    result.submissions = list(swarm.submissions)
    result.verdicts = [asdict(v) for v in protocol.verdicts]
    return result


class _CounterClock:
    """Virtual time: advances only when the driver says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


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
        probe = ShardProbe.of_run(shards, manifest.val_ids, config)
        return cls(manifest, shards, evals, probe)


def trainer_for(config: RunConfig, shared: LocalTrainer) -> LocalTrainer:
    """A volunteer's trainer: its own when AdamW state persists across rounds, else `shared`
    (a fresh optimizer each round makes sharing one model safe and cheaper)."""
    if config.inner.keep_optimizer_state:
        return LocalTrainer(config.model, config.inner)
    return shared


def decode_submission(
    peer_id: str,
    order: pr.WorkOrder,
    payload: bytes,
    claim: Claim,
    shapes: Mapping[str, tuple[int, ...]],
) -> pr.ContributionSubmitted | pr.ContributionMalformed:
    """The coordinator's side of an upload: the format stage, then a submission event."""
    try:
        delta = codec.decode(payload, shapes)
    except codec.PayloadError as exc:
        return pr.ContributionMalformed(peer_id, order.round, str(exc))
    return pr.ContributionSubmitted(
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


def as_steps(order: pr.WorkOrder, steps: int | None = None) -> pr.WorkOrder:
    """`order` with a budget of `steps` steps (default its `max_steps`): a simulated volunteer
    has no wall clock, so a seconds budget is the steps it trains in that time."""
    return dataclasses.replace(order, budget="steps", max_steps=steps or order.max_steps)


@dataclass(eq=False)
class SimPeer:
    """One simulated volunteer: its machine, its trainer, and the decisions it has yet to
    carry out (the in-process drivers run them one by one)."""

    peer_id: str
    machine: vm.VolunteerMachine
    trainer: LocalTrainer
    pending: deque[ve.Decision] = field(default_factory=deque)

    def feed(self, event: ve.Event) -> None:
        """Hand the machine an event; queue the decisions it returns."""
        self.pending.extend(self.machine.handle(event))

    def train(self, d: ve.Train, shards: Mapping[str, np.ndarray]) -> Contribution:
        """The numerics of a `Train` decision, on the shards in memory."""
        return d.segment.run(self.trainer.train, self.machine.batches(d.segment, shards))


def replay(
    trainer: LocalTrainer,
    check: pr.VerifyOrder,
    base: Mapping[str, torch.Tensor],
    shards: Mapping[str, np.ndarray],
    config: RunConfig,
    prior: Mapping[str, torch.Tensor] | None = None,
) -> Contribution:
    """A spot-check replay computed in process (by a volunteer or by the coordinator); `prior`
    is where the overlapped steps it redoes began (θ_prior − Δ_sent), if any."""
    return ve.Replay(check, base, prior).run(trainer.train, shards, config)


@dataclass
class _Swarm:
    """The state of one in-process run: protocol, volunteers, bases of recent versions."""

    config: RunConfig
    protocol: pr.RoundProtocol
    peers: list[SimPeer]
    shards: dict[str, np.ndarray]
    val_ids: list[str] = field(default_factory=list)  # for score orders' held-out batches
    bases: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    train_steps: int = 0
    verify_steps: int = 0
    flagged: set[str] = field(default_factory=set)
    banned: dict[str, str] = field(default_factory=dict)
    submissions: list[tuple[str, int]] = field(default_factory=list)
    honest: list[Mapping[str, torch.Tensor]] = field(default_factory=list)
    # what each attacker submitted, by (peer, round), for the coalition's side channel
    forged: dict[tuple[str, int], Mapping[str, torch.Tensor]] = field(default_factory=dict)
    attackers: int = 0
    scores: int = 0  # score orders answered by volunteers
    closed: pr.RoundClosed | None = None
    finished: bool = False

    def view(self, round: int, own: Mapping[str, torch.Tensor]) -> RoundView:
        """What the attacker coalition sees: every honest Δ of the round so far (omniscient),
        and its own members' submissions of ROUND."""
        coalition = frozenset(p.peer_id for p in self.peers if p.machine.attacker is not None)
        return RoundView(
            round=round,
            peers=len(self.peers),
            attackers=self.attackers,
            honest=self.honest,
            others=self.honest,
            coalition=coalition,
            accomplices={peer: d for (peer, r), d in self.forged.items() if r == round},
        )

    def act(self, decisions: list[pr.Decision]) -> None:
        """Follow up on decisions: note closes and bans; replay coordinator spot-checks."""
        for d in decisions:
            if isinstance(d, pr.RoundClosed):
                self.closed = d
            elif isinstance(d, pr.RunFinished):
                self.finished = True
            elif isinstance(d, pr.Flagged) or (
                isinstance(d, pr.Rejected) and d.code in ("bad_claim", "bad_payload")
            ):
                self.flagged.add(d.peer_id)
            elif isinstance(d, pr.Banned):
                self.banned[d.peer_id] = d.reason
            elif isinstance(d, pr.VerifyOrder) and not d.peer_id:  # the coordinator replays it
                result = replay(
                    self.peers[0].trainer,
                    d,
                    self.bases[d.base_version],
                    self.shards,
                    self.config,
                )
                self.verified(d, result)

    def verified(self, check: pr.VerifyOrder, result: Contribution) -> None:
        """Hand a replay's Δ' to the protocol."""
        self.verify_steps += result.steps
        event = pr.VerificationSubmitted(
            check.check_id, check.peer_id, DictSource(result.delta), result.steps
        )
        self.act(self.protocol.handle(event))

    def round(self) -> None:
        """Every volunteer asks for work (honest ones first), then each does its order."""
        protocol = self.protocol
        self.bases[protocol.version] = protocol.base()
        for old in [v for v in self.bases if v < protocol.version - 4]:
            del self.bases[old]
        self.honest = []
        self.attackers = sum(
            1 for p in self.peers if p.machine.attacker is not None and p.peer_id not in self.banned
        )
        # Every volunteer asks first (as real ones do at a round's start), then all train.
        orders = [(p, self.ask(p)) for p in self.peers]
        for p, order in orders:
            if order is not None:
                p.feed(ve.GotWork(as_steps(order)))
                self.drive(p)
                if p.peer_id in protocol.submitted():  # it waits for the close and asks again,
                    self.ask(p)  # as real volunteers do: the checks it gets meanwhile

    def ask(self, p: SimPeer) -> pr.WorkOrder | None:
        """P's answer from the protocol, replaying spot-checks on the way; None: no work."""
        while p.pending and isinstance(p.pending[0], ve.AskForWork | ve.Wait):
            if isinstance(p.pending.popleft(), ve.Wait):
                p.feed(ve.Woke())  # a simulated round is the wait
                continue
            (d,) = self.protocol.handle(pr.WorkRequested(p.peer_id))
            if isinstance(d, pr.WorkOrder):
                return d
            if isinstance(d, pr.VerifyOrder):
                p.feed(ve.GotCheck(d))
                self.drive(p)
            elif isinstance(d, pr.ScoreOrder):
                p.feed(ve.GotScore(d))
                self.drive(p)
            elif isinstance(d, pr.Wait):
                p.feed(ve.GotWait(d.retry_after, d.reason))
                return None
            elif isinstance(d, pr.Banned):
                p.feed(ve.GotBanned(d.reason))
            elif isinstance(d, pr.RunFinished):
                p.feed(ve.GotFinished())
        return None

    def drive(self, p: SimPeer) -> None:
        """Carry out P's decisions until it asks for work again (transfers are instant)."""
        while p.pending and not isinstance(p.pending[0], ve.AskForWork | ve.Wait | ve.Stop):
            d = p.pending.popleft()
            if isinstance(d, ve.Fetch):
                p.feed(ve.InputsReady(self.bases[d.order.base_version], target=self.scored(d)))
            elif isinstance(d, ve.StopSpeculation):
                p.feed(ve.SpeculationEnded(None))  # the next base came at once: no step ahead
            elif isinstance(d, ve.Train):
                p.feed(ve.Trained(p.train(d, self.shards)))
            elif isinstance(d, ve.Replay):
                p.feed(ve.Trained(d.run(p.trainer.train, self.shards, self.config)))
            elif isinstance(d, ve.UploadReplay):
                assert isinstance(d.check, pr.VerifyOrder)
                self.verified(d.check, d.result)
                p.feed(ve.Uploaded(True))
            elif isinstance(d, ve.Evaluate):
                p.feed(ve.Evaluated(d.run(self.scorers, self.shards, self.val_ids, self.config)))
            elif isinstance(d, ve.UploadScore):
                self.scores += 1
                event = pr.ScoreSubmitted(d.check.check_id, p.peer_id, d.score)
                self.act(self.protocol.handle(event))
                p.feed(ve.Uploaded(True))
            elif isinstance(d, ve.Upload):
                p.feed(ve.Uploaded(self.submit(p, d)))
            # Speculate, PauseSpeculation, ResumeSpeculation: nothing runs between events here

    def scored(self, d: ve.Fetch) -> dict[str, torch.Tensor] | None:
        """For a score order, the contribution it scores (what its payload decodes to)."""
        if not isinstance(d.order, pr.ScoreOrder):
            return None
        return read_all(self.protocol.checks[d.order.check_id].delta, self.protocol.shapes)

    @functools.cached_property
    def scorers(self) -> Scorers:
        """The models volunteers score with (one per concurrent use)."""
        return Scorers(self.config.model)

    def submit(self, p: SimPeer, d: ve.Upload) -> bool:
        """The upload arrives: decode it and hand it to the protocol."""
        order = d.order
        assert isinstance(order, pr.WorkOrder)
        attacker = p.machine.attacker
        if attacker is None:
            assert d.result is not None
            self.train_steps += d.result.steps
            self.honest.append(d.result.delta)  # what a copycat or colluder sees of this peer
        else:
            self.train_steps += d.claim.steps if attacker.trains else 0
        event = decode_submission(p.peer_id, order, d.payload, d.claim, self.protocol.shapes)
        if (
            attacker is not None
            and attacker.lies_as_verifier
            and isinstance(event, pr.ContributionSubmitted)
        ):
            self.forged[(p.peer_id, order.round)] = read_all(event.delta, self.protocol.shapes)
            for key in [k for k in self.forged if k[1] < order.round - 4]:
                del self.forged[key]
        self.submissions.append((p.peer_id, order.round))
        decisions = self.protocol.handle(event)
        self.act(decisions)
        return not any(isinstance(x, pr.Rejected) for x in decisions)
