"""The round-close screening stages: norms, copies and usefulness, over one round's contributions.

The verification pipeline of docs/SECURITY.md, stages (b), (c) and (f); the protocol runs them
when a round closes, before robust aggregation (stage e), on every contribution it accepted in
that round. Stage (b) compares each update's norm with the round's median; stage (c) compares
secret-keyed fingerprints within the round and with recent rounds (copies and replays); stage
(f) scores a sample of the survivors, newest and least trusted peers first, by the loss before
and after applying the update on the peer's assigned data and on held-out data, in the style of
Templar's Gauntlet validator (tplr.ai, 2025). Pure computation: no I/O, no clock.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from crowdtrain.config import RunConfig
from crowdtrain.data.probe import ShardProbe
from crowdtrain.protocol.events import WorkOrder
from crowdtrain.robust import DeltaSource, global_norms
from crowdtrain.robust.copies import detect_copies, fingerprint
from crowdtrain.robust.norms import screen_norms
from crowdtrain.robust.usefulness import Scorer, judge


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


def screen(
    candidates: Sequence[Candidate],
    *,
    config: RunConfig,
    shapes: Mapping[str, tuple[int, ...]],
    history: Sequence[torch.Tensor],
    key: int,
    params: Mapping[str, torch.Tensor],
    scorer: Scorer | None,
    probe: ShardProbe | None,
    seed: int,
    common: DeltaSource | None = None,
) -> Screened:
    """Run stages (b), (c) and (f) on a round's contributions, in submission order.

    `common` is a part every honest contribution of the round shares by construction (the
    drift of the published first moment, ``train.moments.drift``); copy detection compares
    fingerprints within the round with its direction projected out, so honest peers are not
    copies of each other through it; replays of earlier rounds are found on the whole
    fingerprints, as those of earlier rounds are kept."""
    cfg = config.defence
    flags: dict[str, tuple[str, str]] = {}
    norms = global_norms([c.delta for c in candidates], shapes, config.aggregation.fragment_numel)
    for c, reason in zip(
        candidates, screen_norms(norms, low=cfg.norm_low, high=cfg.norm_high), strict=True
    ):
        if reason is not None:
            flags[c.key] = ("norm", reason)

    def sample(source: DeltaSource) -> torch.Tensor:
        return fingerprint(
            source,
            shapes,
            key=key,
            blocks=cfg.fingerprint_blocks,
            block_len=cfg.fingerprint_block_len,
        )

    prints = [sample(c.delta) for c in candidates]
    low, ratio = cfg.copy_min_cos, cfg.copy_ratio
    if common is None:
        copies = detect_copies(prints, history, min_cos=low, ratio=ratio)
    else:
        # The shared direction is projected out (not subtracted), so rescaled copies stay copies.
        shared = sample(common).double()
        unit = shared / shared.norm().clamp_min(1e-30)
        apart = [p.double() - (p.double() @ unit) * unit for p in prints]
        within = detect_copies(apart, [], min_cos=low, ratio=ratio)
        replays = detect_copies(prints, history, min_cos=low, ratio=ratio, within_round=False)
        copies = [a or b for a, b in zip(within, replays, strict=True)]
    for c, reason in zip(candidates, copies, strict=True):
        if reason is not None and c.key not in flags:
            flags[c.key] = ("copy", reason)
    scored = 0
    if scorer is not None and probe is not None and cfg.score_per_round > 0:
        rng = torch.Generator().manual_seed(seed)
        # A handful of fresh-AdamW steps is a sign-like step whose effect on any one batch is
        # noise; such contributions weigh little (their samples) and are not scored.
        survivors = [
            c for c in candidates if c.key not in flags and c.own_steps >= cfg.score_min_steps
        ]
        ties = torch.rand(len(survivors), generator=rng).tolist()
        ranked = sorted(
            zip(survivors, ties, strict=True), key=lambda pair: (pair[0].trust, pair[1])
        )
        gains: dict[str, tuple[float, float, int]] = {}
        for c, _ in ranked[: cfg.score_per_round]:
            last = max(1, c.own_steps - probe.batches_needed() + 1)
            index = int(torch.randint(last, (1,), generator=rng))
            held = int(torch.randint(1 << 30, (1,), generator=rng))
            assigned = probe.assigned(
                c.order.shard_ids,
                seed=c.order.seed,
                round=c.order.round,
                peer=c.peer_id,
                index=index,
            )
            score = scorer.score(params, c.delta, assigned, probe.heldout(held))
            reason = judge(
                score,
                min_gain=cfg.score_min_gain,
                heldout_tol=cfg.score_heldout_tol,
                z=cfg.score_z,
            )
            scored += 1
            if reason is not None:
                flags[c.key] = ("usefulness", reason)
            else:
                gains[c.key] = (score.assigned_gain, cfg.score_z * score.assigned_se, c.own_steps)
        flags.update(_weak_gains(gains, cfg.score_rel_gain))
    fingerprints = {
        c.key: fp for c, fp in zip(candidates, prints, strict=True) if c.key not in flags
    }
    return Screened(flags, fingerprints, scored)


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
