"""The data-parallel references: DDP numerics as one continuous AdamW run on the global batch,
and the datacenter and ddp-wan clocks against hand computations."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from crowdtrain.config import RunConfig
from crowdtrain.data import BatchSampler
from crowdtrain.models import initial_state
from crowdtrain.sim.ddp import (
    DdpCurve,
    datacenter_step_s,
    ddp_inner,
    ddp_wan_times,
    global_batches,
    train_ddp,
)
from crowdtrain.sim.des import Target
from crowdtrain.sim.population import PeerSpec, PopulationConfig, churn_schedule, draw_population
from crowdtrain.sim.swarm import RunData
from crowdtrain.train import LocalTrainer
from crowdtrain_testing import tiny_config

PEERS = 3
EVAL: dict[str, Any] = {"eval_batches": 2, "eval_batch_size": 4}


@pytest.fixture(scope="module")
def cfg(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    data = tmp_path_factory.mktemp("ddp") / "data"
    return tiny_config(
        corpus_file,
        data,
        model={"width": 32, "depth": 1, "heads": 2, "context": 16},
        data={"batch_size": 4},
        # warmup then a cosine that decays within the test's few steps: the schedule matters
        inner={"warmup_steps": 2, "total_steps": 8, "lr": 1e-2},
    )


def train(cfg: RunConfig, **kwargs: Any) -> DdpCurve:
    args: dict[str, Any] = {"max_steps": 6, "eval_every": 2, **EVAL, **kwargs}
    return train_ddp(cfg, PEERS, **args)


# --- numerics --------------------------------------------------------------------------------


def test_chunks_between_evaluations_are_one_continuous_run(cfg: RunConfig) -> None:
    curve = train(cfg)  # three chunks of two steps
    data = RunData.load(cfg, 2, 4)
    ids = data.manifest.train_ids

    def run(keep: bool, chunks: list[int]) -> dict[str, torch.Tensor]:
        inner = ddp_inner(cfg.inner).model_copy(
            update={"optimizer_state": "kept" if keep else "fresh"}
        )
        trainer = LocalTrainer(cfg.model, inner)
        batches = global_batches(cfg, PEERS, data.shards, ids)
        state, done = initial_state(cfg.model), 0
        for n in chunks:
            trainer.train(state, batches, step_offset=done, max_steps=n)
            state, done = trainer.current_state(), done + n
        return state

    continuous = run(True, [6])
    assert curve.final_state.keys() == continuous.keys()
    for name, tensor in continuous.items():
        torch.testing.assert_close(curve.final_state[name], tensor, rtol=1e-5, atol=1e-7)
    # the comparison is sensitive: AdamW restarted at every chunk gives other weights
    fresh = run(False, [2, 2, 2])
    assert any(not torch.allclose(fresh[k], continuous[k], atol=1e-5) for k in continuous)


def test_global_batch_is_every_ranks_batch_concatenated(cfg: RunConfig) -> None:
    data = RunData.load(cfg, 2, 4)
    ids = data.manifest.train_ids
    batches = global_batches(cfg, PEERS, data.shards, ids)
    first, second = next(batches), next(batches)
    bs, ctx = cfg.data.batch_size, cfg.model.context
    for x, y in (first, second):
        assert x.shape == y.shape == (PEERS * bs, ctx)
        assert torch.equal(x[:, 1:], y[:, :-1])
    for r in range(PEERS):
        rank = BatchSampler(
            data.shards, ids, seed=cfg.seed, round=0, peer=f"ddp-rank-{r}",
            batch_size=bs, context=ctx,
        )  # fmt: skip
        assert torch.equal(first[0][r * bs : (r + 1) * bs], rank.batch(0)[0])
        assert torch.equal(second[0][r * bs : (r + 1) * bs], rank.batch(1)[0])
    assert not torch.equal(first[0][:bs], first[0][bs : 2 * bs])  # the ranks see other data


def test_evaluates_at_zero_every_n_steps_and_at_the_end(cfg: RunConfig) -> None:
    seen: list[tuple[int, float]] = []
    curve = train(cfg, max_steps=5, eval_every=2, on_eval=lambda s, loss: seen.append((s, loss)))
    assert curve.steps == [0, 2, 4, 5]
    assert seen == list(zip(curve.steps, curve.eval_loss, strict=True))
    assert curve.global_batch == PEERS * cfg.data.batch_size
    assert curve.lr == cfg.inner.lr
    assert curve.eval_loss[-1] < curve.eval_loss[0]  # it trained
    doc = json.loads(json.dumps(curve.to_json()))
    assert doc == {
        "steps": [0, 2, 4, 5],
        "eval_loss": curve.eval_loss,
        "global_batch": PEERS * cfg.data.batch_size,
        "lr": cfg.inner.lr,
    }


def test_stop_below_stops_after_the_first_evaluation_at_or_below_it(cfg: RunConfig) -> None:
    full = train(cfg)
    assert full.steps == [0, 2, 4, 6]
    stopped = train(cfg, stop_below=full.eval_loss[1])  # reached exactly at step 2
    assert stopped.steps == [0, 2]
    assert stopped.eval_loss == full.eval_loss[:2]
    assert train(cfg, stop_below=1e9).steps == [0]  # already below at step 0


def test_lr_overrides_the_peak_learning_rate_only(cfg: RunConfig) -> None:
    inner = ddp_inner(cfg.inner, 0.02)
    assert inner.lr == 0.02 and inner.keep_optimizer_state
    assert inner.model_copy(update={"lr": cfg.inner.lr}) == ddp_inner(cfg.inner)
    assert ddp_inner(cfg.inner).lr == cfg.inner.lr
    other = train(cfg, max_steps=2, lr=0.02)
    assert other.lr == 0.02
    assert other.eval_loss[-1] != train(cfg, max_steps=2).eval_loss[-1]
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="learning rate must be a positive number"):
            ddp_inner(cfg.inner, bad)


@pytest.mark.parametrize("key", ["max_steps", "eval_every", "eval_batches", "eval_batch_size"])
def test_bad_training_arguments_are_refused(cfg: RunConfig, key: str) -> None:
    with pytest.raises(ValueError, match=f"{key} must be a positive whole number"):
        train(cfg, **{key: 0})
    with pytest.raises(ValueError, match="peers must be a positive whole number"):
        train_ddp(cfg, 0, max_steps=1, eval_every=1, eval_batches=1, eval_batch_size=1)


# --- clocks ----------------------------------------------------------------------------------

# Three peers. Effective speed (flops × mfu), link min(up, down) and round trip:
#   a: 1e12 FLOP/s, 10 Mbit/s, 50 ms   b: 2e12, 20 Mbit/s, 100 ms   c: 4e12, 40 Mbit/s, 20 ms
A = PeerSpec("a", flops=2e12, mfu=0.5, up_bps=10e6, down_bps=100e6, rtt_s=0.05)
B = PeerSpec("b", flops=4e12, mfu=0.5, up_bps=50e6, down_bps=20e6, rtt_s=0.1)
C = PeerSpec("c", flops=8e12, mfu=0.5, up_bps=40e6, down_bps=40e6, rtt_s=0.02)
# P = 1e6 parameters: an all-reduce of 2 bytes each is 16e6 bits.
COMPUTE = Target(params=1_000_000, tokens_per_step=1_000_000, bytes_per_param_up=1.0,
                 bytes_per_param_down=4.0)  # 6e12 FLOPs a step  # fmt: skip
COMMS = Target(params=1_000_000, tokens_per_step=1_000, bytes_per_param_up=1.0,
               bytes_per_param_down=4.0)  # 6e9 FLOPs a step  # fmt: skip
K2 = Target(params=1_000_000, tokens_per_step=1_000_000, bytes_per_param_up=1.0,
            bytes_per_param_down=4.0, steps_per_proxy_step=2.0)  # COMPUTE, k = 2  # fmt: skip


def test_datacenter_step_is_k_target_steps_at_the_mean_effective_speed() -> None:
    # mean(1e12, 2e12, 4e12) = 7e12 / 3; k = 2 target steps of 6e12 FLOPs
    assert datacenter_step_s([A, B, C], K2) == pytest.approx(2 * 6e12 / (7e12 / 3))
    assert datacenter_step_s([A], COMPUTE) == pytest.approx(6.0)


def test_one_peer_has_no_allreduce() -> None:
    # 6e12 FLOPs at 1e12 FLOP/s, twice per proxy step; even a 1 bit/s link costs nothing
    slow_link = PeerSpec("a", flops=2e12, mfu=0.5, up_bps=1.0, down_bps=1.0, rtt_s=10.0)
    assert ddp_wan_times([slow_link], K2, [0, 1, 2, 5]) == pytest.approx([0, 12, 24, 60])


def test_the_slowest_peer_paces_every_step() -> None:
    # compute: the global batch of 3 × 1e6 tokens over 3 ranks; each step waits for a (1e12):
    # 6e12 / 1e12 = 6 s. Ring: 2·2/3 · 16e6 / 10e6 + 2·2 · 0.1 / 2 = 2.1333 + 0.2 s < 6 s.
    assert ddp_wan_times([A, B, C], COMPUTE, [0, 1, 2, 5]) == pytest.approx([0, 6, 12, 30])
    assert ddp_wan_times([A, B, C], K2, [0, 1, 2, 5]) == pytest.approx([0, 12, 24, 60])
    assert datacenter_step_s([A, B, C], COMPUTE) == pytest.approx(6e12 / (7e12 / 3))


def test_the_ring_allreduce_on_the_narrowest_link_and_longest_hop() -> None:
    # compute 6e9 / 1e12 = 0.006 s; ring 2·2/3 · 16e6 / 10e6 + 2·2 · 0.1 / 2 = 2.1333 + 0.2
    step = 4 / 3 * 1.6 + 0.2
    assert ddp_wan_times([A, B, C], COMMS, [0, 3]) == pytest.approx([0, 3 * step])
    # two peers: 2·1/2 · 16e6 / 20e6 + 2·1 · 0.1 / 2 = 0.8 + 0.1
    assert ddp_wan_times([B, C], COMMS, [1]) == pytest.approx([0.9])
    # half the bytes per parameter halves the bandwidth term
    half = ddp_wan_times([B, C], COMMS, [1], allreduce_bytes_per_param=1.0)
    assert half == pytest.approx([0.4 + 0.1])


def test_a_peer_offline_reduces_the_ranks_from_the_next_step() -> None:
    # a is online [0, 12) and from 20. Steps 1, 2 (start 0, 6): 6 s each, as above. Step 3
    # starts at 12 exactly, a is away: b and c split the 3e6 tokens, b paces:
    # 6e12 · 3/2 / 2e12 = 4.5 s (ring 0.8 + 0.1). Step 4 starts at 16.5 < 20: 4.5 s again.
    # Step 5 starts at 21, a is back: 6 s.
    online = {"a": [(0.0, 12.0), (20.0, math.inf)]}
    times = ddp_wan_times([A, B, C], COMPUTE, [0, 1, 2, 3, 4, 5], online=online)
    assert times == pytest.approx([0, 6, 12, 16.5, 21, 27])


@pytest.mark.parametrize(
    ("away", "second"),
    [
        # b (the longest round trip) away: a, c: 2·1/2 · 16e6 / 10e6 + 2·1 · 0.05 / 2
        ("b", 1.6 + 0.05),
        # a (the narrowest link) away: b, c: 2·1/2 · 16e6 / 20e6 + 2·1 · 0.1 / 2
        ("a", 0.8 + 0.1),
    ],
)
def test_the_ring_uses_the_links_of_the_peers_online(away: str, second: float) -> None:
    first = 4 / 3 * 1.6 + 0.2  # all three
    online = {away: [(0.0, 1.0)]}
    times = ddp_wan_times([A, B, C], COMMS, [1, 2], online=online)
    assert times == pytest.approx([first, first + second])


def test_with_nobody_online_the_run_waits_for_someone() -> None:
    # a alone: online [0, 5) and from 100. Step 1 starts at 0 and takes 6 s (membership
    # changes cost nothing); step 2 would start at 6, but nobody is online until 100.
    online = {"a": [(0.0, 5.0), (100.0, math.inf)]}
    assert ddp_wan_times([A], COMPUTE, [0, 1, 2], online=online) == pytest.approx([0, 6, 106])
    late = {"a": [(50.0, math.inf)]}
    assert ddp_wan_times([A], COMPUTE, [0, 1], online=late) == pytest.approx([0, 56])
    gone = {"a": [(0.0, 5.0)]}
    assert ddp_wan_times([A], COMPUTE, [1], online=gone) == pytest.approx([6])
    with pytest.raises(ValueError, match=r"nobody is online from 6\.0 s on, so proxy step 2"):
        ddp_wan_times([A], COMPUTE, [1, 2], online=gone)


def test_times_grow_with_steps_and_do_not_depend_on_which_steps_are_asked() -> None:
    pop_cfg = PopulationConfig(peers=200, session_s=3600.0, offline_s=1800.0)
    population = draw_population(pop_cfg, seed=1)
    online = churn_schedule(pop_cfg, population, 1e6, seed=1)
    target = Target(params=10_000_000, tokens_per_step=100_000, bytes_per_param_up=1.0,
                    bytes_per_param_down=4.0, steps_per_proxy_step=3.0)  # fmt: skip
    steps = list(range(0, 301))
    times = ddp_wan_times(population, target, steps, online=online)
    assert times[0] == 0.0
    assert all(b > a for a, b in itertools.pairwise(times))
    some = [0, 7, 7, 150, 300]
    assert ddp_wan_times(population, target, some, online=online) == [times[s] for s in some]
    # without churn every step costs the same
    steady = ddp_wan_times(population, target, steps)
    assert steady == pytest.approx([s * steady[1] for s in steps])


def test_bad_clock_input_is_refused_in_one_sentence() -> None:
    with pytest.raises(ValueError, match="needs at least one peer"):
        ddp_wan_times([], COMPUTE, [0, 1])
    with pytest.raises(ValueError, match="needs at least one peer"):
        datacenter_step_s([], COMPUTE)
    with pytest.raises(ValueError, match="non-negative whole numbers, not -1"):
        ddp_wan_times([A], COMPUTE, [0, -1])
    with pytest.raises(ValueError, match=r"non-negative whole numbers, not 1\.5"):
        ddp_wan_times([A], COMPUTE, [1.5])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="ascending order, but 1 follows 2"):
        ddp_wan_times([A], COMPUTE, [0, 2, 1])
    with pytest.raises(ValueError, match="allreduce_bytes_per_param must be a positive number"):
        ddp_wan_times([A], COMPUTE, [1], allreduce_bytes_per_param=0.0)
    with pytest.raises(ValueError, match="peer ids in the population must be unique"):
        ddp_wan_times([A, A], COMPUTE, [1])
    with pytest.raises(ValueError, match=r"names peers not in the population: \['z'\]"):
        ddp_wan_times([A], COMPUTE, [1], online={"z": [(0.0, 1.0)]})
    for intervals in (
        [(5.0, 5.0)],
        [(-1.0, 2.0)],
        [(0.0, 3.0), (2.0, 4.0)],
        [(4.0, 6.0), (0.0, 1.0)],
    ):
        with pytest.raises(ValueError, match="peer a's online intervals must be non-empty"):
            ddp_wan_times([A, B], COMPUTE, [1], online={"a": intervals})
    assert ddp_wan_times([A], COMPUTE, []) == []
