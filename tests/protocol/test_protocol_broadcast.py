"""The compressed weight broadcast: θ_{r+1} is exactly what a volunteer reconstructs, and what
compression drops comes back in later updates."""

from __future__ import annotations

from pathlib import Path

import torch

from crowdtrain.codec import max_payload_bytes
from crowdtrain.config import BroadcastConfig
from crowdtrain.protocol.broadcast import Broadcast, apply_update
from crowdtrain.sim.swarm import run_swarm
from crowdtrain_testing import tiny_config

SHAPES = {"w": (256, 192), "b": (192,)}


def state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g) for k, s in SHAPES.items()}


def test_fp32_leaves_the_outer_step_as_it_is() -> None:
    b = Broadcast(BroadcastConfig(codec="fp32"), SHAPES)
    before, params = state(0), state(1)
    exact = {k: t.clone() for k, t in params.items()}
    b.publish(before, params)
    assert b.update is None and b.residual == {}
    assert all(torch.equal(params[k], exact[k]) for k in SHAPES)


def test_int8_defines_theta_as_the_reconstruction_and_keeps_the_rest() -> None:
    b = Broadcast(BroadcastConfig(codec="int8"), SHAPES)
    theta = state(0)
    exact = {k: t.clone() for k, t in theta.items()}  # the sum of every outer step, unrounded
    for r in range(5):
        before = {k: t.clone() for k, t in theta.items()}
        step = state(10 + r, scale=1e-2)
        for k in SHAPES:
            theta[k] += step[k]
            exact[k] += step[k]
        b.publish(before, theta)
        assert b.update is not None
        assert len(b.update) <= max_payload_bytes(SHAPES, BroadcastConfig(codec="int8").spec())
        assert len(b.update) < 0.3 * 4 * sum(t.numel() for t in theta.values())  # ≈ 1 B/param
        rebuilt = apply_update(before, b.update, SHAPES)  # what a volunteer holding θ_r computes
        assert all(torch.equal(rebuilt[k], theta[k]) for k in SHAPES)  # the same bits
        assert any(not torch.equal(theta[k], exact[k]) for k in SHAPES)  # it was compressed
        for k in SHAPES:  # nothing is lost: θ + residual is the exact sum of the steps
            torch.testing.assert_close(theta[k] + b.residual[k], exact[k], rtol=0, atol=1e-5)
            assert float((theta[k] - exact[k]).abs().max()) < 1e-3  # within int8's error


def test_an_update_that_cannot_be_encoded_sends_theta_whole() -> None:
    b = Broadcast(BroadcastConfig(codec="int8"), SHAPES)
    before, params = state(0), state(1)
    b.publish(before, params)
    assert b.update is not None and b.residual
    params["w"][0, 0] = float("nan")  # a diverged outer step
    b.publish(before, params)
    assert b.update is None and b.residual == {}
    assert torch.isnan(params["w"][0, 0])


def test_a_swarm_with_an_int8_broadcast_trains_and_its_replays_pass(
    corpus_file: Path, tmp_path: Path
) -> None:
    """Volunteers train from the reconstructed θ and verifiers replay from it: every
    spot-check of an honest peer passes (they would fail if any party's θ differed)."""
    cfg = tiny_config(
        corpus_file,
        tmp_path / "data",
        rounds={"total": 4, "quorum": 1},
        broadcast={"codec": "int8"},
        defence={"check_p_new": 1.0, "check_p_min": 1.0},
    )
    res = run_swarm(cfg, 3, eval_batch_count=4, eval_batch_size=8)
    assert res.final_eval_loss < res.rounds[0].eval_loss
    outcomes = [v["outcome"] for v in res.verdicts if v["stage"] == "spot_check"]
    assert "check_passed" in outcomes and "check_failed" not in outcomes
    assert not res.banned and not res.flagged
