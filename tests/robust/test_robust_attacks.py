"""With 20% attackers, robust rules stay near the honest mean while the plain mean does not.

Attacks: scaling a contribution ×1000, and flipping its sign (the classic attacks in Yin et al.,
ICML 2018, and Karimireddy et al., ICML 2021). Centered clipping is centred on the previous
round's aggregate, which here is near the honest mean, as it is in a healthy run.
"""

from __future__ import annotations

import pytest
import torch

from crowdtrain.config import AggregationConfig
from crowdtrain.robust import DictSource, aggregate

SHAPES = {"w": (48, 64), "b": (500,)}
HONEST, ATTACKERS = 8, 2  # 20% attackers


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[name].reshape(-1) for name in SHAPES])


def unflat(vector: torch.Tensor) -> dict[str, torch.Tensor]:
    n = 48 * 64
    return {"w": vector[:n].reshape(48, 64).clone(), "b": vector[n:].clone()}


def scenario(attack: str) -> tuple[list[torch.Tensor], list[float], torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    numel = 48 * 64 + 500
    true = torch.randn(numel, generator=gen)
    honest = [true + 0.1 * torch.randn(numel, generator=gen) for _ in range(HONEST)]
    weights = [float(w) for w in torch.randint(50, 150, (HONEST + ATTACKERS,), generator=gen)]
    if attack == "scale":
        bad = [1000.0 * honest[i] for i in range(ATTACKERS)]
    else:
        bad = [-honest[i] for i in range(ATTACKERS)]
    contributions = honest[:4] + bad + honest[4:]  # attackers are not last
    honest_w = torch.tensor(weights[:4] + weights[4 + ATTACKERS :])
    honest_mean = (honest_w[:, None] * torch.stack(honest)).sum(0) / honest_w.sum()
    previous = true + 0.1 * torch.randn(numel, generator=gen)
    return contributions, weights, honest_mean, previous


@pytest.mark.parametrize("attack", ["scale", "sign_flip"])
def test_robust_rules_resist_twenty_percent_attackers(attack: str) -> None:
    contributions, weights, honest_mean, previous = scenario(attack)
    sources = [DictSource(unflat(c)) for c in contributions]

    def error(method: str, **extra: object) -> float:
        cfg = AggregationConfig.model_validate({"method": method, "fragment_numel": 1024, **extra})
        result = aggregate(sources, weights, SHAPES, cfg, reference=unflat(previous), seed=1)
        return float((flat(result.delta) - honest_mean).norm() / honest_mean.norm())

    assert error("mean") > 0.3
    assert error("median", bucket_size=1) < 0.1
    assert error("median", bucket_size=2) < 0.15
    assert error("trimmed_mean", bucket_size=1, trim_fraction=0.2) < 0.1
    assert error("centered_clip", bucket_size=1) < 0.1
    assert error("centered_clip", bucket_size=2) < 0.15
    assert error("centered_clip", bucket_size=2, clip_iters=3) < 0.15


def test_attackers_are_the_ones_clipped_and_far() -> None:
    contributions, weights, _, previous = scenario("scale")
    cfg = AggregationConfig.model_validate(
        dict(method="centered_clip", bucket_size=1, fragment_numel=1024)
    )
    result = aggregate(
        [DictSource(unflat(c)) for c in contributions],
        weights,
        SHAPES,
        cfg,
        reference=unflat(previous),
    )
    attackers = [4, 5]
    honest = [i for i in range(len(contributions)) if i not in attackers]
    assert min(result.distances[i] for i in attackers) > 100 * max(
        result.distances[i] for i in honest
    )
    assert max(result.scales[i] for i in attackers) < 0.01
    assert result.tau is not None and result.tau < min(result.distances[i] for i in attackers)
