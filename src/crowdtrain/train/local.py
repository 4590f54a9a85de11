"""The inner loop of DiLoCo: train locally from the global weights and return a pseudo-gradient.

DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of Language
Models", arXiv:2311.08105) has each worker start a round from the global weights θ_r, take many
AdamW steps on its own data, and send back the pseudo-gradient Δ = θ_r − θ_local instead of a
gradient per step. ``LocalTrainer.train`` is that inner loop; its result is a ``Contribution``.

Choices made here:

* **Budget.** A round is a number of steps or a number of seconds (read from the injected
  ``clock``, so the simulator can use virtual time), whichever is hit first; at least one step.
* **Replayability.** With ``inner.optimizer_state = "published"`` (the default) AdamW starts
  each round from the moments the coordinator published with θ (``train/moments.py``), with
  ``"fresh"`` from zeros; either way Δ is a pure function of (base weights and moments, batches,
  config, step_offset), so any verifier can recompute it bit for bit on the same hardware and
  thread count. With ``"kept"`` each worker's own moments persist across rounds, as in the
  original DiLoCo, and its rounds cannot be replayed.
* **Weight decay** follows the nanoGPT convention: every tensor with two or more dimensions
  (linear weights *and* embeddings) is decayed; biases and LayerNorm parameters are not.
* **Threads.** The trainer never changes torch's global thread count; the caller sets it
  (``torch.set_num_threads(inner.threads)``), because results are only bit-reproducible for a
  fixed thread count.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from crowdtrain.config import InnerConfig, ModelConfig
from crowdtrain.models import build_model, lm_loss, load_state
from crowdtrain.train.moments import WORKERS, load_moments, own_moments, read_moments, split_base
from crowdtrain.train.schedule import lr_at


@dataclass
class Contribution:
    """One worker's result for one round: the pseudo-gradient and what it cost."""

    delta: dict[str, torch.Tensor]  # Δ = θ_start − θ_end: float32 CPU tensors, parameter shapes
    samples: int  # sequences trained on
    tokens: int  # tokens trained on (samples × sequence length)
    steps: int  # optimizer steps taken
    loss_first: float  # training loss of the first step (before its update)
    loss_last: float  # training loss of the last step (before its update)
    loss_mean: float  # mean training loss over all steps
    seconds: float  # time spent, as measured by the trainer's clock


