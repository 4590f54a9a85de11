"""AdamW moments as named tensors: read them, start an optimizer from them, and factor them.

A round that starts AdamW from zero moments spends its first steps on sign-like updates
(m̂/√v̂ = ±1 after one step) and on a second-moment estimate from a handful of gradients; a
round that starts from the moments of the round before does not, which is what DiLoCo's
persistent inner state buys (Douillard et al. 2023, arXiv:2311.08105). To keep a round a pure
function of public inputs, the moments a round starts from must themselves be public: the
coordinator publishes them with θ (``protocol``'s shared inner state), derived from public data
only (``publish``), so no volunteer can steer them:

- the second moment v from `inner.moment_batches` clipped gradients at the new θ on batches
  the coordinator draws itself — that of the mean of as many gradients as the round averaged
  contributions, which is what data-parallel AdamW divides by, estimated from the spread of
  those batches' gradients (``second_moment``) — factored: the second moment of a weight
  matrix is close to rank one, so its row and column means carry most of it (Adafactor, Shazeer
  & Stern 2018, arXiv:1804.04235): n + m numbers for an n×m matrix, v̂ᵢⱼ = rᵢ·cⱼ / mean(r);
  vectors whole;
- the first moment m from the outer update U = θ_before − θ_after read as the round's mean
  Adam step: U ≈ Σₜ lrₜ·m/√v, so m = U / Σₜ lrₜ · (√v̂ + ε), rounded to bfloat16.

With ``inner.optimizer_state = "derived"`` (the default) the coordinator computes no gradient:
it publishes only the round's mean step U / Σₜ lrₜ (``mean_steps``, bfloat16) and the number W
of contributions the round averaged, and each volunteer derives the rest at the start of its
round from its own first batch (``own_moments``): that batch's gradient taken as
`inner.moment_batches` micro-batches gives both the first step's gradient (their weighted mean)
and, from their spread, the second moment of a W-worker mean gradient, whole rather than
factored (nothing travels); then m = mean step · (√v̂ + ε). Still a pure function of public
inputs and the volunteer's assigned batches, so replays recompute it; no model pass is left in
the coordinator's close, and on the quick setting it beat the coordinator's estimate in all
four runs measured (0.6–1.1%, docs/BENCHMARKS.md, "The second moment from the volunteer's own
first batch").

A base with moments is θ's tensors plus these, under names with ``::`` that no parameter has:
``exp_avg::P``, ``exp_avg_sq::P`` (whole), ``exp_avg_sq.row::P`` and ``exp_avg_sq.col::P``
(factored), ``mean_step::P`` (derived), for parameter ``P``, and ``mean_step.workers::``;
``split_base`` separates them. bench/inner_state_study.py measures the choices
(docs/BENCHMARKS.md, "Replayable inner state").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from crowdtrain.config import InnerConfig, ModelConfig
from crowdtrain.models import build_model, lm_loss
from crowdtrain.train.schedule import lr_at

SEPARATOR = "::"
EXP_AVG = "exp_avg::"
EXP_AVG_SQ = "exp_avg_sq::"
ROW = "exp_avg_sq.row::"
COL = "exp_avg_sq.col::"
MEAN_STEP = "mean_step::"
#: The number of contributions the round averaged, a one-element tensor in a derived base.
WORKERS = "mean_step.workers::"


#: AdamW's ε, in the denominators that turn a step back into a first moment and back.
EPS = 1e-8

#: Wire bytes per parameter of a published moments blob: m in bfloat16 (v is factored into row
#: and column means, a few bytes per row).
BYTES_PER_PARAM = 2.0


def read_moments(
    optimizer: torch.optim.Optimizer, named: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The optimizer's ``exp_avg`` and ``exp_avg_sq`` of every named parameter that has them."""
    out: dict[str, torch.Tensor] = {}
    for name, p in named.items():
        state = optimizer.state.get(p, {})
        for key, prefix in (("exp_avg", EXP_AVG), ("exp_avg_sq", EXP_AVG_SQ)):
            if key in state:
                out[prefix + name] = state[key].detach().to("cpu", torch.float32, copy=True)
    return out


