"""Recomputation spot-checks: comparing a submission with its replay, and the check rate."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from crowdtrain.codec import decode, encode
from crowdtrain.config import CodecConfig, RunConfig
from crowdtrain.data import BatchSampler, ShardStore, assign_shards, ensure_packed_for
from crowdtrain.models import initial_state
from crowdtrain.robust import DictSource
from crowdtrain.robust.spotcheck import Comparison, check_probability, compare, mismatch
from crowdtrain.train import LocalTrainer
from crowdtrain_testing import tiny_config

Delta = dict[str, torch.Tensor]
Shapes = dict[str, tuple[int, ...]]
TOLERANCE = RunConfig().defence.check_tolerance  # 0.05


@dataclass
class Setup:
    cfg: RunConfig
    base: Delta
    shapes: Shapes
    honest: Delta  # Δ of peer "alice" for her work order
    submitted: Delta  # the same Δ after the int8 wire codec
    replay: Delta  # a verifier's replay of alice's work order from the same base
    other: Delta  # Δ trained on different data (peer "bob")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = tiny_config(corpus_file, tmp_path_factory.mktemp("spotcheck") / "data")
    manifest = ensure_packed_for(cfg.data)
    shards = ShardStore(cfg.data.dir).load_many(s.sha256 for s in manifest.shards)

    def work(peer: str) -> Delta:
        """Run a peer's work order from the initial weights with a fresh trainer."""
        ids = assign_shards(
            manifest.train_ids, seed=0, round=0, peer=peer, k=cfg.data.shards_per_peer
        )
        sampler = BatchSampler(
            shards,
            ids,
            seed=0,
            round=0,
            peer=peer,
            batch_size=cfg.data.batch_size,
            context=cfg.model.context,
        )
        trainer = LocalTrainer(cfg.model, cfg.inner)
        return trainer.train(initial_state(cfg.model), iter(sampler)).delta

    base = initial_state(cfg.model)
    honest = work("alice")
    shapes = {name: tuple(t.shape) for name, t in honest.items()}
    submitted = decode(encode(honest, CodecConfig(name="int8")), shapes)
    replay, other = work("alice"), work("bob")
    torch.set_num_threads(before)
    return Setup(cfg, base, shapes, honest, submitted, replay, other)


def _compare(submitted: Mapping[str, torch.Tensor], replay: Delta, shapes: Shapes) -> Comparison:
    return compare(DictSource(submitted), DictSource(replay), shapes, fragment_numel=4096)


def test_identical_sources_compare_exactly(setup: Setup) -> None:
    c = _compare(setup.honest, setup.honest, setup.shapes)
    assert c == Comparison(rel_error=0.0, cosine=1.0, norm_ratio=1.0)
    assert mismatch(c, tolerance=TOLERANCE) is None


def test_int8_round_trip_stays_well_under_the_tolerance(setup: Setup) -> None:
    c = _compare(setup.submitted, setup.honest, setup.shapes)
    assert 0 < c.rel_error < TOLERANCE / 5  # measured: about 0.0035
    assert c.cosine > 0.9999
    assert c.norm_ratio == pytest.approx(1.0, abs=1e-3)


def test_an_honest_replay_matches_the_codec_decoded_submission(setup: Setup) -> None:
    assert _compare(setup.honest, setup.replay, setup.shapes).rel_error == 0.0  # bit for bit
    c = _compare(setup.submitted, setup.replay, setup.shapes)
    assert mismatch(c, tolerance=TOLERANCE) is None


def test_dishonest_submissions_fail(setup: Setup) -> None:
    honest, replay, shapes = setup.honest, setup.replay, setup.shapes
    norm = math.sqrt(sum(float(t.square().sum()) for t in honest.values()))
    gen = torch.Generator().manual_seed(0)
    noise = {k: torch.randn(v.shape, generator=gen) for k, v in honest.items()}
    noise_norm = math.sqrt(sum(float(t.square().sum()) for t in noise.values()))
    noise = {k: v * (norm / noise_norm) for k, v in noise.items()}  # same norm as Δ
    cases = {
        "sign flip": {k: -v for k, v in honest.items()},
        "scaled x100": {k: 100 * v for k, v in honest.items()},
        "random noise": noise,
        "different data": setup.other,
    }
    for label, submitted in cases.items():
        c = _compare(submitted, replay, shapes)
        reason = mismatch(c, tolerance=TOLERANCE)
        assert reason is not None, label
        assert reason.startswith("the replay differs from the submitted update by"), label
    assert _compare(cases["sign flip"], replay, shapes).cosine == pytest.approx(-1.0)
    assert _compare(cases["scaled x100"], replay, shapes).norm_ratio == pytest.approx(100.0)