def _adamw(model: nn.Module, inner: InnerConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on tensors of dim >= 2 only (nanoGPT's convention)."""
    return _adamw_of(list(model.parameters()), inner)


def _adamw_of(params: list[nn.Parameter], inner: InnerConfig) -> torch.optim.AdamW:
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": inner.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=inner.lr, betas=(inner.beta1, inner.beta2), foreach=True)


#: Parameters Muon does not orthogonalize: embeddings and the output head (Jordan et al. 2024).
_NOT_MUON = ("tok_emb.", "pos_emb.", "head.")


class _MuonAdamW(torch.optim.Optimizer):
    """Muon for the hidden weight matrices, AdamW (nanoGPT's decay groups) for the rest, stepped
    together as one optimizer: the schedule sets ``lr`` in every group, and Muon's update is
    scaled to AdamW's RMS (``adjust_lr_fn="match_rms_adamw"``) so one lr serves both."""

    def __init__(self, model: nn.Module, inner: InnerConfig) -> None:
        named = list(model.named_parameters())
        hidden = {n for n, p in named if p.dim() == 2 and not n.startswith(_NOT_MUON)}
        self.muon = torch.optim.Muon(
            [p for n, p in named if n in hidden],
            lr=inner.lr,
            weight_decay=inner.weight_decay,
            adjust_lr_fn="match_rms_adamw",
        )
        self.adamw = _adamw_of([p for n, p in named if n not in hidden], inner)
        super().__init__([p for _, p in named], {"lr": inner.lr})
        self.param_groups = [*self.muon.param_groups, *self.adamw.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def step(self, closure: None = None) -> None:  # type: ignore[override]
        self.muon.step()  # type: ignore[no-untyped-call]
        self.adamw.step()


def _optimizer(model: nn.Module, inner: InnerConfig) -> torch.optim.Optimizer:
    return _MuonAdamW(model, inner) if inner.optimizer == "muon" else _adamw(model, inner)


class LocalTrainer:
    """Runs the inner AdamW loop of one worker on one device, one round per ``train`` call."""

    def __init__(self, model_cfg: ModelConfig, inner: InnerConfig, *, device: str = "cpu") -> None:
        self.model_cfg = model_cfg
        self.inner = inner
        self.device = torch.device(device)
        # The initial weights are overwritten by `base` at the start of every round.
        self.model = build_model(model_cfg).to(self.device)
        self._params = list(self.model.parameters())
        self._named = dict(self.model.named_parameters())
        self._optimizer = _optimizer(self.model, inner) if inner.keep_optimizer_state else None
        self._last_optimizer: torch.optim.Optimizer | None = None

    def train(
        self,
        base: Mapping[str, torch.Tensor],
        batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
        *,
        step_offset: int = 0,
        max_steps: int | None = None,
        max_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_step: Callable[[int, float], None] | None = None,
        start: Mapping[str, torch.Tensor] | None = None,
        stop: threading.Event | None = None,
    ) -> Contribution:
        """Train from `base` on `batches` within the budget and return the contribution.

        The learning rate of the i-th step is ``lr_at(step_offset + i)``. Without `max_steps`
        and `max_seconds` the budget is ``inner.budget``; with both, whichever is hit first ends
        the round. The budget is checked after each step, so at least one step is always taken
        and no batch is drawn from the iterator that will not be trained on. `on_step` is called
        after every step with the global step index and that step's loss. `base` must not be
        modified while training: Δ is computed against it without copying it.

        `start` (default `base`) is where the local weights begin: a volunteer that overlaps
        communication with computation rebases the progress it made while waiting onto the new
        global weights and starts there, while Δ is still measured from `base` (the one-step
        delayed update of Streaming DiLoCo, Douillard et al. 2025, arXiv:2501.18512). `stop`
        ends the round after the current step when it is set.

        `base` may carry published AdamW moments besides θ (``train/moments.py``: entries named
        ``exp_avg::NAME`` and the like): a fresh optimizer then starts from them instead of
        zeros, its step count at `step_offset` (bias correction as for a run that far in).
        After the call ``end_moments()`` gives the moments the round ended with.
        """
        if max_steps is None and max_seconds is None:
            if self.inner.budget == "steps":
                max_steps = self.inner.steps
            else:
                max_seconds = self.inner.seconds
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        if max_seconds is not None and not max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, got {max_seconds}")
        if step_offset < 0:
            raise ValueError(f"step_offset must be >= 0, got {step_offset}")

        base, moments = split_base(base)
        load_state(self.model, base if start is None else split_base(start)[0])
        if moments and self._optimizer is not None:
            raise ValueError("published moments make no sense when the trainer keeps its own")
        optimizer = (
            self._optimizer if self._optimizer is not None else _optimizer(self.model, self.inner)
        )
        derived = WORKERS in moments
        if moments and not derived:
            load_moments(optimizer, self._named, moments, step_offset, self.device)
        self._last_optimizer = optimizer
        self.model.train()

        steps = samples = tokens = 0
        loss_first = loss_last = loss_sum = 0.0
        started = clock()
        for x_cpu, y_cpu in batches:
            x, y = x_cpu.to(self.device), y_cpu.to(self.device)
            step = step_offset + steps
            lr = lr_at(step, self.inner)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if derived and steps == 0:
                value = self._derived_start(optimizer, moments, x, y, step)
            else:
                loss = lm_loss(self.model, x, y)
                value = _finite(loss.item(), step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
            nn.utils.clip_grad_norm_(self._params, self.inner.grad_clip)
            optimizer.step()

            if steps == 0:
                loss_first = value
            loss_last = value
            loss_sum += value
            steps += 1
            samples += x.shape[0]
            tokens += x.numel()
            if on_step is not None:
                on_step(step, value)
            if max_steps is not None and steps >= max_steps:
                break
            if max_seconds is not None and clock() - started >= max_seconds:
                break
            if stop is not None and stop.is_set():
                break
        if steps == 0:
            raise ValueError("the batch iterator gave no batches; a round needs at least one")
        seconds = clock() - started

        with torch.no_grad():
            delta = {
                name: base[name].to("cpu", torch.float32) - p.to("cpu", torch.float32)
                for name, p in self.model.state_dict().items()
            }
        return Contribution(
            delta=delta,
            samples=samples,
            tokens=tokens,
            steps=steps,
            loss_first=loss_first,
            loss_last=loss_last,
            loss_mean=loss_sum / steps,
            seconds=seconds,
        )

    def _derived_start(
        self,
        optimizer: torch.optim.Optimizer,
        moments: Mapping[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        step: int,
    ) -> float:
        """The first step of a round from a derived base (``train.moments.own_moments``): the
        batch's gradient as `inner.moment_batches` micro-batches, whose weighted mean is left
        in the parameters' ``.grad`` (the batch's gradient) and whose clipped spread gives the
        second moment the optimizer starts from, with m = mean step · (√v + ε). The same
        compute as one step; returns the batch's loss."""
        k = self.inner.moment_batches
        pieces = list(zip(x.chunk(k), y.chunk(k), strict=True))
        full = {name: torch.zeros_like(p) for name, p in self._named.items()}
        total = {name: torch.zeros_like(p) for name, p in self._named.items()}
        squares = {name: torch.zeros_like(p) for name, p in self._named.items()}
        value, seen = 0.0, set[str]()
        for xi, yi in pieces:
            share = xi.shape[0] / x.shape[0]
            optimizer.zero_grad(set_to_none=True)
            loss = lm_loss(self.model, xi, yi)
            value += _finite(loss.item(), step) * share
            loss.backward()  # type: ignore[no-untyped-call]
            for name, p in self._named.items():
                if p.grad is not None:
                    full[name] += p.grad * share
                    seen.add(name)
            nn.utils.clip_grad_norm_(self._params, self.inner.grad_clip)
            for name, p in self._named.items():
                if p.grad is not None:
                    total[name] += p.grad
                    squares[name] += p.grad**2
        workers = int(float(moments[WORKERS].reshape(())))
        start = own_moments(moments, workers, total, squares, len(pieces))
        load_moments(optimizer, self._named, start, step, self.device)
        for name, p in self._named.items():
            p.grad = full[name] if name in seen else None
        return value

    def end_moments(self) -> dict[str, torch.Tensor]:
        """AdamW's moments after the last ``train`` call (``exp_avg::NAME``, ``exp_avg_sq::NAME``;
        float32 CPU copies); empty before the first call."""
        if self._last_optimizer is None:
            return {}
        return read_moments(self._last_optimizer, self._named)

    def current_state(self) -> dict[str, torch.Tensor]:
        """θ_local after the last ``train`` call, as float32 CPU copies."""
        return {
            name: t.detach().to(device="cpu", dtype=torch.float32, copy=True)
            for name, t in self.model.state_dict().items()
        }


def _finite(value: float, step: int) -> float:
    """`value`, a step's loss, checked before the update touches any state."""
    if not math.isfinite(value):
        raise FloatingPointError(
            f"training diverged: the loss became {value} at step {step}; "
            "lower inner.lr or inner.grad_clip"
        )
    return value


def evaluate(
    model_cfg: ModelConfig,
    state: Mapping[str, torch.Tensor],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: str = "cpu",
) -> float:
    """Mean next-token loss of the weights `state` over `batches`, weighted by tokens."""
    if not batches:
        raise ValueError("evaluation needs at least one batch")
    model = build_model(model_cfg, state).to(device)
    model.eval()
    total = 0.0
    count = 0
    with torch.inference_mode():
        for x, y in batches:
            loss = lm_loss(model, x.to(device), y.to(device))
            total += loss.item() * y.numel()
            count += y.numel()
    return total / count
