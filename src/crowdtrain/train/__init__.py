"""The inner loop of DiLoCo (Douillard et al. 2023, arXiv:2311.08105) on one worker.

``LocalTrainer.train`` runs AdamW from the global weights for a budget of steps or seconds and
returns a ``Contribution`` holding the pseudo-gradient Δ = θ_start − θ_end; ``lr_at`` is the
warmup + cosine schedule; ``evaluate`` is the deterministic held-out loss.
"""

from crowdtrain.train.local import Contribution, LocalTrainer, evaluate
from crowdtrain.train.schedule import lr_at

__all__ = ["Contribution", "LocalTrainer", "evaluate", "lr_at"]
