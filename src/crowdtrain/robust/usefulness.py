"""Usefulness scoring: does applying a contribution lower the loss where it should?

A contribution can pass every format and norm check and still be worthless: a free-rider's zero
update, a sign-flipped one, or an update trained on poisoned targets. In the style of Templar's
Gauntlet validator (tplr.ai, 2025) the coordinator evaluates the loss of the current weights θ
and of the peer's end point θ − Δ (DiLoCo's sign convention, Douillard et al. 2023,
arXiv:2311.08105: Δ = θ_base − θ_local) on two batches:

* a batch of the peer's **assigned** data: honest training on it must lower its loss;
* a random **held-out** batch: an honest update must not make it markedly worse.

``Scorer.score`` measures the four losses; ``judge`` turns them into a verdict (``None`` for a
pass, otherwise one sentence for a person). Scoring runs on the CPU in eval mode without
autograd, reads Δ one parameter at a time through ``DeltaSource.read`` and keeps exactly one
extra copy of θ (the scorer's own model); the caller's ``params`` are never modified.
"""

from __future__ import annotations

import math
import queue
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crowdtrain.config import ModelConfig
from crowdtrain.models import build_model, load_state
from crowdtrain.robust.sources import DeltaSource

__all__ = ["Score", "Scorer", "Scorers", "judge"]

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Score:
    """Mean next-token losses of θ (before) and θ − Δ (after) on the two scoring batches."""

    assigned_before: float
    assigned_after: float
    heldout_before: float
    heldout_after: float
    assigned_se: float = 0.0  # standard error of the assigned gain over the batch's sequences

    @property
    def assigned_gain(self) -> float:
        """How much the contribution lowers the loss on the peer's assigned data."""
        return self.assigned_before - self.assigned_after

    @property
    def heldout_gain(self) -> float:
        """How much the contribution lowers the loss on held-out data (negative: it hurts)."""
        return self.heldout_before - self.heldout_after

    def is_finite(self) -> bool:
        """True when all four losses are finite numbers."""
        return all(
            math.isfinite(v)
            for v in (
                self.assigned_before,
                self.assigned_after,
                self.heldout_before,
                self.heldout_after,
            )
        )


class Scorer:
    """Scores contributions against one architecture, reusing a single model for every call."""

    def __init__(self, model_cfg: ModelConfig) -> None:
        self.model_cfg = model_cfg
        self.model = build_model(model_cfg)
        self.model.eval()
        self.model.requires_grad_(False)

    def score(
        self,
        params: Mapping[str, torch.Tensor],
        delta: DeltaSource,
        assigned: Batch,
        heldout: Batch,
    ) -> Score:
        """The losses of θ = ``params`` and of θ − Δ on the ``assigned`` and ``heldout`` batches.

        Each batch is ``(x, y)``: int64 token tensors of shape [B, T]. Raises ValueError (one
        sentence) when ``params`` or ``delta`` does not match the model's names and shapes.
        A non-finite Δ gives non-finite losses, which ``judge`` flags.
        """
        load_state(self.model, params)  # the one extra copy of θ; `params` stays untouched
        with torch.no_grad():
            assigned_before = self._losses(assigned)
            heldout_before = self._losses(heldout)
            for name, tensor in self.model.state_dict().items():
                tensor.sub_(_read_whole(delta, name, tensor).view_as(tensor))
            assigned_after = self._losses(assigned)
            heldout_after = self._losses(heldout)
        gains = (assigned_before - assigned_after).double()
        se = float(gains.std() / math.sqrt(gains.numel())) if gains.numel() > 1 else 0.0
        return Score(
            float(assigned_before.mean()),
            float(assigned_after.mean()),
            float(heldout_before.mean()),
            float(heldout_after.mean()),
            se,
        )

    def _losses(self, batch: Batch) -> torch.Tensor:
        """The mean next-token loss of every sequence in the batch."""
        x, y = batch
        logits: torch.Tensor = self.model(x)
        per_token = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        return per_token.view(y.shape).mean(dim=1)


def _read_whole(delta: DeltaSource, name: str, like: torch.Tensor) -> torch.Tensor:
    """All of Δ's parameter ``name`` as a float32 1-D tensor, checked against ``like``."""
    numel = like.numel()
    try:
        values = delta.read(name, 0, numel)
    except (KeyError, ValueError) as exc:
        detail = exc.args[0] if exc.args else type(exc).__name__
        raise ValueError(f"the contribution does not match the model: {detail}") from None
    if values.dim() != 1 or values.numel() != numel:
        raise ValueError(
            f"the contribution gave {values.numel()} elements for '{name}' instead of {numel};"
            " its shapes do not match the model"
        )
    return values.to(dtype=like.dtype)


def judge(score: Score, *, min_gain: float, heldout_tol: float, z: float = 2.0) -> str | None:
    """``None`` when the contribution looks useful, else one sentence saying why it does not.

    A contribution is flagged when

    * any loss is not finite;
    * its assigned gain is at most ``min_gain`` even ``z`` standard errors above the measured
      gain (training on the assigned data must lower its loss; a gain that is small only by
      the noise of a few sequences passes; with ``min_gain = 0`` a zero update is flagged); or
    * it makes the held-out loss worse by more than the fraction ``heldout_tol`` of the loss
      before, i.e. ``heldout_gain < −heldout_tol × heldout_before``.
    """
    if not math.isfinite(min_gain):
        raise ValueError(f"min_gain must be a finite number, got {min_gain}")
    if heldout_tol < 0 or not math.isfinite(heldout_tol):
        raise ValueError(f"heldout_tol must be a finite number >= 0, got {heldout_tol}")
    if not score.is_finite():
        return (
            "the contribution gives non-finite losses: assigned "
            f"{score.assigned_before:.3f} → {score.assigned_after:.3f}, held-out "
            f"{score.heldout_before:.3f} → {score.heldout_after:.3f}"
        )
    if score.assigned_gain + z * score.assigned_se <= min_gain:
        return (
            "training on the assigned data does not show: loss "
            f"{score.assigned_before:.3f} → {score.assigned_after:.3f}"
            f" (the gain must exceed {min_gain:g})"
        )
    if score.heldout_gain < -heldout_tol * score.heldout_before:
        worse = -score.heldout_gain / score.heldout_before if score.heldout_before else math.inf
        return (
            "the contribution makes held-out loss worse: "
            f"{score.heldout_before:.3f} → {score.heldout_after:.3f}"
            f" ({worse:.1%} worse, tolerance {heldout_tol * 100:g}%)"
        )
    return None


class Scorers:
    """Scoring models for any number of threads: each call takes one (building it the first
    time it is needed), so concurrent analyses never share a model."""

    def __init__(self, model: ModelConfig) -> None:
        self.model = model
        self._idle: queue.SimpleQueue[Scorer] = queue.SimpleQueue()

    def score(
        self, params: Mapping[str, torch.Tensor], delta: DeltaSource, assigned: Batch, held: Batch
    ) -> Score:
        """`Scorer.score` on a model no other thread is using."""
        try:
            scorer = self._idle.get_nowait()
        except queue.Empty:
            scorer = Scorer(self.model)
        try:
            return scorer.score(params, delta, assigned, held)
        finally:
            self._idle.put(scorer)
