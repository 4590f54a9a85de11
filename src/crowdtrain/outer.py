"""Outer optimizers: turn the aggregate pseudo-gradient of a round into the next global weights.

In DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of Language
Models", arXiv:2311.08105) the coordinator treats the aggregated Δ = θ_r − θ_local as a gradient
and applies an optimizer to it. Here that optimizer is a stock ``torch.optim`` one: the outer
step puts Δ into each parameter's ``.grad`` and calls the optimizer's ``step()``, so the choice
of outer optimizer is configuration (``OuterConfig.optimizer``), not code:

- ``"nesterov"``: ``torch.optim.SGD`` with Nesterov momentum, DiLoCo's outer step (lr 0.7,
  momentum 0.9): m ← μ·m + Δ;  θ ← θ − lr·(Δ + μ·m).
- ``"sgd"``: ``torch.optim.SGD`` with heavy-ball ``momentum``; lr 1 with momentum 0 is plain
  averaging, θ ← θ − Δ (the mean of the volunteers' weights when Δ is their mean).
- ``"adam"``: ``torch.optim.Adam`` with ``betas`` and ``eps``, no weight decay.
- ``"error_feedback"``: SparseLoCo (Sarfi et al. 2025, "Communication Efficient LLM
  Pre-training with SparseLoCo", arXiv:2508.15706) compresses Δ with top-k and keeps an
  error-feedback accumulator on every worker; that accumulator plays the role of outer
  momentum, so the coordinator applies plain SGD (momentum unused).

A step updates in place only the tensors named in ``delta``, so a caller may apply it one
fragment of tensors at a time to bound its memory; the state of the other tensors does not
advance. The state is kept by parameter name, not by tensor object, because a restore hands
the optimizer new tensors. ``state_dict`` names each entry ``<kind>::<parameter>``
(``momentum::`` for the SGD family, ``exp_avg::``, ``exp_avg_sq::`` and ``step::`` for Adam)
with float32 CPU tensors, safe to write as safetensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, get_args, runtime_checkable

import torch

from crowdtrain.config import OuterConfig, OuterName

#: How each entry of torch's per-parameter optimizer state is named in ``state_dict``.
STATE_PREFIXES: dict[str, str] = {
    "momentum_buffer": "momentum",
    "exp_avg": "exp_avg",
    "exp_avg_sq": "exp_avg_sq",
    "step": "step",
}
_ENTRIES = {prefix: entry for entry, prefix in STATE_PREFIXES.items()}


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


def _grad(params: dict[str, torch.Tensor], name: str, d: torch.Tensor) -> torch.Tensor:
    """Δ for `name`, checked against its parameter and typed and placed like it."""
    if name not in params:
        raise ValueError(f"pseudo-gradient names tensor {name!r}, which is not a model parameter")
    p = params[name]
    if d.shape != p.shape:
        raise ValueError(
            f"pseudo-gradient for {name!r} has shape {tuple(d.shape)} "
            f"but the parameter has shape {tuple(p.shape)}"
        )
    return d.detach().to(device=p.device, dtype=p.dtype)


def _one_of(items: list[str]) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


class TorchOuter:
    """The outer step as a stock ``torch.optim`` optimizer fed Δ as its gradient.

    `optimizer` is one of ``OuterConfig``'s names; `momentum` is used by ``"nesterov"`` and
    ``"sgd"``, `betas` and `eps` by ``"adam"``. See the module docstring for what each does.
    """

    def __init__(
        self,
        optimizer: OuterName = "nesterov",
        *,
        lr: float = 0.7,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
    ) -> None:
        allowed = get_args(OuterName)
        if optimizer not in allowed:
            raise ValueError(
                f"unknown outer optimizer {optimizer!r}; allowed are: {', '.join(sorted(allowed))}"
            )
        if not lr > 0:
            raise ValueError(f"outer lr must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"outer momentum must be in [0, 1), got {momentum}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"outer betas must be two numbers in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"outer eps must be positive, got {eps}")
        self.optimizer: OuterName = optimizer
        self.lr = lr
        self.momentum = 0.0 if optimizer in ("error_feedback", "adam") else momentum
        self.betas = betas
        self.eps = eps
        self._state: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def state_entries(self) -> tuple[str, ...]:
        """The entries of torch's per-parameter state this optimizer keeps."""
        if self.optimizer == "adam":
            return ("exp_avg", "exp_avg_sq", "step")
        return ("momentum_buffer",) if self.momentum > 0 else ()

    def _torch_optimizer(self, tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
        # foreach=False on every device: the single-tensor implementations run, per tensor, the
        # operations the hand-written step of earlier releases ran, and they never write to
        # `.grad` (the multi-tensor Nesterov SGD adds the momentum into it in place), so the
        # caller's Δ serves as the gradient without a copy.
        if self.optimizer == "adam":
            return torch.optim.Adam(
                tensors,
                lr=self.lr,
                betas=self.betas,
                eps=self.eps,
                weight_decay=0.0,
                foreach=False,
            )
        nesterov = self.optimizer == "nesterov" and self.momentum > 0
        return torch.optim.SGD(
            tensors, lr=self.lr, momentum=self.momentum, nesterov=nesterov, foreach=False
        )

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> None:
        """Set each named parameter's ``.grad`` to its Δ and step the optimizer over them."""
        if not delta:
            return
        grads = {name: _grad(params, name, d) for name, d in delta.items()}
        tensors = [params[name] for name in grads]
        opt = self._torch_optimizer(tensors)
        try:
            for name, p in zip(grads, tensors, strict=True):
                if name in self._state:
                    opt.state[p] = self._placed(name, p)
                p.grad = grads[name]
            opt.step()
        finally:
            for p in tensors:
                p.grad = None
        for name, p in zip(grads, tensors, strict=True):
            if opt.state[p]:
                self._state[name] = opt.state[p]

    def _placed(self, name: str, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """The saved state of `name` on `p`'s device and dtype (``step`` stays a CPU scalar,
        as torch keeps it)."""
        placed = {}
        for entry, tensor in self._state[name].items():
            if entry == "step":
                placed[entry] = tensor
                continue
            if tensor.shape != p.shape:
                raise ValueError(
                    f"outer optimizer state '{STATE_PREFIXES[entry]}::{name}' has shape "
                    f"{tuple(tensor.shape)} but the parameter has shape {tuple(p.shape)}"
                )
            placed[entry] = tensor.to(device=p.device, dtype=p.dtype)
        return placed

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter's state as ``<kind>::<parameter>`` → float32 CPU copy."""
        return {
            f"{STATE_PREFIXES[entry]}::{name}": tensor.detach().to(
                device="cpu", dtype=torch.float32, copy=True
            )
            for name, state in self._state.items()
            for entry, tensor in state.items()
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned, or the Nesterov state of earlier releases
        (the same ``momentum::<parameter>`` keys)."""
        entries = self.state_entries
        # Earlier releases saved momentum buffers for Nesterov with momentum 0 too; they have
        # no effect on the step, so they are accepted and dropped.
        accepted = entries or (("momentum_buffer",) if self.optimizer == "nesterov" else ())
        if state and not accepted:
            label = "error-feedback" if self.optimizer == "error_feedback" else "momentum-free sgd"
            key = next(iter(state))
            raise ValueError(f"the {label} outer optimizer has no state, got key {key!r}")
        loaded: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            prefix, sep, name = key.partition("::")
            entry = _ENTRIES.get(prefix, "")
            if not sep or not name or entry not in accepted:
                forms = [f"'{STATE_PREFIXES[e]}::<parameter>'" for e in accepted]
                expected = _one_of(forms)
                raise ValueError(f"outer optimizer state key {key!r} is not of the form {expected}")
            if entry == "step" and tensor.dim() != 0:
                raise ValueError(f"outer optimizer state {key!r} must be a scalar")
            loaded.setdefault(name, {})[entry] = tensor.detach().to(
                device="cpu", dtype=torch.float32, copy=True
            )
        for name, saved in loaded.items():
            missing = [e for e in entries if e not in saved]
            if missing:
                raise ValueError(
                    f"outer optimizer state for {name!r} lacks "
                    f"'{STATE_PREFIXES[missing[0]]}::{name}'"
                )
        self._state = loaded if entries else {}


class NesterovOuter(TorchOuter):
    """DiLoCo's outer step: ``torch.optim.SGD(lr, momentum, nesterov=True)`` with grad = Δ."""

    def __init__(self, lr: float = 0.7, momentum: float = 0.9) -> None:
        super().__init__("nesterov", lr=lr, momentum=momentum)


class ErrorFeedbackOuter(TorchOuter):
    """SparseLoCo's outer step: plain SGD, θ ← θ − lr·Δ_agg, with no momentum of its own.

    Pair it with the codec's error feedback (``crowdtrain.codec.encode(..., residual=...)``):
    each worker keeps the residual of what its compressor dropped and adds it to its next Δ.
    That per-worker accumulator replaces DiLoCo's outer momentum, so using momentum here as well
    would count the same history twice.
    """

    def __init__(self, lr: float = 0.7) -> None:
        super().__init__("error_feedback", lr=lr)


def build_outer(cfg: OuterConfig) -> TorchOuter:
    """The outer optimizer named by ``cfg.optimizer``, with its settings from `cfg`."""
    if cfg.optimizer == "nesterov":
        return NesterovOuter(lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "error_feedback":
        return ErrorFeedbackOuter(lr=cfg.lr)
    return TorchOuter(cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, betas=cfg.betas, eps=cfg.eps)
