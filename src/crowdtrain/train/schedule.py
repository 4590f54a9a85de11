"""The inner learning-rate schedule: linear warmup, then cosine decay to a floor.

This is the schedule DiLoCo's inner AdamW uses (Douillard et al. 2023, "DiLoCo: Distributed
Low-Communication Training of Language Models", arXiv:2311.08105), in the common form of
Loshchilov & Hutter 2017 (SGDR, arXiv:1608.03983) without restarts. The step index is global
across rounds (the trainer is given ``step_offset``), so the schedule is one curve over the run.
"""

from __future__ import annotations

import math

from crowdtrain.config import InnerConfig


def lr_at(step: int, inner: InnerConfig) -> float:
    """The learning rate for 0-based step `step`.

    Steps 0 … warmup_steps-1 rise linearly to ``lr`` (step 0 gets lr/warmup_steps, never 0);
    from warmup_steps to total_steps it follows a half cosine down to ``lr * min_lr_ratio``,
    and from total_steps on it stays at that floor.
    """
    if step < 0:
        raise ValueError(f"learning-rate step must be >= 0, got {step}")
    floor = inner.lr * inner.min_lr_ratio
    if step < inner.warmup_steps:
        return inner.lr * (step + 1) / inner.warmup_steps
    if step >= inner.total_steps:
        return floor
    progress = (step - inner.warmup_steps) / (inner.total_steps - inner.warmup_steps)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (inner.lr - floor)
