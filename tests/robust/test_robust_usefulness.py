"""Usefulness scoring: loss before/after applying Δ on assigned and held-out batches."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from crowdtrain.config import RunConfig
from crowdtrain.data import BatchSampler, ShardStore, assign_shards, ensure_packed_for, eval_batches
from crowdtrain.models import initial_state
from crowdtrain.robust import DictSource
from crowdtrain.robust.usefulness import Score, Scorer, judge
from crowdtrain.train import LocalTrainer
from crowdtrain_testing import tiny_config

Batch = tuple[torch.Tensor, torch.Tensor]
Delta = dict[str, torch.Tensor]
WARM_STEPS = 40
PEER_STEPS = 8


@dataclass
class Setup:
    cfg: RunConfig
    base: Delta  # θ after WARM_STEPS of training: a mid-run base, not the random init
    assigned: Batch  # the first batch the peer trained on
    heldout: Batch
    honest: Delta
    poisoned: Delta


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = tiny_config(corpus_file, tmp_path_factory.mktemp("usefulness") / "data")
    manifest = ensure_packed_for(cfg.data)
    shards = ShardStore(cfg.data.dir).load_many(s.sha256 for s in manifest.shards)

    def sampler(peer: str) -> BatchSampler:
        ids = assign_shards(
            manifest.train_ids, seed=0, round=0, peer=peer, k=cfg.data.shards_per_peer
        )
        return BatchSampler(
            shards,
            ids,
            seed=0,
            round=0,
            peer=peer,
            batch_size=cfg.data.batch_size,
            context=cfg.model.context,
        )

    warm = LocalTrainer(cfg.model, cfg.inner)
    warm.train(initial_state(cfg.model), iter(sampler("warm-up")), max_steps=WARM_STEPS)
    base = warm.current_state()
    peer = sampler("alice")
    honest = LocalTrainer(cfg.model, cfg.inner).train(
        base, iter(peer), max_steps=PEER_STEPS, step_offset=WARM_STEPS
    )
    perm = torch.randperm(cfg.model.vocab_size, generator=torch.Generator().manual_seed(1))
    poisoned = LocalTrainer(cfg.model, cfg.inner).train(
        base, ((x, perm[y]) for x, y in peer), max_steps=PEER_STEPS, step_offset=WARM_STEPS
    )
    heldout = eval_batches(
        shards,
        manifest.val_ids,
        batch_size=cfg.data.batch_size,
        context=cfg.model.context,
        n_batches=1,
    )[0]
    torch.set_num_threads(before)
    return Setup(cfg, base, peer.batch(0), heldout, honest.delta, poisoned.delta)


def _score(s: Setup, delta: Delta, scorer: Scorer | None = None) -> Score:
    scorer = scorer or Scorer(s.cfg.model)
    return scorer.score(s.base, DictSource(delta), s.assigned, s.heldout)


def _judge(score: Score) -> str | None:
    d = RunConfig().defence
    return judge(score, min_gain=d.score_min_gain, heldout_tol=d.score_heldout_tol)


def test_honest_delta_lowers_the_loss_and_passes(setup: Setup) -> None:
    score = _score(setup, setup.honest)
    assert score.assigned_gain > 0.05
    assert score.heldout_gain > 0
    assert score.assigned_gain == score.assigned_before - score.assigned_after
    assert score.heldout_gain == score.heldout_before - score.heldout_after
    assert _judge(score) is None


def test_sign_flipped_delta_is_flagged(setup: Setup) -> None:
    score = _score(setup, {k: -v for k, v in setup.honest.items()})
    assert score.assigned_gain < 0
    reason = _judge(score)
    assert reason is not None and reason.startswith("training on the assigned data does not show")


def test_zero_delta_is_flagged_with_exactly_zero_gain(setup: Setup) -> None:
    score = _score(setup, {k: torch.zeros_like(v) for k, v in setup.honest.items()})
    assert score.assigned_gain == 0.0 and score.heldout_gain == 0.0
    assert _judge(score) is not None


def test_delta_trained_on_poisoned_targets_is_flagged(setup: Setup) -> None:
    score = _score(setup, setup.poisoned)
    assert score.assigned_gain < 0 or score.heldout_gain < -0.05 * score.heldout_before
    assert _judge(score) is not None


def test_params_unchanged_and_scores_deterministic(setup: Setup) -> None:
    before = {k: v.clone() for k, v in setup.base.items()}
    scorer = Scorer(setup.cfg.model)
    first = _score(setup, setup.honest, scorer)
    _score(setup, setup.poisoned, scorer)  # the reused model must not carry state over
    again = _score(setup, setup.honest, scorer)
    fresh = _score(setup, setup.honest)
    assert first == again == fresh
    assert all(torch.equal(before[k], setup.base[k]) for k in before)


def test_a_delta_that_does_not_match_the_model_is_refused(setup: Setup) -> None:
    scorer = Scorer(setup.cfg.model)
    missing = dict(list(setup.honest.items())[1:])
    with pytest.raises(ValueError, match="does not match the model"):
        scorer.score(setup.base, DictSource(missing), setup.assigned, setup.heldout)
    name = next(iter(setup.honest))
    short = {**setup.honest, name: setup.honest[name].reshape(-1)[:-1]}
    with pytest.raises(ValueError, match="does not match the model"):
        scorer.score(setup.base, DictSource(short), setup.assigned, setup.heldout)


def test_judge_rules() -> None:
    useful = Score(3.0, 2.9, 2.0, 2.0)
    assert judge(useful, min_gain=0.0, heldout_tol=0.05) is None
    assert judge(useful, min_gain=0.2, heldout_tol=0.05) is not None  # gain 0.1 ≤ 0.2
    # held-out loss 2.0 → 2.09 is 4.5% worse: within 5%; 2.0 → 2.2 is 10% worse: flagged
    assert judge(Score(3.0, 2.9, 2.0, 2.09), min_gain=0.0, heldout_tol=0.05) is None
    reason = judge(Score(3.0, 2.9, 2.0, 2.2), min_gain=0.0, heldout_tol=0.05)
    assert reason == (
        "the contribution makes held-out loss worse: 2.000 → 2.200 (10.0% worse, tolerance 5%)"
    )
    reason = judge(Score(2.301, 2.305, 2.0, 2.0), min_gain=0.0, heldout_tol=0.05)
    assert reason == (
        "training on the assigned data does not show: loss 2.301 → 2.305 (the gain must exceed 0)"
    )
    nan = judge(Score(3.0, math.nan, 2.0, 2.0), min_gain=0.0, heldout_tol=0.05)
    assert nan is not None and "non-finite" in nan
    with pytest.raises(ValueError, match="heldout_tol"):
        judge(useful, min_gain=0.0, heldout_tol=-1.0)