def load_moments(
    optimizer: torch.optim.Optimizer,
    named: Mapping[str, torch.Tensor],
    moments: Mapping[str, torch.Tensor],
    step: int,
    device: torch.device,
) -> None:
    """Start `optimizer` (fresh, not yet stepped) from `moments` (whole or factored), its step
    count at `step`; a parameter without a second moment in `moments` starts from zeros."""
    whole = expand(moments, {name: tuple(p.shape) for name, p in named.items()})
    for name, p in named.items():
        v = whole.get(EXP_AVG_SQ + name)
        if v is None:
            continue
        m = whole.get(EXP_AVG + name)
        optimizer.state[p] = {
            "step": torch.tensor(float(step)),
            "exp_avg": (torch.zeros_like(p) if m is None else m.to(device, p.dtype)).clone(),
            "exp_avg_sq": v.to(device, p.dtype).clone(),
        }


def factor(moments: Mapping[str, torch.Tensor], *, first: bool = False) -> dict[str, torch.Tensor]:
    """The published form of `moments`: second moments of matrices as row and column means,
    of vectors whole; first moments whole when `first`, else left out."""
    out: dict[str, torch.Tensor] = {}
    for key, t in moments.items():
        if key.startswith(EXP_AVG_SQ):
            name = key.removeprefix(EXP_AVG_SQ)
            if t.dim() == 2:
                out[ROW + name] = t.mean(dim=1)
                out[COL + name] = t.mean(dim=0)
            else:
                out[key] = t.clone()
        elif first and key.startswith(EXP_AVG):
            out[key] = t.clone()
    return out


