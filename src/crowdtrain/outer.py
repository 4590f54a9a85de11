"""Outer optimizers: turn the aggregate pseudo-gradient of a round into the next global weights.

In DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of Language
Models", arXiv:2311.08105) the coordinator treats the aggregated Δ = θ_r − θ_local as a gradient
and applies SGD with Nesterov momentum (lr 0.7, momentum 0.9): ``NesterovOuter``.

SparseLoCo (Sarfi et al. 2025, "Communication Efficient LLM Pre-training with SparseLoCo",
arXiv:2508.15706) compresses Δ with top-k and keeps an error-feedback accumulator on every
worker; that accumulator plays the role of outer momentum, so the coordinator applies plain SGD:
``ErrorFeedbackOuter``.

Both update the parameters in place and only touch the tensors named in ``delta``, so a caller
may apply a step one tensor (or one group of tensors) at a time to bound its memory. Their state
dicts use safetensors-safe keys and float32 CPU tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch

from crowdtrain.config import OuterConfig

MOMENTUM_PREFIX = "momentum::"


@runtime_checkable
class OuterOptimizer(Protocol):
    """Applies an aggregate pseudo-gradient to the global parameters, in place."""

    def step(self, params: dict[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> None:
        """Update every parameter named in `delta` in place."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The optimizer's state as named tensors (safetensors-safe keys)."""
        ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the state returned by ``state_dict``."""
        ...


def _checked(params: dict[str, torch.Tensor], name: str, d: torch.Tensor) -> torch.Tensor:
    if name not in params:
        raise ValueError(f"pseudo-gradient names tensor {name!r}, which is not a model parameter")
    p = params[name]
    if d.shape != p.shape:
        raise ValueError(
            f"pseudo-gradient for {name!r} has shape {tuple(d.shape)} "
            f"but the parameter has shape {tuple(p.shape)}"
        )
    return d.to(device=p.device, dtype=p.dtype)


class NesterovOuter:
    """DiLoCo's outer step: SGD with Nesterov momentum on the pseudo-gradient Δ.

    m ← μ·m + Δ;  θ ← θ − lr·(Δ + μ·m), with m = 0 before the first step. This is exactly
    ``torch.optim.SGD(lr=lr, momentum=μ, nesterov=True)`` with ``grad = Δ`` (same operations in
    the same order, so the results are bit-identical).
    """

    def __init__(self, lr: float = 0.7, momentum: float = 0.9) -> None:
        if not lr > 0:
            raise ValueError(f"outer lr must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"outer momentum must be in [0, 1), got {momentum}")
        self.lr = lr
        self.momentum = momentum
        self._buffers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> None:
        for name, raw in delta.items():
            d = _checked(params, name, raw)
            buf = self._buffers.get(name)
            if buf is None:
                buf = d.clone()
                self._buffers[name] = buf
            else:
                if buf.shape != d.shape:
                    raise ValueError(
                        f"momentum for {name!r} has shape {tuple(buf.shape)} "
                        f"but the pseudo-gradient has shape {tuple(d.shape)}"
                    )
                buf.mul_(self.momentum).add_(d)
            params[name].add_(d.add(buf, alpha=self.momentum), alpha=-self.lr)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            MOMENTUM_PREFIX + name: buf.detach().to(device="cpu", dtype=torch.float32, copy=True)
            for name, buf in self._buffers.items()
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        buffers: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            if not key.startswith(MOMENTUM_PREFIX) or key == MOMENTUM_PREFIX:
                raise ValueError(
                    f"outer optimizer state key {key!r} is not of the form "
                    f"'{MOMENTUM_PREFIX}<parameter>'"
                )
            buffers[key.removeprefix(MOMENTUM_PREFIX)] = tensor.detach().to(
                dtype=torch.float32, copy=True
            )
        self._buffers = buffers


class ErrorFeedbackOuter:
    """SparseLoCo's outer step: plain SGD, θ ← θ − lr·Δ_agg, with no momentum of its own.

    Pair it with the codec's error feedback (``crowdtrain.codec.encode(..., residual=...)``):
    each worker keeps the residual of what its compressor dropped and adds it to its next Δ.
    That per-worker accumulator replaces DiLoCo's outer momentum, so using momentum here as well
    would count the same history twice. ``lr`` defaults to ``OuterConfig.lr`` via
    ``build_outer``.
    """

    def __init__(self, lr: float = 0.7) -> None:
        if not lr > 0:
            raise ValueError(f"outer lr must be positive, got {lr}")
        self.lr = lr

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> None:
        for name, raw in delta.items():
            params[name].add_(_checked(params, name, raw), alpha=-self.lr)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            key = next(iter(state))
            raise ValueError(f"the error-feedback outer optimizer has no state, got key {key!r}")


def build_outer(cfg: OuterConfig) -> OuterOptimizer:
    """The outer optimizer named by ``cfg.optimizer``, with ``cfg.lr`` (and ``cfg.momentum``)."""
    if cfg.optimizer == "nesterov":
        return NesterovOuter(lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "error_feedback":
        return ErrorFeedbackOuter(lr=cfg.lr)
    raise ValueError(
        f"unknown outer optimizer {cfg.optimizer!r}; allowed are: error_feedback, nesterov"
    )
