"""The round-close screening stages: norms, copies and usefulness, over one round's contributions.

The verification pipeline of docs/SECURITY.md, stages (b), (c) and (f); the protocol runs them
when a round closes, before robust aggregation (stage e), on every contribution it accepted in
that round. What needs only one contribution (its norm, fingerprint and score: `analyze`) may
be computed as it arrives, so the close does only what needs the whole round. Stage (b)
compares each update's norm with the round's median; stage (c) compares secret-keyed
fingerprints within the round and with recent rounds (copies and replays); stage (f) scores a
sample of the survivors, newest and least trusted peers first, by the loss before and after
applying the update on the peer's assigned data and on held-out data, in the style of
Templar's Gauntlet validator (tplr.ai, 2025). Pure computation: no I/O, no clock.
"""

from __future__ import annotations

import functools
import hashlib
import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from crowdtrain.config import RunConfig
from crowdtrain.data.probe import ShardProbe
from crowdtrain.protocol.events import WorkOrder
from crowdtrain.robust import DeltaSource, global_norms
from crowdtrain.robust.copies import detect_copies, fingerprint
from crowdtrain.robust.norms import screen_norms
from crowdtrain.robust.usefulness import Score, Scorers, judge

#: An update is "shown useful" (the norm reference of a round without established peers) when
#: its assigned gain is beyond its noise and at least this fraction of the loss: a tiny random
#: update moves the loss by float rounding, which can look significant when every sequence
#: rounds the same way.
USEFUL_MIN_GAIN = 1e-3


@dataclass(frozen=True)
class Candidate:
    """One accepted contribution as the screening stages see it."""

    key: str  # "round/peer": a peer may have a late and an on-time contribution in one close
    peer_id: str
    delta: DeltaSource
    order: WorkOrder
    steps: int
    trust: float  # the peer's reputation score: the least trusted are scored first
    # Steps trained on this order's own batches (its first ones): with overlap, the others
    # continued the previous round's order, so they are not the data to score on.
    fresh_steps: int | None = None
    # Whether its peer is established (past probation with a clean record): the norm stage
    # measures against the median of such peers' updates, which fresh identities cannot move.
    established: bool = False

    @property
    def own_steps(self) -> int:
        """Steps trained on this order's batches, from its first batch on."""
        return self.steps if self.fresh_steps is None else self.fresh_steps


@dataclass
class Screened:
    """The outcome, keyed by `Candidate.key`: the excluded contributions with (stage, reason),
    and the survivors' fingerprints."""

    flags: dict[str, tuple[str, str]]
    fingerprints: dict[str, torch.Tensor]
    scored: int = 0