def test_zero_norms_are_handled_without_dividing_by_zero() -> None:
    shapes: Shapes = {"w": (3, 4)}
    zero = {"w": torch.zeros(3, 4)}
    ones = {"w": torch.ones(3, 4)}
    assert _compare(zero, zero, shapes) == Comparison(0.0, 1.0, 1.0)
    assert _compare(ones, zero, shapes) == Comparison(math.inf, 0.0, math.inf)
    assert _compare(zero, ones, shapes) == Comparison(1.0, 0.0, 0.0)
    reason = mismatch(_compare(ones, zero, shapes), tolerance=TOLERANCE)
    assert reason is not None and reason.startswith("the submitted update cannot be matched")
    assert mismatch(_compare(zero, ones, shapes), tolerance=TOLERANCE) is not None


def test_mismatch_sentence_and_tolerance() -> None:
    c = Comparison(rel_error=0.732, cosine=0.5, norm_ratio=1.0)
    assert mismatch(c, tolerance=0.05) == (
        "the replay differs from the submitted update by 73.2% (tolerance 5%)"
    )
    assert mismatch(Comparison(0.05, 1.0, 1.0), tolerance=0.05) is None
    assert mismatch(Comparison(math.nan, math.nan, math.nan), tolerance=0.05) is not None
    with pytest.raises(ValueError, match="tolerance"):
        mismatch(c, tolerance=0.0)


def test_sources_that_do_not_match_the_shapes_are_refused() -> None:
    shapes: Shapes = {"w": (3, 4), "b": (4,)}
    good = {"w": torch.ones(3, 4), "b": torch.ones(4)}
    with pytest.raises(ValueError, match="the submitted update does not match the model"):
        _compare({"w": torch.ones(3, 4)}, good, shapes)
    with pytest.raises(ValueError, match="the replayed update has non-finite values"):
        _compare(good, {"w": torch.ones(3, 4), "b": torch.tensor([1.0, math.inf, 0, 0])}, shapes)


class _Counting(DictSource):
    """A DictSource that remembers the largest range it was asked for."""

    largest = 0

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        self.largest = max(self.largest, stop - start)
        return super().read(name, start, stop)


def test_sources_are_read_one_fragment_at_a_time() -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(100, 30, generator=gen), "b": torch.randn(777, generator=gen)}
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    s, r = _Counting(tensors), _Counting({k: v + 0.01 for k, v in tensors.items()})
    compare(s, r, shapes, fragment_numel=64)
    assert 0 < s.largest <= 64 and 0 < r.largest <= 64


_shape = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@given(
    shapes=st.lists(_shape, min_size=1, max_size=4),
    fragment_numel=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.0, 1e-3, 1.0, 1e6]),
)
def test_fragment_wise_result_equals_whole_tensor_computation(
    shapes: list[tuple[int, ...]], fragment_numel: int, seed: int, scale: float
) -> None:
    named = {f"p{i}": shape for i, shape in enumerate(shapes)}
    gen = torch.Generator().manual_seed(seed)
    sub = {k: torch.randn(shape, generator=gen) for k, shape in named.items()}
    rep = {k: scale * torch.randn(shape, generator=gen) for k, shape in named.items()}
    got = compare(DictSource(sub), DictSource(rep), named, fragment_numel=fragment_numel)
    s = torch.cat([t.reshape(-1) for t in sub.values()]).double()
    r = torch.cat([t.reshape(-1) for t in rep.values()]).double()
    s_norm, r_norm = float(s.norm()), float(r.norm())
    if r_norm == 0.0:
        want = Comparison(0.0, 1.0, 1.0) if s_norm == 0.0 else Comparison(math.inf, 0.0, math.inf)
        assert got == want
    elif s_norm == 0.0:
        assert (got.rel_error, got.cosine, got.norm_ratio) == (1.0, 0.0, 0.0)
    else:
        assert got.rel_error == pytest.approx(float((s - r).norm()) / r_norm, rel=1e-9)
        assert got.norm_ratio == pytest.approx(s_norm / r_norm, rel=1e-9)
        cosine = float(torch.dot(s, r)) / (s_norm * r_norm)
        assert got.cosine == pytest.approx(cosine, rel=1e-9, abs=1e-12)


def test_check_probability_halves_per_passed_check_down_to_the_floor() -> None:
    seq = [check_probability(n, p_new=0.25, p_min=0.02) for n in range(7)]
    assert seq == [0.25, 0.125, 0.0625, 0.03125, 0.02, 0.02, 0.02]
    assert check_probability(10**9, p_new=0.25, p_min=0.02) == 0.02
    assert check_probability(3, p_new=1.0, p_min=0.0) == 0.125
    with pytest.raises(ValueError, match="passed_checks"):
        check_probability(-1, p_new=0.25, p_min=0.02)
    with pytest.raises(ValueError, match="p_new"):
        check_probability(0, p_new=1.5, p_min=0.02)
