"""Verification inside the round protocol: claims, screening, spot-checks, reputation and bans.

The verification pipeline of docs/SECURITY.md, as the round machine (`core.py`) calls it. A
volunteer's claims are never trusted: whatever changes how a contribution is checked is derived
from the work order the coordinator handed out, or checked against it.

- At submission: stage (a) refusals (`malformed`) and stage (d), the claimed samples, tokens
  and steps against the work order (`check_claims`, see `crowdtrain.robust.claims`; DiLoCo
  weighs each pseudo-gradient by its samples, Douillard et al. 2023, arXiv:2311.08105).
- At the close: stages (b), (c) and (f) on the round's contributions (`screen`, which runs
  `screening.py`), then the recomputation spot-checks (g) of the survivors (`schedule`):
  BOINC's adaptive replication (Anderson 2004, "BOINC: A System for Public-Resource Computing
  and Storage"; Kondo, Araujo, Malecot et al. 2007, "Characterizing Result Errors in Internet
  Desktop Grids") draws a newcomer's work often and a peer with a run of passed checks rarely;
  a replay recomputes the sampled work exactly, as in BTARD (Gorbunov et al., ICML 2022,
  arXiv:2106.11257).
- When a peer asks for work: a pending check for a trusted peer that is not busy (`check_for`).
- When a replay comes back: the comparison of Δ' with Δ and its effect on the target's
  credit and standing (`judge`).
- Reputation (stage h, `crowdtrain.robust.reputation`): every failure is a strike, enough
  strikes ban; a ban drops the peer's open work (`Ledger.drop_work`) and its pending checks.

Every decision is also recorded as a `Verdict` for the status API and audits. Pure computation:
no I/O, and time only as the `now` the round machine passes in.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch

from crowdtrain.config import RunConfig, confirms_on_coordinator, scores_on_peers
from crowdtrain.data.probe import ShardProbe
from crowdtrain.protocol.events import (
    Banned,
    CheckDone,
    CheckReported,
    ContributionSubmitted,
    Decision,
    Flagged,
    PeerRecord,
    PriorWork,
    Rejected,
    ScoreOrder,
    ScoreSubmitted,
    Unknown,
    Verdict,
    VerificationSubmitted,
    VerifyOrder,
    WorkOrder,
)
from crowdtrain.protocol.records import Check, Round, Submission
from crowdtrain.protocol.screening import (
    Analysis,
    Candidate,
    Context,
    analyze,
    chosen,
    score,
    screen,
    to_score,
)
from crowdtrain.robust import DictSource
from crowdtrain.robust.claims import check_claim
from crowdtrain.robust.copies import fingerprint
from crowdtrain.robust.reputation import (
    check_probability,
    is_trusted,
    on_probation,
    record_check,
    record_failure,
    record_success,
    weight_factor,
)
from crowdtrain.robust.spotcheck import compare, mismatch
from crowdtrain.robust.usefulness import Score, Scorers, judge

#: Pending spot-checks lapse after this many rounds without a verifier.
CHECK_LIFETIME_ROUNDS = 3
#: How many verdicts the snapshot (and the status API) keeps.
VERDICTS_KEPT = 1000


def replayable(config: RunConfig) -> bool:
    """Whether a replay can reproduce what a peer sent: not when the peer adds its own
    error-feedback residual (top-k codec, SparseLoCo outer step) or carries AdamW moments
    across rounds (`inner.keep_optimizer_state`), which no one else knows."""
    return (
        config.codec.name != "topk2bit"
        and config.outer.optimizer != "error_feedback"
        and not config.inner.keep_optimizer_state
    )


def secret_seed(purpose: str, *parts: int) -> int:
    """A 63-bit seed from the driver's secret and public numbers: peers cannot predict which
    contributions are scored or checked, nor where fingerprints sample (fixed for the run, so
    fingerprints of different rounds compare)."""
    text = "\x00".join([purpose, *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def prior_submission(peer_id: str, number: int, ledger: Ledger) -> Submission | None:
    """PEER_ID's accepted contribution to round NUMBER with a payload a replay can read, while
    the protocol still keeps that round (the one before the open one), else None."""
    prev = ledger.previous
    if prev is None or prev.number != number:
        return None
    candidates = (prev.submissions.get(peer_id), prev.late.get(peer_id))
    done = next((c for c in candidates if c is not None and c.round == number), None)
    return done if done is not None and done.ref else None


def reject(peer: PeerRecord, round_number: int, code: str, reason: str) -> Rejected:
    """Refuse a contribution at upload, counting the refusal on its peer."""
    peer.rejected += 1
    return Rejected(peer.peer_id, round_number, code, reason)


@dataclass(frozen=True)
class Ledger:
    """What verification reads of the round machine, and the one thing it does to it: a ban
    drops the banned peer's open work (`drop_work(peer_id)`: its order in the open round and
    its contributions not yet aggregated). Built afresh for each call."""

    peers: Mapping[str, PeerRecord]
    previous: Round | None  # the round before the open one: overlapped work continued it
    order_of: Callable[[Submission], WorkOrder]  # the order a contribution answered
    params: Mapping[str, torch.Tensor]  # θ (before the outer step, at a close)
    last_aggregate: Mapping[str, torch.Tensor] | None
    drop_work: Callable[[str], None]


class Verification:
    """The verification pipeline's state: pending checks, recent fingerprints, verdicts.

    `shapes` are the model's parameter shapes; `probe` gives the usefulness stage its batches
    (no probe: that stage is skipped); `secret` keys fingerprints and the draws of what to
    score and check. Whatever the round machine holds comes in as a `Ledger` with each call.
    """

    def __init__(
        self,
        config: RunConfig,
        shapes: Mapping[str, tuple[int, ...]],
        *,
        probe: ShardProbe | None,
        secret: int,
    ) -> None:
        self.config = config
        self.shapes = shapes
        self.probe = probe
        self.secret = secret
        self.checks: dict[str, Check] = {}
        self.fingerprints: dict[str, torch.Tensor] = {}  # "round/peer" -> fingerprint
        self.verdicts: list[Verdict] = []
        self.scored = 0  # usefulness evaluations so far
        # Usefulness scores are computed here (on arrival and at the close) or, for large
        # models, by volunteers as score orders (`schedule`).
        params = sum(math.prod(shape) for shape in shapes.values())
        self.peer_scoring = scores_on_peers(config.defence, params)
        self.confirms = confirms_on_coordinator(config.defence, params)
        self._scorers = None if self.peer_scoring else Scorers(config.model)
        # Analyses and scores computed as contributions arrived, by (key, version of θ,
        # closing round), and the keys whose scores are done or under way.
        self._analyses: dict[tuple[str, int, int], Analysis] = {}
        self._scores: dict[tuple[str, int, int], Score] = {}
        self._scoring: set[str] = set()

    @property
    def enabled(self) -> bool:
        """Whether the stages beyond the format check are on."""
        return self.config.defence.enabled

    # --- at submission ---------------------------------------------------------------------

    def check_claims(
        self,
        peer: PeerRecord,
        event: ContributionSubmitted,
        order: WorkOrder,
        round_steps: list[int],
        ledger: Ledger,
        now: float,
    ) -> list[Decision]:
        """Stage (d): the refusal of a contribution whose claimed work does not fit its order
        (`round_steps`: the steps of the round's contributions so far); [] admits it."""
        if not self.enabled:
            return []
        claim = check_claim(
            samples=event.samples,
            tokens=event.tokens,
            steps=event.steps,
            batch_size=self.config.data.batch_size,
            context=self.config.model.context,
            budget=order.budget,
            max_steps=order.max_steps,
            history_steps=peer.steps,
            round_steps=round_steps,
            slack=self.config.defence.claims_slack,
        )
        if claim is None:
            return []
        return self._refuse(peer, event.round, "claims", "bad_claim", claim, ledger, now)

    def check_overlap(
        self, peer: PeerRecord, event: ContributionSubmitted, ledger: Ledger, now: float
    ) -> tuple[int, int, int] | list[Decision]:
        """Stage (d) for the overlap claim: (overlap steps, overlap round, first batch) as the
        coordinator derives them, or the refusal. Overlapped steps continue the order of the
        round before (`overlap_round` = round − 1) from the batch after the ones that round's
        contribution trained on its own order (`overlap_first_batch`), starting from its
        payload: all three follow from what this peer sent for that round, so any other value
        is a false claim (a strike), and overlapped steps without such a contribution cannot be
        replayed or scored from public data (refused without a strike: an honest volunteer
        whose previous upload was refused does not carry its overlap on). Only the number of
        overlapped steps is the peer's to say, at most its steps."""
        claimed = (event.overlap_steps, event.overlap_round, event.overlap_first_batch)
        if not self.enabled:
            return claimed
        if event.overlap_steps <= 0:
            return (0, -1, 0)
        if event.overlap_steps > event.steps:
            reason = f"it claims {event.overlap_steps} overlapped steps of {event.steps} in all"
            return self._refuse(peer, event.round, "claims", "bad_claim", reason, ledger, now)
        prior = prior_submission(event.peer_id, event.round - 1, ledger)
        if prior is None:
            reason = (
                f"its overlapped steps continue no accepted contribution of round "
                f"{event.round - 1} still known, so they cannot be replayed"
            )
            return [reject(peer, event.round, "unreplayable", reason)]
        first = prior.steps - min(prior.overlap_steps, prior.steps)
        if (event.overlap_round, event.overlap_first_batch) != (event.round - 1, first):
            reason = (
                f"its overlap claim (round {event.overlap_round}, from batch "
                f"{event.overlap_first_batch}) does not continue its contribution to round "
                f"{event.round - 1} (round {event.round - 1}, from batch {first})"
            )
            return self._refuse(peer, event.round, "claims", "bad_claim", reason, ledger, now)
        return (event.overlap_steps, event.round - 1, first)

    def probation_factor(self, peer: PeerRecord) -> float:
        """The factor on an admitted contribution's sample weight (below 1 on probation)."""
        return weight_factor(peer.standing, self.config.defence) if self.enabled else 1.0

    def malformed(
        self, peer: PeerRecord, round_number: int, reason: str, ledger: Ledger, now: float
    ) -> list[Decision]:
        """Stage (a) refused a payload: a strike when defended, a plain refusal otherwise."""
        if not self.enabled:
            return [reject(peer, round_number, "bad_payload", reason)]
        return self._refuse(peer, round_number, "format", "bad_payload", reason, ledger, now)

    def _refuse(
        self,
        peer: PeerRecord,
        round_number: int,
        stage: str,
        code: str,
        reason: str,
        ledger: Ledger,
        now: float,
    ) -> list[Decision]:
        """A stage refused a peer's contribution at submission: reject, strike, maybe ban."""
        decisions: list[Decision] = [reject(peer, round_number, code, reason)]
        self._record(now, peer.peer_id, round_number, stage, "rejected", reason)
        if record_failure(peer.standing, self.config.defence, 1.0, f"{stage}: {reason}"):
            decisions.extend(self._ban(peer, round_number, ledger, now))
        return decisions

    # --- at the close ----------------------------------------------------------------------

    def analysis_job(
        self,
        number: int,
        version: int,
        sub: Submission,
        round_subs: list[Submission],
        expected: int,
        ledger: Ledger,
    ) -> Callable[[], None] | None:
        """The work round NUMBER's close would do for SUB alone (`screening.analyze`: norm and
        fingerprint) and the usefulness scores due by now (`screening.to_score`, of the
        round's contributions ROUND_SUBS, EXPECTED of them in all), as a job for any thread:
        it reads only θ of VERSION (the protocol replaces θ at a close, never changes it in
        place) and the contributions' payloads, and leaves its results for the close, which
        computes whatever is missing. None when the stages are off."""
        if not self.enabled:
            return None
        ctx = self._context(number, ledger)
        c = self._candidate(sub, ledger)
        due = []
        if ctx.scoring and 2 * len(round_subs) >= expected:  # else `to_score` says none yet
            arrived = [self._candidate(s, ledger) for s in round_subs]
            due = to_score(arrived, ctx, expected=expected, done=self._scoring)
        self._scoring.update(d.key for d in due)

        def job() -> None:
            # A source closed under it: the close computes it again, and reports any error.
            with contextlib.suppress(ValueError):
                self._analyses[(c.key, version, number)] = analyze(c, ctx)
                for d in due:
                    self._scores[(d.key, version, number)] = score(d, ctx)

        return job

    def screen(
        self,
        number: int,
        version: int,
        subs: list[Submission],
        ledger: Ledger,
        now: float,
        common: Mapping[str, torch.Tensor] | None = None,
    ) -> list[Decision]:
        """Stages (b), (c), (f) on round NUMBER's contributions (θ of VERSION); flagged ones
        leave `subs`. `common` is the part of Δ every honest contribution shares
        (`screening.screen`)."""
        scores = {k: s for (k, v, n), s in self._scores.items() if v == version and n == number}
        analyses = {
            k: replace(a, score=scores.get(k))
            for (k, v, n), a in self._analyses.items()
            if v == version and n == number
        }
        self._analyses.clear()
        self._scores.clear()
        self._scoring.clear()
        candidates = [self._candidate(s, ledger) for s in subs]
        outcome = screen(
            candidates,
            self._context(number, ledger),
            history=[*self.fingerprints.values(), *self._aggregate_print(ledger.last_aggregate)],
            common=DictSource(dict(common)) if common else None,
            analyses=analyses,
        )
        self.scored += outcome.scored
        decisions: list[Decision] = []
        for sub in [s for s in subs if s.key in outcome.flags]:
            stage, reason = outcome.flags[sub.key]
            peer = ledger.peers[sub.peer_id]
            peer.samples -= sub.samples
            peer.flagged += 1
            self._record(now, sub.peer_id, sub.round, stage, "flagged", reason)
            decisions.append(Flagged(sub.peer_id, sub.round, stage, reason))
            if record_failure(peer.standing, self.config.defence, 1.0, f"{stage}: {reason}"):
                decisions.extend(self._ban(peer, number, ledger, now))
        subs[:] = [s for s in subs if s.key not in outcome.flags]
        self._cap_probation(subs, ledger)
        self.fingerprints.update(outcome.fingerprints)
        keep = number - self.config.defence.copy_history_rounds
        for name in [n for n in self.fingerprints if int(n.split("/", 1)[0]) <= keep]:
            del self.fingerprints[name]
        for s in subs:
            record_success(ledger.peers[s.peer_id].standing, self.config.defence)
        return decisions

    def _cap_probation(self, subs: list[Submission], ledger: Ledger) -> None:
        """Scale down the weights of contributions from peers on probation so that together
        they hold at most `defence.probation_share` of the round's aggregation weight, however
        many they are (a round without an established contribution is left as it is)."""
        cfg = self.config.defence
        fresh = [s for s in subs if on_probation(ledger.peers[s.peer_id].standing, cfg)]
        held = sum(s.weight for s in fresh)
        settled = sum(s.weight for s in subs) - held
        if settled <= 0 or held <= 0:
            return
        allowed = cfg.probation_share / (1.0 - cfg.probation_share) * settled
        if held > allowed:
            for s in fresh:
                s.weight *= allowed / held

    def _context(self, number: int, ledger: Ledger) -> Context:
        """What round NUMBER's close screens with (`screening.Context`)."""
        return Context(
            config=self.config,
            shapes=self.shapes,
            key=secret_seed("fingerprint", self.secret, self.config.seed),
            params=ledger.params,
            seed=secret_seed("scoring", self.secret, self.config.seed, number),
            scorers=self._scorers,
            probe=self.probe,
        )

    def _candidate(self, s: Submission, ledger: Ledger) -> Candidate:
        """SUB as the stages see it."""
        return Candidate(
            s.key,
            s.peer_id,
            s.delta,
            ledger.order_of(s),
            s.steps,
            ledger.peers[s.peer_id].standing.score,
            fresh_steps=s.steps - min(s.overlap_steps, s.steps),
            established=is_trusted(ledger.peers[s.peer_id].standing, self.config.defence),
        )

    def _aggregate_print(
        self, last_aggregate: Mapping[str, torch.Tensor] | None
    ) -> list[torch.Tensor]:
        """The last aggregate's fingerprint: a free-rider resubmitting the global update (which
        any peer can compute from two downloads) is then a copy of it."""
        if last_aggregate is None:
            return []
        cfg = self.config.defence
        source = DictSource(last_aggregate)
        key = secret_seed("fingerprint", self.secret, self.config.seed)
        return [
            fingerprint(
                source,
                self.shapes,
                key=key,
                blocks=cfg.fingerprint_blocks,
                block_len=cfg.fingerprint_block_len,
            )
        ]

    def schedule(
        self, number: int, version: int, subs: list[Submission], ledger: Ledger, now: float
    ) -> list[Decision]:
        """Expire stale checks, pick round NUMBER's contributions to replay (BOINC-style
        adaptive replication) and, when volunteers score, those to score at θ of VERSION; in
        coordinator mode, the replays to run are the decisions."""
        cfg = self.config.defence
        for check_id, check in list(self.checks.items()):
            if number - check.opened_round >= CHECK_LIFETIME_ROUNDS:
                del self.checks[check_id]
                o = check.order
                answered = len(check.reports)
                reason = (
                    "no verifier replayed this contribution in time"
                    if not answered
                    else f"only {answered} verifier(s) replayed this contribution in time, "
                    "too few to agree on it"
                )
                self._record(now, o.target, o.round, "spot_check", "check_expired", reason)
        decisions: list[Decision] = []
        if self.peer_scoring:
            self._score_orders(number, version, subs, ledger)
        if cfg.spot_check == "off" or not replayable(self.config):
            return decisions
        rng = torch.Generator().manual_seed(
            secret_seed("checks", self.secret, self.config.seed, number)
        )
        for s in subs:
            draw = float(torch.rand((), generator=rng))
            p = check_probability(ledger.peers[s.peer_id].standing, cfg)
            if draw >= p:
                continue
            prior = self._prior_of(s, ledger) if s.overlap_steps else None
            if s.overlap_steps and prior is None:
                continue  # its start is private to the peer: no one can replay it
            work = ledger.order_of(s)
            order = VerifyOrder(
                check_id=_check_id("check", s),
                peer_id="",
                target=s.peer_id,
                round=work.round,
                base_version=work.base_version,
                shard_ids=work.shard_ids,
                seed=work.seed,
                step_offset=work.step_offset,
                steps=s.steps,
                prior=prior,
            )
            self.checks[order.check_id] = Check(order, s.delta, s.ref, number, s.samples)
            if cfg.spot_check == "coordinator":
                decisions.append(order)
        return decisions

    def _score_orders(
        self, number: int, version: int, subs: list[Submission], ledger: Ledger
    ) -> None:
        """Score orders for the contributions the coordinator would have scored
        (`screening.chosen` by the same secret priority), on the same secret batches
        (`screening.Context`)."""
        cfg = self.config.defence
        ctx = self._context(number, ledger)
        by_key = {s.key: s for s in subs}
        eligible = [
            c
            for c in (self._candidate(s, ledger) for s in subs)
            if c.own_steps >= cfg.score_min_steps
        ]
        for c in chosen(sorted(eligible, key=ctx.priority), ctx):
            sub, work = by_key[c.key], c.order
            index, held = ctx.batches(c)
            order = ScoreOrder(
                check_id=_check_id("score", sub),
                peer_id="",
                target=sub.peer_id,
                round=work.round,
                base_version=version,
                shard_ids=work.shard_ids,
                seed=work.seed,
                step_offset=work.step_offset,
                assigned_batch=index,
                heldout_batch=held,
                payload_ref=sub.ref,
            )
            self.checks[order.check_id] = Check(order, sub.delta, sub.ref, number, sub.samples)

    def _prior_of(self, sub: Submission, ledger: Ledger) -> PriorWork | None:
        """What a replay of overlapped SUB must redo first: the same peer's work of the round
        just before, trained on from the base minus the Δ it sent for that round. None (SUB
        cannot be replayed) unless that submission is still known, i.e. in the last round.

        The overlapped steps count towards SUB's steps, so a replay never runs more than those.
        """
        if sub.overlap_round != sub.round - 1:
            return None
        done = prior_submission(sub.peer_id, sub.overlap_round, ledger)
        if done is None:
            return None
        work = ledger.order_of(done)
        return PriorWork(
            round=work.round,
            base_version=work.base_version,
            shard_ids=work.shard_ids,
            seed=work.seed,
            step_offset=work.step_offset,
            first_batch=sub.overlap_first_batch,
            steps=min(sub.overlap_steps, sub.steps),
            payload_ref=done.ref,
        )

    # --- checks handed out and judged ------------------------------------------------------

    def check_for(self, peer: PeerRecord, now: float) -> VerifyOrder | ScoreOrder | None:
        """A pending check (a replay in `spot_check = "peer"` mode, a score when volunteers
        score) for a trusted peer with no work of its own to do now (the round core decides
        that): the one it holds, or one of another peer's work that still wants a verifier
        and that this peer has not answered already."""
        cfg = self.config.defence
        replays = cfg.spot_check == "peer"
        if not (replays or self.peer_scoring) or not self.enabled:
            return None
        if not is_trusted(peer.standing, cfg):
            return None
        lapse = self.config.rounds.deadline_s
        for check in self.checks.values():
            if peer.peer_id in check.assigned:
                return replace(check.order, peer_id=peer.peer_id)

        # The oldest checks first (those nearest to expiring unanswered, which would let a
        # cheater off), and among a round's checks each peer's own secret order, so a verifier
        # cannot choose whose work it checks by when it asks.
        def draw(check: Check) -> tuple[int, bytes]:
            text = f"assign\x00{self.secret}\x00{peer.peer_id}\x00{check.order.check_id}"
            return check.opened_round, hashlib.sha256(text.encode()).digest()

        for check in sorted(self.checks.values(), key=draw):
            if check.order.target == peer.peer_id or peer.peer_id in check.reports:
                continue
            if check.confirming:  # the coordinator's replay decides it now
                continue
            if not replays and isinstance(check.order, VerifyOrder):
                continue
            live = {v: at for v, at in check.assigned.items() if now - at <= lapse}
            if len(live) < self._wanted(check):
                check.assigned = {**live, peer.peer_id: now}  # lapsed verifiers are replaced
                return replace(check.order, peer_id=peer.peer_id)
        return None

    def _wanted(self, check: Check) -> int:
        """How many more reports could decide CHECK: the fewer of those a pass needs (reaching
        `check_pass_quorum` and outnumbering the mismatches) and those a failure needs."""
        cfg = self.config.defence
        passed, failed = check.tally()
        to_pass = max(cfg.check_pass_quorum, failed + 1) - passed
        to_fail = max(cfg.check_fail_quorum, passed + 1) - failed
        return min(to_pass, to_fail)

    def _outcome(self, check: Check) -> bool | None:
        """True (passed), False (failed) or None (undecided) by the reports so far."""
        cfg = self.config.defence
        passed, failed = check.tally()
        if passed >= cfg.check_pass_quorum and passed > failed:
            return True
        if failed >= cfg.check_fail_quorum and failed > passed:
            return False
        return None

    def judge(self, event: VerificationSubmitted, ledger: Ledger, now: float) -> list[Decision]:
        """Record a replay of a checked contribution. The coordinator's own replay decides at
        once. A verifier's counts as one report: the check fails when `check_fail_quorum`
        reports of a mismatch outnumber those of a match, passes when `check_pass_quorum`
        matches outnumber the mismatches, and otherwise waits for one more verifier (at most
        2·max(quorums) − 1 reports, so one side always wins). A failure voids the
        contribution's credit and costs its peer `check_strikes` strikes; every verifier the
        decision overrules loses as many (it lied, or its machine cannot replay); a pass
        counts towards the target's trust."""
        check = self._answered(event.check_id, event.peer_id, VerifyOrder)
        if not isinstance(check, Check):
            return [check]
        order = check.order
        assert isinstance(order, VerifyOrder)
        verdict = mismatch(
            compare(check.delta, event.delta, self.shapes, self.config.aggregation.fragment_numel),
            tolerance=self.config.defence.check_tolerance,
        )
        if verdict is None and event.steps != order.steps:
            verdict = f"the replay ran {event.steps} steps, not the {order.steps} claimed"
        if not event.peer_id:  # the coordinator's own replay decides, over any verifiers
            del self.checks[event.check_id]
            decisions = self._decide(check, "", verdict, ledger, now)
            for other, said in check.reports.items():
                if bool(said) != (verdict is not None) and other in ledger.peers:
                    peer = ledger.peers[other]
                    decisions.extend(
                        self._overruled(
                            peer, check, said, ledger, now, by="the coordinator's replay"
                        )
                    )
            return decisions
        return self._report(check, event.peer_id, verdict, ledger, now)

    def judge_score(self, event: ScoreSubmitted, ledger: Ledger, now: float) -> list[Decision]:
        """Record a verifier's usefulness score of a contribution: its verdict is stage (f)'s
        absolute test (`robust.usefulness.judge`; the comparison with the round's other
        gains needs scores the coordinator does not have), and reports agree as
        replays' do (`judge`)."""
        check = self._answered(event.check_id, event.peer_id, ScoreOrder)
        if not isinstance(check, Check):
            return [check]
        score, cfg = event.score, self.config.defence
        if score.is_finite() and math.isfinite(score.assigned_se) and score.assigned_se >= 0:
            verdict = judge(
                score, min_gain=cfg.score_min_gain, heldout_tol=cfg.score_heldout_tol, z=cfg.score_z
            )
        else:
            verdict = "the reported losses are not finite, non-negative numbers"
        check.scores[event.peer_id] = _numbers(score)
        return self._report(check, event.peer_id, verdict, ledger, now)

    def _answered(
        self, check_id: str, peer_id: str, kind: type[VerifyOrder] | type[ScoreOrder]
    ) -> Check | Unknown:
        """The open check of this id and KIND assigned to PEER_ID ("" the coordinator)."""
        check = self.checks.get(check_id)
        if check is None or not isinstance(check.order, kind):
            what = "spot-check" if kind is VerifyOrder else "score order"
            return Unknown(peer_id, f"no open {what} has id {check_id}")
        if peer_id and peer_id not in check.assigned:
            return Unknown(peer_id, "this check is not assigned to this peer")
        if not peer_id and isinstance(check.order, ScoreOrder):
            return Unknown(peer_id, "score orders are answered by volunteers")
        return check

    def _report(
        self, check: Check, verifier: str, verdict: str | None, ledger: Ledger, now: float
    ) -> list[Decision]:
        """VERIFIER's report on CHECK (None: it matched or passed); decide when enough agree."""
        order = check.order
        del check.assigned[verifier]
        check.reports[verifier] = verdict or ""
        if verifier in ledger.peers:
            ledger.peers[verifier].standing.verified += 1
        outcome = self._outcome(check)
        reported = CheckReported(order.check_id, order.target, order.round, verifier)
        if outcome is None:
            return [reported]
        if outcome is False and self.confirms and isinstance(order, VerifyOrder):
            # verifiers agree the replay differs: the coordinator replays it before that counts
            check.confirming = True
            check.assigned.clear()
            return [reported, replace(order, peer_id="")]
        del self.checks[order.check_id]
        agreed = [v for v, said in check.reports.items() if (not said) == outcome]
        reason = None if outcome else check.reports[agreed[0]]
        decisions = self._decide(check, ",".join(agreed), reason, ledger, now)
        for other, said in check.reports.items():
            if other not in agreed and other in ledger.peers:
                decisions.extend(self._overruled(ledger.peers[other], check, said, ledger, now))
        return decisions

    def _decide(
        self, check: Check, verifiers: str, verdict: str | None, ledger: Ledger, now: float
    ) -> list[Decision]:
        """The check's outcome for its target: `verdict` None (the replays matched) or why not."""
        order = check.order
        target = ledger.peers[order.target]
        passed = verdict is None
        scored = isinstance(order, ScoreOrder)
        stage = "usefulness" if scored else "spot_check"
        if scored:
            reason = verdict or "the contribution lowered the loss on its assigned data"
            outcome = "score_passed" if passed else "flagged"
        else:
            reason = verdict or "the replay matched the contribution"
            outcome = "check_passed" if passed else "check_failed"
        self._record(now, order.target, order.round, stage, outcome, reason)
        decisions: list[Decision] = [
            CheckDone(order.check_id, order.target, order.round, verifiers, passed, reason)
        ]
        if not passed:
            target.samples -= check.samples  # the contribution is void: no credit for it
            target.flagged += 1
            decisions.append(Flagged(order.target, order.round, stage, reason))
            cfg = self.config.defence
            banned = (
                record_failure(target.standing, cfg, 1.0, f"usefulness: {reason}")
                if scored  # as when the coordinator scores
                else record_check(target.standing, cfg, False, reason)
            )
            if banned:
                decisions.extend(self._ban(target, order.round, ledger, now))
        elif not scored:
            record_check(target.standing, self.config.defence, True, reason)
        return decisions

    def _overruled(
        self,
        verifier: PeerRecord,
        check: Check,
        said: str,
        ledger: Ledger,
        now: float,
        by: str = "the verifiers who agreed",
    ) -> list[Decision]:
        """VERIFIER's report on CHECK disagreed with the verifiers who decided it. A score
        near the bar may fall either side on two honest machines, so a score report costs
        strikes only when one of its losses is further than `check_tolerance` (relative)
        from the agreeing verifiers' median."""
        order = check.order
        cfg = self.config.defence
        if isinstance(order, ScoreOrder):
            claim = f"a failure ({said})" if said else "a pass"
            what = f"its score of {order.target}'s round {order.round}"
            agreed = [
                check.scores[v]
                for v, r in check.reports.items()
                if bool(r) != bool(said) and v in check.scores
            ]
            own = check.scores.get(verifier.peer_id, ())
            honest = bool(agreed) and _close(own, agreed, cfg.check_tolerance)
        else:
            claim = f"a mismatch ({said})" if said else "a match"
            what, honest = f"its replay of {order.target}'s round {order.round}", False
        reason = f"{what} reported {claim}, against {by}"
        self._record(now, verifier.peer_id, order.round, "spot_check", "verifier_overruled", reason)
        if honest:
            return []
        verifier.standing.failed_checks += 1  # no longer trusted to verify; checked more often
        verifier.standing.passed_checks = 0
        if record_failure(
            verifier.standing, self.config.defence, self.config.defence.check_strikes, reason
        ):
            return self._ban(verifier, order.round, ledger, now)
        return []

    # --- bans ------------------------------------------------------------------------------

    def ban(
        self, peer: PeerRecord, round_number: int, reason: str, ledger: Ledger, now: float
    ) -> list[Decision]:
        """An administrator bans PEER."""
        peer.standing.banned, peer.standing.ban_reason = True, reason
        self._record(now, peer.peer_id, round_number, "admin", "banned", reason)
        self._evict(peer.peer_id, ledger)
        return [Banned(peer.peer_id, reason)]

    def unban(self, peer: PeerRecord, round_number: int, now: float) -> None:
        """An administrator lifts PEER's ban: its strikes are cleared."""
        if peer.standing.banned:
            peer.standing.banned, peer.standing.ban_reason = False, ""
            peer.standing.strikes = 0.0
            reason = "ban lifted by an administrator"
            self._record(now, peer.peer_id, round_number, "admin", "unbanned", reason)

    def _ban(
        self, peer: PeerRecord, round_number: int, ledger: Ledger, now: float
    ) -> list[Decision]:
        """PEER's strikes just banned it (the reason is in its standing)."""
        reason = peer.standing.ban_reason
        self._record(now, peer.peer_id, round_number, "reputation", "banned", reason)
        self._evict(peer.peer_id, ledger)
        return [Banned(peer.peer_id, reason)]

    def _evict(self, peer_id: str, ledger: Ledger) -> None:
        """A banned peer's open order, unaggregated contribution and pending checks of its own
        work are dropped; checks it was to replay go back to the pool."""
        ledger.drop_work(peer_id)
        for check_id, check in list(self.checks.items()):
            if check.order.target == peer_id:  # no replay can change a ban
                del self.checks[check_id]
            else:  # a banned verifier's replay, done or under way, no longer counts
                check.assigned.pop(peer_id, None)
                check.reports.pop(peer_id, None)

    def _record(
        self, now: float, peer_id: str, round_number: int, stage: str, outcome: str, reason: str
    ) -> None:
        self.verdicts.append(Verdict(now, peer_id, round_number, stage, outcome, reason))
        if len(self.verdicts) > 2 * VERDICTS_KEPT:
            del self.verdicts[:-VERDICTS_KEPT]


def _numbers(score: Score) -> tuple[float, ...]:
    """A score report's numbers, as the check keeps them."""
    return (
        score.assigned_before,
        score.assigned_after,
        score.heldout_before,
        score.heldout_after,
        score.assigned_se,
    )


def _close(own: tuple[float, ...], others: list[tuple[float, ...]], tolerance: float) -> bool:
    """Whether the four losses of OWN are each within TOLERANCE (relative) of the median of
    OTHERS' (the standard error, a spread, is not compared)."""
    if len(own) < 4:
        return False
    for i in range(4):
        values = sorted(o[i] for o in others)
        median = values[len(values) // 2]
        if not abs(own[i] - median) <= tolerance * max(abs(median), 1e-6):
            return False
    return True


def _check_id(kind: str, sub: Submission) -> str:
    """The id of a check of KIND ("check": a replay, "score") of contribution SUB."""
    text = f"{kind}\x00{sub.peer_id}\x00{sub.round}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]