@dataclass(frozen=True)
class Context:
    """What a close's stages read besides the contributions: the run, θ of the round (the
    point contributions are scored at; never changed in place), the secret fingerprint key,
    the close's secret scoring seed, and the scoring models and data (None: no scoring)."""

    config: RunConfig
    shapes: Mapping[str, tuple[int, ...]]
    key: int
    params: Mapping[str, torch.Tensor]
    seed: int
    scorers: Scorers | None = None
    probe: ShardProbe | None = None

    @property
    def scoring(self) -> bool:
        """Whether this close scores contributions at all."""
        return (
            self.scorers is not None
            and self.probe is not None
            and self.config.defence.score_per_round > 0
        )

    def draws(self, c: Candidate) -> torch.Generator:
        """The candidate's own secret draws (its tie-break, then its scoring batches): the
        same whenever and wherever it is analysed, whatever else the round holds."""
        return torch.Generator().manual_seed(_mix(self.seed, c.key))

    def priority(self, c: Candidate) -> tuple[float, float]:
        """The order contributions are scored in: least trusted first, ties at random."""
        return (c.trust, _tie(self.seed, c.key))

    def batches(self, c: Candidate) -> tuple[int, int]:
        """The candidate's secret scoring batches: the first of the consecutive training
        batches of its order it is scored on (one it trained on) and the held-out batch."""
        rng = self.draws(c)
        torch.rand((), generator=rng)  # the tie-break (`priority`)
        defence, data = self.config.defence, self.config.data
        needed = -(-defence.score_batch_size // data.batch_size)  # `ShardProbe.batches_needed`
        last = max(1, c.own_steps - needed + 1)
        index = int(torch.randint(last, (1,), generator=rng))
        held = int(torch.randint(1 << 30, (1,), generator=rng))
        return index, held

    def eligible(self, c: Candidate) -> bool:
        """A handful of fresh-AdamW steps is a sign-like step whose effect on any one batch is
        noise; such contributions weigh little (their samples) and are not scored."""
        return self.scoring and c.own_steps >= self.config.defence.score_min_steps


@dataclass(frozen=True)
class Analysis:
    """What the stages learn from one contribution alone at one θ: its norm, its fingerprint
    and, when it was scored, its usefulness score. The same inputs give the same analysis
    whenever it is computed, so a driver may compute it as the contribution arrives
    (`analyze`, `score`), off the round's critical path, and the close (`screen`) reuses
    it."""

    norm: float
    fingerprint: torch.Tensor
    score: Score | None = None


def analyze(c: Candidate, ctx: Context) -> Analysis:
    """Stage (b)'s norm and stage (c)'s fingerprint of one contribution."""
    norm = global_norms([c.delta], ctx.shapes, ctx.config.aggregation.fragment_numel)[0]
    return Analysis(norm, _fingerprint(c.delta, ctx))


def chosen(ranked: Sequence[Candidate], ctx: Context) -> list[Candidate]:
    """Which of the eligible contributions RANKED (by `Context.priority`) are scored: with
    `score_newcomers`, every one whose peer is not established, and `score_per_round` of the
    others; otherwise the first `score_per_round`."""
    cfg = ctx.config.defence
    if not cfg.score_newcomers:
        return list(ranked[: cfg.score_per_round])
    rest = [c for c in ranked if c.established][: cfg.score_per_round]
    return [c for c in ranked if not c.established or c in rest]


def to_score(
    arrived: Sequence[Candidate], ctx: Context, *, expected: int, done: Collection[str]
) -> list[Candidate]:
    """Which of the contributions ARRIVED so far to score now, before the close: those not
    DONE (scored or being scored) that `chosen` picks among the eligible ones, once at least
    half of the EXPECTED contributions are in; a contribution of a peer that is not
    established is always chosen (with `score_newcomers`), so it is scored at once. Every
    contribution the
    close scores ranks among the first when it arrives (or when half are in), unless one
    ahead of it is excluded by a stage that needs the whole round (norms, copies), which the
    close then scores itself; waiting for half the round keeps the scores spent on
    contributions that later arrivals push out of the first to about score_per_round × ln 2
    (instead of score_per_round × ln(expected / score_per_round))."""
    ranked = sorted((c for c in arrived if ctx.eligible(c)), key=ctx.priority)
    picked = chosen(ranked, ctx)
    if 2 * len(arrived) < expected:
        newcomers = ctx.config.defence.score_newcomers
        picked = [c for c in picked if newcomers and not c.established]
    return [c for c in picked if c.key not in done]


def screen(
    candidates: Sequence[Candidate],
    ctx: Context,
    *,
    history: Sequence[torch.Tensor],
    common: DeltaSource | None = None,
    analyses: Mapping[str, Analysis] | None = None,
) -> Screened:
    """Run stages (b), (c) and (f) on a round's contributions, in submission order.

    `analyses` (by `Candidate.key`) are what was already computed for some of them at this θ
    (`analyze`); the rest is computed here. `common` is a part every honest contribution of
    the round shares by construction (the drift of the published first moment,
    ``train.moments.drift``); copy detection compares fingerprints within the round with its
    direction projected out, so honest peers are not copies of each other through it;
    replays of earlier rounds are found on the whole fingerprints, as those of earlier rounds
    are kept."""
    cfg = ctx.config.defence
    known = dict(analyses or {})
    done = [known.get(c.key) or analyze(c, ctx) for c in candidates]
    flags: dict[str, tuple[str, str]] = {}
    norms = [a.norm for a in done]
    marks, whom = [c.established for c in candidates], "established peers' updates"
    eligible = sorted((c for c in candidates if ctx.eligible(c)), key=ctx.priority)
    scores = {c.key: a.score for c, a in zip(candidates, done, strict=True) if a.score}
    if sum(marks) < 2 and cfg.score_newcomers and eligible:
        # No established reference yet (a run's first rounds): the updates whose scores show
        # a gain beyond their noise are the reference instead, so fresh identities sending
        # tiny updates cannot pull the median under the honest ones. Those scores are due
        # anyway (`chosen` picks every newcomer), so nothing extra is computed.
        for c in chosen(eligible, ctx):
            if c.key not in scores:
                scores[c.key] = score(c, ctx)
        useful = [
            (s := scores.get(c.key)) is not None
            and s.is_finite()
            and s.assigned_gain - cfg.score_z * s.assigned_se > cfg.score_min_gain
            and s.assigned_gain > USEFUL_MIN_GAIN * abs(s.assigned_before)
            for c in candidates
        ]
        if sum(useful) >= 2:
            marks, whom = useful, "updates shown useful"
    reasons = screen_norms(
        norms, low=cfg.norm_low, high=cfg.norm_high, reference=marks, reference_name=whom
    )
    for c, reason in zip(candidates, reasons, strict=True):
        if reason is not None:
            flags[c.key] = ("norm", reason)
    prints = [a.fingerprint for a in done]
    low, ratio = cfg.copy_min_cos, cfg.copy_ratio
    if common is None:
        copies = detect_copies(prints, history, min_cos=low, ratio=ratio)
    else:
        # The shared direction is projected out (not subtracted), so rescaled copies stay copies.
        shared = _fingerprint(common, ctx).double()
        unit = shared / shared.norm().clamp_min(1e-30)
        apart = [p.double() - (p.double() @ unit) * unit for p in prints]
        within = detect_copies(apart, [], min_cos=low, ratio=ratio)
        replays = detect_copies(prints, history, min_cos=low, ratio=ratio, within_round=False)
        copies = [a or b for a, b in zip(within, replays, strict=True)]
    for c, reason in zip(candidates, copies, strict=True):
        if reason is not None and c.key not in flags:
            flags[c.key] = ("copy", reason)
    # scores taken for the reference of contributions the norm or copy stage then excluded
    scored = sum(k in flags for k in scores)
    survivors = [(c, a) for c, a in zip(candidates, done, strict=True) if c.key not in flags]
    ranked = sorted(
        [(c, a) for c, a in survivors if ctx.eligible(c)], key=lambda ca: ctx.priority(ca[0])
    )
    gains: dict[str, tuple[float, float, int]] = {}
    picked = {c.key for c in chosen([c for c, _ in ranked], ctx)}
    for c, _ in ranked:
        if c.key not in picked:
            continue
        result = scores.get(c.key) or score(c, ctx)
        reason = judge(
            result, min_gain=cfg.score_min_gain, heldout_tol=cfg.score_heldout_tol, z=cfg.score_z
        )
        scored += 1
        if reason is not None:
            flags[c.key] = ("usefulness", reason)
        else:
            gains[c.key] = (result.assigned_gain, cfg.score_z * result.assigned_se, c.own_steps)
    flags.update(_weak_gains(gains, cfg.score_rel_gain))
    fingerprints = {
        c.key: fp for c, fp in zip(candidates, prints, strict=True) if c.key not in flags
    }
    return Screened(flags, fingerprints, scored)


def score(c: Candidate, ctx: Context) -> Score:
    """Stage (f) for one eligible contribution: the losses before and after it on a batch of
    its peer's own assigned data (one its training read) and on a held-out batch, both drawn
    secretly."""
    assert ctx.scorers is not None and ctx.probe is not None
    index, held = ctx.batches(c)
    order = c.order
    batches = ctx.probe.scoring_batches(
        order.shard_ids, seed=order.seed, round=order.round, peer=c.peer_id, index=index, held=held
    )
    return ctx.scorers.score(ctx.params, c.delta, *batches)


def _fingerprint(source: DeltaSource, ctx: Context) -> torch.Tensor:
    cfg = ctx.config.defence
    return fingerprint(
        source,
        ctx.shapes,
        key=ctx.key,
        blocks=cfg.fingerprint_blocks,
        block_len=cfg.fingerprint_block_len,
    )


@functools.lru_cache(maxsize=1 << 16)
def _tie(seed: int, key: str) -> float:
    """A contribution's secret tie-break, the first of its draws (`Context.draws`): kept, as
    every arrival ranks the round's contributions so far again."""
    return float(torch.rand((), generator=torch.Generator().manual_seed(_mix(seed, key))))


def _mix(seed: int, key: str) -> int:
    """A 63-bit seed from a secret seed and a contribution's key."""
    text = f"{seed}\x00{key}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def _weak_gains(
    gains: Mapping[str, tuple[float, float, int]], ratio: float
) -> dict[str, tuple[str, str]]:
    """Gains far below the round's median, beyond their noise: (gain, z × standard error, steps).

    Early in training almost any update lowers the loss a little, even a sign-flipped one, so
    the absolute test alone is too weak then. A peer that took fewer steps than the median
    (a slower machine on a time budget) is held to a proportionally lower bar."""
    if len(gains) < 3:
        return {}
    median = statistics.median(gain for gain, _, _ in gains.values())
    steps = statistics.median(n for _, _, n in gains.values())
    flags = {}
    for key, (gain, noise, n) in gains.items():
        bar = ratio * median * min(1.0, n / steps)
        if median > 0 and gain + noise < bar:
            reason = (
                f"training on the assigned data barely shows: the loss fell by {gain:.4g}, "
                f"less than {bar:.4g} ({ratio:g}× the round's median {median:.4g}"
                f"{'' if n >= steps else f', scaled to its {n} of {steps:g} steps'})"
            )
            flags[key] = ("usefulness", reason)
    return flags
