"""The simulator's coordinator cost model: what a close charges, by contributions and size."""

from __future__ import annotations

import pytest

from crowdtrain.config import parse_config
from crowdtrain.sim.coordinator_cost import (
    AGGREGATE_S_PER_ELEMENT,
    CPU_FLOPS_PER_THREAD,
    THETA_S_PER_PARAM,
    close_cost,
)
from crowdtrain.sim.scenario import CoordinatorConfig


def test_the_close_grows_with_contributions_and_shrinks_with_workers() -> None:
    # Centered clipping, one iteration: 2 passes + the last's norm; published moments' passes.
    run = parse_config({"inner": {"optimizer_state": "published"}})
    one = close_cost(run, 10**9, 32768, workers=1, flops=66e12)
    two = close_cost(run, 10**9, 32768, workers=2, flops=66e12)
    assert one.seconds(8) > one.seconds(4) > one.seconds(0)
    per_contribution = one.seconds(5) - one.seconds(4)
    assert per_contribution == pytest.approx(3 * 10**9 * AGGREGATE_S_PER_ELEMENT)
    assert two.seconds(5) - two.seconds(4) == pytest.approx(per_contribution / 2)
    moments = 6.0 * 10**9 * 32768 * run.inner.moment_batches / 66e12
    assert one.seconds(0) == pytest.approx(10**9 * THETA_S_PER_PARAM + moments)
    assert sum(one.parts(8).values()) == pytest.approx(one.seconds(8))


def test_no_published_moments_no_model_passes_and_the_cpu_by_default() -> None:
    derived = close_cost(parse_config({}), 10**9, 32768, workers=1, flops=66e12)
    assert derived.moment_flop == 0  # the default: volunteers derive the second moments
    fresh = parse_config({"inner": {"optimizer_state": "fresh"}, "aggregation": {"method": "mean"}})
    cost = close_cost(fresh, 10**6, 1000, workers=4, flops=None)
    assert cost.moment_flop == 0 and cost.passes == 1
    assert cost.flops == 4 * CPU_FLOPS_PER_THREAD
    with pytest.raises(ValueError, match="worker"):
        close_cost(fresh, 10**6, 1000, workers=0, flops=None)


def test_a_fixed_close_overrides_the_model() -> None:
    from crowdtrain.sim.des import Target

    target = Target(10**9, 32768, bytes_per_param_up=1.06, bytes_per_param_down=4.0)
    run = parse_config({})
    assert CoordinatorConfig(close_s=12.5).close(run, target)(100) == 12.5
    modelled = CoordinatorConfig(workers=3, flops=1e14).close(run, target)
    assert modelled(10) == close_cost(run, 10**9, 32768, workers=3, flops=1e14).seconds(10)