def expand(
    moments: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Whole moments from a (possibly) factored form, checked against parameter `shapes`."""
    out: dict[str, torch.Tensor] = {}
    for key, t in moments.items():
        prefix = next((p for p in (EXP_AVG, EXP_AVG_SQ, ROW, COL) if key.startswith(p)), None)
        name = key.removeprefix(prefix) if prefix else key
        if prefix is None or name not in shapes:
            raise ValueError(f"moments name {key!r}, which is not a moment of a model parameter")
        shape = shapes[name]
        if prefix in (EXP_AVG, EXP_AVG_SQ):
            if tuple(t.shape) != shape:
                raise ValueError(f"moment {key!r} has shape {tuple(t.shape)}, expected {shape}")
            out[key] = t
        elif prefix == ROW:
            col = moments.get(COL + name)
            if len(shape) != 2 or col is None or tuple(t.shape) != (shape[0],):
                raise ValueError(f"factored moment {key!r} does not fit parameter shape {shape}")
            if tuple(col.shape) != (shape[1],):
                raise ValueError(f"factored moment {COL + name!r} does not fit shape {shape}")
            scale = t.mean().clamp_min(torch.finfo(torch.float32).tiny)
            out[EXP_AVG_SQ + name] = torch.outer(t, col) / scale
        elif ROW + name not in moments:
            raise ValueError(f"factored moment {key!r} comes without its row means")
    for key, t in out.items():
        if not bool(torch.isfinite(t).all()) or (key.startswith(EXP_AVG_SQ) and t.min() < 0):
            raise ValueError(f"moment {key!r} is not finite or has a negative second moment")
    return out


def validate(moments: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ValueError unless `moments` is a base's moments for parameter `shapes`: a derived
    base's (a finite mean step of each parameter's shape, one worker count ≥ 1), or published
    moments (``expand``)."""
    if WORKERS not in moments:
        expand(moments, shapes)
        return
    workers = moments[WORKERS]
    if workers.numel() != 1 or not float(workers.reshape(())) >= 1:
        raise ValueError(f"{WORKERS!r} must be one number of at least 1")
    expected = {MEAN_STEP + name for name in shapes} | {WORKERS}
    if set(moments) != expected:
        odd = sorted(set(moments) ^ expected)[:3]
        raise ValueError(f"a derived base needs a mean step per parameter; names differ: {odd}")
    for name, shape in shapes.items():
        t = moments[MEAN_STEP + name]
        if tuple(t.shape) != shape or not bool(torch.isfinite(t).all()):
            raise ValueError(f"mean step {name!r} is not finite or has the wrong shape")


def mean_moments(reports: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of several reports of the same form (keys every report has)."""
    if not reports:
        return {}
    keys = set(reports[0]).intersection(*reports[1:])
    return {k: torch.stack([r[k] for r in reports]).mean(dim=0) for k in sorted(keys)}


def split_base(
    base: Mapping[str, torch.Tensor],
) -> tuple[Mapping[str, torch.Tensor], dict[str, torch.Tensor]]:
    """θ's tensors and the published moments of a base (empty when it carries none)."""
    moments = {k: t for k, t in base.items() if SEPARATOR in k}
    if not moments:
        return base, {}
    return {k: t for k, t in base.items() if SEPARATOR not in k}, moments


def second_moment(
    model_cfg: ModelConfig,
    inner: InnerConfig,
    params: Mapping[str, torch.Tensor],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    workers: int = 1,
) -> dict[str, torch.Tensor]:
    """The second moment of the gradient that `workers` workers' steps average, at `params`,
    estimated from the clipped gradients (clipped as the inner loop clips them) of `batches`
    (``exp_avg_sq::P``, whole).

    A gradient of one batch is signal plus noise, E[g²] = s² + σ²; the mean of k batches'
    gradients has E[ḡ²] = s² + σ²/k. The round's outer update is the mean of `workers`
    workers' steps, so the second moment its Adam steps should be normalized by is that of a
    `workers`-batch mean, s² + σ²/W (what data-parallel AdamW on W workers divides by), not a
    single worker's s² + σ²: the per-worker moments make every averaged step smaller by up to
    √W where noise dominates. With A = mean of g² and C = ḡ² over the k batches, σ² =
    (A − C)·k/(k − 1) and the estimate is C + (A − C)·(k/W − 1)/(k − 1), kept at or above
    C·min(1, k/W) (its value when s² = 0). One batch, or one worker, gives A."""
    model = build_model(model_cfg, params)
    named = dict(model.named_parameters())
    total = {name: torch.zeros_like(p) for name, p in named.items()}
    sq = {name: torch.zeros_like(p) for name, p in named.items()}
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        lm_loss(model, x, y).backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(list(named.values()), inner.grad_clip)
        for name, p in named.items():
            if p.grad is not None:
                total[name] += p.grad.detach()
                sq[name] += p.grad.detach() ** 2
    return {
        EXP_AVG_SQ + n: mean_gradient_moment(total[n], sq[n], len(batches), workers) for n in named
    }


def mean_gradient_moment(
    total: torch.Tensor, squares: torch.Tensor, k: int, workers: int
) -> torch.Tensor:
    """The second moment of a `workers`-batch mean gradient from the sum `total` and the sum of
    `squares` of k batches' gradients (``second_moment``'s estimate)."""
    a = squares / k
    if k < 2 or workers == 1:
        return a
    c = (total / k) ** 2
    v = c + (a - c) * ((k / workers - 1) / (k - 1))
    return torch.maximum(v, c * min(1.0, k / workers))


def capped_workers(inner: InnerConfig, workers: int) -> int:
    """`workers` between 1 and 1/(1 − β₂): past that, one inner step's own g² (weight 1 − β₂)
    already outweighs the noise left in the starting v, so a larger W would only make first
    steps noisier; the cap also bounds what extra (sybil) contributions can do to everyone's
    first steps."""
    return max(1, min(workers, round(1 / (1 - inner.beta2))))


def _finite(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite."""
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def _lr_sum(inner: InnerConfig, round_steps: range) -> float:
    """Σₜ lrₜ over the inner steps `round_steps` (global indices)."""
    return sum(lr_at(step, inner) for step in round_steps)


def publish(
    model_cfg: ModelConfig,
    inner: InnerConfig,
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    round_steps: range,
    workers: int = 1,
) -> dict[str, torch.Tensor]:
    """The moments the next round starts from: v from `batches` at `after` for the mean of
    `workers` workers' gradients (``second_moment``; `workers` at most 1/(1 − β₂)), factored;
    m from the outer update `before` − `after` over the inner steps `round_steps` (global
    indices).
    Empty (the next round starts from zeros) when the weights or their gradients are not
    finite: a diverged run publishes nothing it could not train from."""
    workers = capped_workers(inner, workers)
    published = factor(second_moment(model_cfg, inner, after, batches, workers=workers))
    if not _finite(published):
        return {}
    published.update(first_moments(inner, before, after, published, round_steps=round_steps))
    if not _finite(published):
        return {}
    return published


def first_moments(
    inner: InnerConfig,
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    second: Mapping[str, torch.Tensor],
    *,
    round_steps: range,
) -> dict[str, torch.Tensor]:
    """The published first moments: the outer update `before` − `after` read as the mean Adam
    step of the inner steps `round_steps`, m = U / Σₜ lrₜ · (√v̂ + ε) with v̂ the published
    (factored) second moments `second`, in bfloat16. Public inputs only, so a volunteer that
    holds both θs and the second moments computes the same bits (``protocol.broadcast``)."""
    whole = expand(second, {k: tuple(t.shape) for k, t in after.items()})
    lr_sum = _lr_sum(inner, round_steps)
    out: dict[str, torch.Tensor] = {}
    for name in after:
        root = whole[EXP_AVG_SQ + name].sqrt() + EPS
        out[EXP_AVG + name] = ((before[name] - after[name]) * root / lr_sum).to(torch.bfloat16)
    return out


def mean_steps(
    inner: InnerConfig,
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    *,
    round_steps: range,
) -> dict[str, torch.Tensor]:
    """The outer update `before` − `after` per unit of the round's summed learning rate,
    U / Σₜ lrₜ over the inner steps `round_steps`, in bfloat16: the mean Adam step m/(√v̂ + ε)
    that a derived base starts its first moment from (``own_moments``)."""
    lr_sum = _lr_sum(inner, round_steps)
    return {
        MEAN_STEP + name: ((before[name] - after[name]) / lr_sum).to(torch.bfloat16)
        for name in after
    }


def publish_derived(
    inner: InnerConfig,
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    *,
    round_steps: range,
    workers: int,
) -> dict[str, torch.Tensor]:
    """What a derived base carries (``inner.optimizer_state = "derived"``): the round's mean
    steps and the number of workers (capped, ``capped_workers``) the next round's second
    moments are estimated for. No model pass. Empty when the update is not finite."""
    out = mean_steps(inner, before, after, round_steps=round_steps)
    if not _finite(out):
        return {}
    out[WORKERS] = torch.tensor([float(capped_workers(inner, workers))])
    return out


def derive_first(
    inner: InnerConfig,
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    second: Mapping[str, torch.Tensor],
    *,
    round_steps: range,
) -> dict[str, torch.Tensor]:
    """The part of a round's published moments a volunteer holding both θs computes itself:
    the mean steps of a derived base (`second` carries ``WORKERS``), else the first moments
    (``first_moments``)."""
    if WORKERS in second:
        return mean_steps(inner, before, after, round_steps=round_steps)
    return first_moments(inner, before, after, second, round_steps=round_steps)


def own_moments(
    mean_step: Mapping[str, torch.Tensor],
    workers: int,
    total: Mapping[str, torch.Tensor],
    squares: Mapping[str, torch.Tensor],
    k: int,
) -> dict[str, torch.Tensor]:
    """A derived base's starting moments for one volunteer: v from the sum `total` and sum of
    `squares` of its first batch's k clipped micro-batch gradients, for the mean of `workers`
    full batches (= k·`workers` micro-batches, ``mean_gradient_moment``), whole; and
    m = mean step · (√v + ε) (names without prefix in `total`, `squares`; `mean_step` keyed
    ``mean_step::P``)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in total.items():
        v = mean_gradient_moment(t, squares[name], k, k * workers)
        step = mean_step[MEAN_STEP + name].to(v.device, torch.float32)
        out[EXP_AVG_SQ + name] = v
        out[EXP_AVG + name] = step * (v.sqrt() + EPS)
    return out


def second_only(moments: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published moments without what a volunteer holding both θs derives itself
    (``derive_first``): a few bytes per row, or one number for a derived base."""
    return {k: t for k, t in moments.items() if not k.startswith((EXP_AVG, MEAN_STEP))}


def drift(
    moments: Mapping[str, torch.Tensor],
    inner: InnerConfig,
    shapes: Mapping[str, tuple[int, ...]],
    round_steps: range,
) -> dict[str, torch.Tensor]:
    """What the published first moment alone adds to every volunteer's Δ of a round:
    Σₜ lrₜ·β₁ᵗ⁺¹ · m / (√v̂ + ε) over the round's steps. Every honest Δ of the round shares it,
    so copy detection compares contributions with it taken out (``protocol.screening``).
    Empty when `moments` has no first moment."""
    if not moments:
        return {}
    scale = sum(lr_at(s, inner) * inner.beta1 ** (i + 1) for i, s in enumerate(round_steps))
    if WORKERS in moments:  # m / (√v̂ + ε) is the mean step itself, whatever v̂ a volunteer has
        return {
            n: scale * moments[MEAN_STEP + n].float() for n in shapes if MEAN_STEP + n in moments
        }
    whole = expand(moments, shapes)
    return {
        name: scale * whole[EXP_AVG + name].float() / (whole[EXP_AVG_SQ + name].sqrt() + EPS)
        for name in shapes
        if EXP_AVG + name in whole and EXP_AVG_SQ + name in whole
    }
