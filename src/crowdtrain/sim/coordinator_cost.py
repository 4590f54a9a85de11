"""What a round's close costs the coordinator, fitted to `crowdtrain bench coordinator`.

The simulator charges the seconds from a round's last awaited contribution to the moment its
new base goes out (`sim.des`, `sim.analytic`). The real coordinator (`server.coordinator`)
does, in that window, only what needs the last contribution (docs/BENCHMARKS.md, "Coordinator
cost per round"): the norm and fingerprint of the last upload and the robust aggregation's
passes over every int8 payload (fragments spread over ``workers`` threads), the outer step,
the compressed broadcast and persisting θ (per parameter, once), and, with
``inner.optimizer_state = "published"``, the gradients of the published AdamW moments at the
new θ (``inner.moment_batches`` batches of the target's tokens: model passes, 6·P FLOPs per
token forward and backward, Kaplan et al. 2020, at the coordinator's ``flops``); derived
moments (the default) need no model pass on the coordinator. Usefulness scoring runs as
contributions arrive (or on volunteers, as score orders, above 50M parameters) and the
evaluation after the commit, both off this window, so they are not charged here.

    close_s(K) = (aggregation passes + 1) · K · P · a / workers + P · b + 6 · P · T / flops

with a and b measured on this repository's reference machine (the constants below, from
`bench/results/coordinator-*.json`), K the round's contributions, P the target's parameters
and T the moment batches' tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from crowdtrain.config import RunConfig

#: Seconds per parameter and contribution for one pass of the aggregation over int8 payloads
#: on one thread (decode, bucket mean, distance or update): 1.21 ns measured with 32
#: contributions of 10.7M parameters (`bench/results/coordinator-10m-w1.json`).
AGGREGATE_S_PER_ELEMENT = 1.2e-9
#: Seconds per parameter, once per close: the outer step, encoding the compressed broadcast,
#: the next base's moments (derived: the mean steps) and writing θ, the outer state, the
#: aggregate, moments and residual to disk with fsync: 4.3e-8 measured at 99.7M parameters
#: with 2 threads (0.16 + 1.25 + 0.31 + 2.59 s,
#: `bench/results/session-derived/coordinator-100m-w2.json`); 5.7e-8 before the int8 encode's
#: per-block |x| was sliced (`bench/results/coordinator-100m-w2-persist.json`), 7.4e-8 before
#: the writes were streamed on parallel threads.
THETA_S_PER_PARAM = 4.3e-8
#: FLOP/s of one CPU thread of the reference machine on the model's forward and backward
#: passes: 8.2e10 measured on the moments' gradients (the same file).
CPU_FLOPS_PER_THREAD = 8.2e10


@dataclass(frozen=True)
class CloseCost:
    """The seconds a close takes as a function of the contributions it aggregates."""

    params: int  # the target's parameters
    passes: int  # passes of the aggregation over every payload
    workers: int  # threads the aggregation's fragments are spread over
    moment_flop: float  # FLOPs of the moment gradients per close (0: none published)
    flops: float  # the coordinator's FLOP/s on model passes

    def seconds(self, contributions: int) -> float:
        """Seconds from the last awaited contribution to the new base going out."""
        return sum(self.parts(contributions).values())

    def parts(self, contributions: int) -> dict[str, float]:
        """The seconds of each part of the close."""
        k = max(0, contributions)
        per_pass = k * self.params * AGGREGATE_S_PER_ELEMENT / self.workers
        return {
            "aggregate_s": (self.passes + 1) * per_pass,
            "theta_s": self.params * THETA_S_PER_PARAM,
            "moments_s": self.moment_flop / self.flops,
        }


def close_cost(
    run: RunConfig,
    params: int,
    tokens_per_step: int,
    *,
    workers: int,
    flops: float | None,
) -> CloseCost:
    """The close of RUN on a target of PARAMS parameters whose inner steps read
    TOKENS_PER_STEP tokens, on a coordinator with WORKERS aggregation threads and FLOPS on
    model passes (None: its CPU threads, `CPU_FLOPS_PER_THREAD` each)."""
    if workers < 1:
        raise ValueError(f"the coordinator needs at least one worker, not {workers}")
    rate = CPU_FLOPS_PER_THREAD * workers if flops is None else flops
    if not (rate > 0 and not math.isnan(rate)):
        raise ValueError(f"the coordinator's FLOP/s must be positive, not {rate}")
    agg = run.aggregation
    passes = 2 * agg.clip_iters if agg.method == "centered_clip" else 1
    published = run.inner.optimizer_state == "published"
    moment_flop = 6.0 * params * tokens_per_step * run.inner.moment_batches if published else 0.0
    return CloseCost(params, passes, workers, moment_flop, rate)
