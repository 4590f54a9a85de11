"""The attack suite: every attack's formula, determinism, poisoning, and forged payloads."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from statistics import NormalDist

import pytest
import safetensors.torch
import torch

from crowdtrain import codec
from crowdtrain.adversary import (
    ATTACKS,
    NOISE_RATIO,
    Attacker,
    Claim,
    Forgery,
    RoundView,
    alie_z,
    encode_forgery,
    target_permutation,
)
from crowdtrain.codec.registry import get_codec
from crowdtrain.config import CodecConfig
from crowdtrain.models import initial_state
from crowdtrain.train import LocalTrainer
from crowdtrain_testing import tiny_config

Delta = dict[str, torch.Tensor]
CLAIM = Claim(samples=32, tokens=1024, steps=4, train_loss=2.5)
SHAPES = {"b": (6,), "h": (5,), "w": (4, 6)}
CODECS = [
    CodecConfig(name=name, block_size=8, chunk_size=16, topk=4) for name in codec.codec_names()
]


def make_delta(seed: int, dtypes: dict[str, torch.dtype] | None = None) -> Delta:
    gen = torch.Generator().manual_seed(seed)
    dtypes = dtypes or {}
    return {
        name: torch.randn(shape, generator=gen).to(dtypes.get(name, torch.float32))
        for name, shape in SHAPES.items()
    }


def make_view(round: int = 0, peers: int = 10, attackers: int = 2, others: int = 2) -> RoundView:
    honest = [make_delta(100 + i) for i in range(peers - attackers)]
    return RoundView(round, peers, attackers, honest=honest, others=honest[:others])


def norm(delta: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in delta.values()))


def flat(delta: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([delta[k].double().reshape(-1) for k in sorted(delta)])


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def forge(name: str, honest: Delta, view: RoundView, seed: int = 0) -> Forgery:
    return Attacker(name, "peer-7", seed).forge(honest, CLAIM, view)


@pytest.mark.parametrize("name", ATTACKS)
def test_every_attack_keeps_names_shapes_dtypes_and_inputs(name: str) -> None:
    honest = make_delta(1, {"h": torch.bfloat16})
    before = {k: t.clone() for k, t in honest.items()}
    seen = [make_delta(100 + i, {"h": torch.bfloat16}) for i in range(8)]
    view = RoundView(0, 10, 2, honest=seen, others=seen[:1])
    out = forge(name, honest, view).delta
    assert out.keys() == honest.keys()
    for k, t in out.items():
        assert t.shape == honest[k].shape and t.dtype == honest[k].dtype
        out[k].add_(1)  # the forgery shares no memory with its inputs
    assert equal(honest, before)
    for d in view.honest:
        assert all(torch.isfinite(t).all() for t in d.values())


def test_sign_flip_and_scaling_are_exact() -> None:
    honest, view = make_delta(1), make_view()
    assert equal(forge("sign_flip", honest, view).delta, {k: -t for k, t in honest.items()})
    assert equal(forge("scale100", honest, view).delta, {k: t * 100 for k, t in honest.items()})
    assert equal(forge("scale1000", honest, view).delta, {k: t * 1000 for k, t in honest.items()})


@pytest.mark.parametrize(("name", "eps"), [("ipm0.1", 0.1), ("ipm100", 100.0)])
def test_ipm_is_minus_epsilon_times_the_honest_mean(name: str, eps: float) -> None:
    honest, view = make_delta(1), make_view()
    assert Attacker(name, "p", 0).needs_honest
    out = forge(name, honest, view).delta
    for k in honest:
        mean = torch.stack([d[k] for d in view.honest]).mean(dim=0)
        torch.testing.assert_close(out[k], -eps * mean)
    # Without honest deltas to look at, the attacker's own Δ stands in for their mean.
    alone = forge(name, honest, RoundView(0, 10, 2)).delta
    assert equal(alone, {k: -eps * t for k, t in honest.items()})


def test_alie_z_matches_the_paper_formula() -> None:
    # n = 10, m = 2: s = floor(10/2 + 1) - 2 = 4, z = Φ⁻¹((10 - 4)/10) = Φ⁻¹(0.6)
    assert alie_z(10, 2) == pytest.approx(NormalDist().inv_cdf(0.6))
    assert alie_z(10, 2) == pytest.approx(0.2533471031357997)
    # n = 5, m = 2: s = floor(5/2 + 1) - 2 = 1, z = Φ⁻¹((5 - 1)/5) = Φ⁻¹(0.8)
    assert alie_z(5, 2) == pytest.approx(NormalDist().inv_cdf(0.8))
    assert alie_z(5, 2) == pytest.approx(0.8416212335729143)
    assert math.isfinite(alie_z(4, 3))  # s clamped to 1 beyond the paper's m < n/2
    with pytest.raises(ValueError, match="at least 2 peers"):
        alie_z(1, 0)


@pytest.mark.parametrize(("peers", "attackers"), [(10, 2), (5, 2)])
def test_alie_is_mean_minus_z_sigma_and_shared_by_the_coalition(peers: int, attackers: int) -> None:
    view = make_view(peers=peers, attackers=attackers)
    z = NormalDist().inv_cdf((peers - (peers // 2 + 1 - attackers)) / peers)
    a = Attacker("alie", "peer-a", 1).forge(make_delta(1), CLAIM, view).delta
    b = Attacker("alie", "peer-b", 2).forge(make_delta(2), CLAIM, view).delta
    assert equal(a, b)
    for k in a:
        stacked = torch.stack([d[k] for d in view.honest])
        torch.testing.assert_close(a[k], stacked.mean(dim=0) - z * stacked.std(dim=0))


def test_alie_falls_back_to_its_own_delta_with_fewer_than_two_honest() -> None:
    honest = make_delta(1)
    view = RoundView(0, 3, 2, honest=[make_delta(9)])
    assert equal(forge("alie", honest, view).delta, honest)


def test_noise_has_ten_times_the_honest_norm_and_is_seeded_per_round() -> None:
    honest = make_delta(1)
    r0 = forge("noise", honest, make_view(round=0)).delta
    r1 = forge("noise", honest, make_view(round=1)).delta
    assert norm(r0) == pytest.approx(NOISE_RATIO * norm(honest), rel=1e-5)
    assert norm(r1) == pytest.approx(NOISE_RATIO * norm(honest), rel=1e-5)
    assert not equal(r0, r1)
    cosine = float(flat(r0) @ flat(honest)) / (norm(r0) * norm(honest))
    assert abs(cosine) < 0.5  # pure noise, not a multiple of Δ
    zeros = {k: torch.zeros_like(t) for k, t in honest.items()}
    assert norm(forge("noise", zeros, make_view()).delta) == 0.0


def test_free_rider_sends_zeros_or_tiny_noise_and_claims_the_full_budget() -> None:
    attacker = Attacker("free_rider", "p", 0)
    assert not attacker.trains
    honest = make_delta(1)
    even = attacker.forge(honest, CLAIM, make_view(round=2))
    odd = attacker.forge(honest, CLAIM, make_view(round=3))
    assert even.claim == CLAIM and odd.claim == CLAIM
    assert all(not t.any() for t in even.delta.values())
    values = flat(odd.delta)
    assert values.abs().max() < 1e-5 and values.abs().max() > 0
    assert float(values.std()) == pytest.approx(1e-6, rel=0.5)


def test_copycat_resubmits_a_disguised_copy_of_the_last_submission() -> None:
    honest, view = make_delta(1), make_view(others=3)
    attacker = Attacker("copycat", "p", 0)
    assert attacker.needs_others and not attacker.needs_honest
    out = attacker.forge(honest, CLAIM, view).delta
    victim = view.others[-1]
    cosine = float(flat(out) @ flat(victim)) / (norm(out) * norm(victim))
    assert cosine > 0.99
    assert not equal(out, dict(victim))
    assert 0.89 <= norm(out) / norm(victim) <= 1.11
    assert equal(attacker.forge(honest, CLAIM, RoundView(0, 10, 2)).delta, honest)


def test_stale_resubmits_its_first_delta_with_the_current_claim() -> None:
    attacker = Attacker("stale", "p", 0)
    first = make_delta(1)
    assert equal(attacker.forge(first, CLAIM, make_view(round=0)).delta, first)
    later_claim = Claim(samples=8, tokens=256, steps=1, train_loss=1.0)
    for r in (1, 2, 5):
        forgery = attacker.forge(make_delta(10 + r), later_claim, make_view(round=r))
        assert equal(forgery.delta, first)
        assert forgery.claim == later_claim


def test_nan_poisons_one_value_in_two_tensors_or_two_in_one() -> None:
    honest = make_delta(1)
    out = forge("nan", honest, make_view()).delta
    assert math.isnan(float(out["b"][0])) and float(out["h"][0]) == math.inf
    assert equal({k: out[k] for k in ("w",)}, {"w": honest["w"]})
    assert int(sum((~torch.isfinite(t)).sum() for t in out.values())) == 2
    single = forge("nan", {"w": honest["w"]}, make_view()).delta["w"].reshape(-1)
    assert math.isnan(float(single[0])) and float(single[1]) == math.inf
    assert torch.equal(single[2:], honest["w"].reshape(-1)[2:])


def test_inflate_multiplies_samples_and_tokens_only() -> None:
    honest = make_delta(1)
    forgery = forge("inflate", honest, make_view())
    assert equal(forgery.delta, honest)
    assert forgery.claim == Claim(samples=3200, tokens=102400, steps=4, train_loss=2.5)


@pytest.mark.parametrize("name", ATTACKS)
def test_same_seed_gives_the_same_forgeries(name: str) -> None:
    def run(seed: int) -> list[Forgery]:
        attacker = Attacker(name, "peer-3", seed)
        return [attacker.forge(make_delta(r), CLAIM, make_view(round=r)) for r in range(3)]

    a, b = run(5), run(5)
    for x, y in zip(a, b, strict=True):
        assert x.claim == y.claim
        assert x.delta.keys() == y.delta.keys()
        for k in x.delta:
            torch.testing.assert_close(x.delta[k], y.delta[k], rtol=0, atol=0, equal_nan=True)
    if name in ("noise", "copycat", "free_rider"):
        c = run(6)
        assert not equal(a[1].delta, c[1].delta)


def batches(n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    for _ in range(n):
        data = torch.randint(0, 50, (2, 9), generator=gen)
        yield data[:, :-1], data[:, 1:]


def test_poison_maps_targets_through_a_fixed_permutation_and_keeps_inputs() -> None:
    perm = target_permutation(3, 50)
    assert torch.equal(perm.sort().values, torch.arange(50))  # a permutation
    assert not (perm == torch.arange(50)).any()  # that changes every target
    assert torch.equal(target_permutation(3, 50), perm)
    assert not torch.equal(target_permutation(4, 50), perm)
    poisoned = list(Attacker("poison", "p", 3).poison(batches(3), 50))
    for (x, y), (px, py) in zip(batches(3), poisoned, strict=True):
        assert torch.equal(px, x)
        assert torch.equal(py, perm[y]) and py.dtype == y.dtype
    for name in ATTACKS:
        if name not in ("poison", "wrong_data"):  # the two that train on other data
            it = batches(1)
            assert Attacker(name, "p", 3).poison(it, 50) is it


@pytest.mark.parametrize("spec", CODECS, ids=lambda spec: spec.name)
def test_a_nan_forgery_is_a_well_formed_payload_that_validation_rejects(spec: CodecConfig) -> None:
    forgery = forge("nan", make_delta(1), make_view())
    blob = encode_forgery(forgery, spec)
    header = codec.read_header(blob)  # the header is correct
    assert header.codec == spec.name and dict(header.shapes) == SHAPES
    with pytest.raises(codec.PayloadError, match="NaN or Inf") as caught:
        codec.validate(blob, SHAPES)
    assert "digest" not in str(caught.value)  # the checksum matches: only the values are bad
    with pytest.raises(codec.PayloadError, match="NaN or Inf"):
        codec.decode(blob, SHAPES)
    # Decoded without the checks, the payload does hold non-finite values where it was forged.
    tensors = safetensors.torch.load(blob)
    impl = get_codec(spec.name)
    for name in ("b", "h"):
        parts = {k.split("::")[1]: t for k, t in tensors.items() if k.split("::")[0] == name}
        decoded = impl.decode(parts, math.prod(SHAPES[name]), spec)
        assert not torch.isfinite(decoded).all()
    parts = {k.split("::")[1]: t for k, t in tensors.items() if k.startswith("w::")}
    assert torch.isfinite(impl.decode(parts, 24, spec)).all()


def test_a_nan_forgery_updates_the_residual_with_its_finite_part() -> None:
    spec = CodecConfig(name="topk2bit", chunk_size=16, topk=4)
    forgery = forge("nan", make_delta(1), make_view())
    residual: Delta = {}
    with pytest.raises(codec.PayloadError):
        codec.validate(encode_forgery(forgery, spec, residual), SHAPES)
    assert residual.keys() == SHAPES.keys()
    assert all(torch.isfinite(t).all() for t in residual.values())


@pytest.mark.parametrize("spec", CODECS, ids=lambda spec: spec.name)
def test_a_finite_forgery_round_trips(spec: CodecConfig) -> None:
    forgery = forge("scale100", make_delta(1), make_view())
    blob = encode_forgery(forgery, spec)
    assert blob == codec.encode(forgery.delta, spec)
    decoded = codec.decode(blob, SHAPES)
    for k, t in forgery.delta.items():
        if spec.name != "topk2bit":
            assert ((decoded[k] - t).abs() <= codec.error_bound(t, spec)).all()
        else:
            assert decoded[k].shape == t.shape and torch.isfinite(decoded[k]).all()


def test_unknown_attack_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown attack 'bogus'") as caught:
        Attacker("bogus", "p", 0)
    assert all(name in str(caught.value) for name in ATTACKS)


def test_round_view_refuses_more_attackers_than_peers() -> None:
    with pytest.raises(ValueError, match="attackers <= peers"):
        RoundView(0, 2, 3)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: faster for the tiny model on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_attacks_on_two_steps_of_the_tiny_gpt(corpus_file: Path, tmp_path: Path) -> None:
    """Train the tiny GPT honestly and poisoned for 2 steps, then forge and upload every attack."""
    config = tiny_config(corpus_file, tmp_path)
    base = initial_state(config.model)
    shapes = {k: tuple(t.shape) for k, t in base.items()}
    vocab, context = config.model.vocab_size, config.model.context
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, vocab, (2, context + 1), generator=gen) for _ in range(2)]
    trainer = LocalTrainer(config.model, config.inner)

    def source() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter([(d[:, :-1], d[:, 1:]) for d in data])

    honest = trainer.train(base, source(), max_steps=2).delta
    poisoner = Attacker("poison", "p", 0)
    poisoned = trainer.train(base, poisoner.poison(source(), vocab), max_steps=2).delta
    assert not equal(honest, poisoned)
    view = RoundView(0, 4, 1, honest=[honest, poisoned], others=[honest])
    for name in ATTACKS:
        forgery = Attacker(name, "p", 0).forge(poisoned, CLAIM, view)
        blob = encode_forgery(forgery, config.codec)
        if name == "nan":
            with pytest.raises(codec.PayloadError, match="NaN or Inf"):
                codec.validate(blob, shapes)
        else:
            assert codec.decode(blob, shapes).keys() == base.keys()


def _honest_flat(view: RoundView) -> torch.Tensor:
    return torch.stack([flat(d) for d in view.honest])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_minmax_sits_on_the_honest_spread(seed: int) -> None:
    """min-max (Shejwalkar and Houmansadr 2021): no honest Δ is farther from the forgery than
    the two farthest honest Δs are from each other, with equality for the largest γ."""
    view = make_view(peers=8, attackers=2)
    h = _honest_flat(view)
    bound = torch.cdist(h, h).max()
    out = flat(forge("minmax", make_delta(1), view, seed).delta)
    far = (h - out).norm(dim=1).max()
    assert float(far) == pytest.approx(float(bound), rel=1e-4)
    mean = h.mean(dim=0)
    assert float(torch.dot(out - mean, mean)) < 0  # pushed against the honest mean


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_minsum_sits_on_the_largest_honest_sum(seed: int) -> None:
    view = make_view(peers=8, attackers=2)
    h = _honest_flat(view)
    bound = torch.cdist(h, h).square().sum(dim=1).max()
    out = flat(forge("minsum", make_delta(1), view, seed).delta)
    assert float((h - out).square().sum()) == pytest.approx(float(bound), rel=1e-4)


def test_edge_is_against_the_mean_just_inside_the_norm_limit() -> None:
    view = make_view(peers=8, attackers=2)
    h = _honest_flat(view)
    out = flat(forge("edge", make_delta(1), view).delta)
    assert norm_of(out) == pytest.approx(3.6 * float(h.norm(dim=1).median()), rel=1e-5)
    cos = torch.nn.functional.cosine_similarity(out, h.mean(dim=0), dim=0)
    assert float(cos) < -0.9


@pytest.mark.parametrize("name", ["minmax", "minsum", "edge"])
def test_adaptive_colluders_are_not_copies_of_each_other(name: str) -> None:
    view = make_view(peers=8, attackers=2)
    a = flat(Attacker(name, "peer-a", 1).forge(make_delta(1), CLAIM, view).delta)
    b = flat(Attacker(name, "peer-b", 1).forge(make_delta(1), CLAIM, view).delta)
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    assert 0.5 < cos < 0.99  # the same intent, under copy detection's 0.99
    lone = RoundView(0, 3, 1, honest=[make_delta(5)])
    assert equal(forge(name, make_delta(1), lone).delta, make_delta(1))


def norm_of(t: torch.Tensor) -> float:
    return float(t.norm())


def test_drift_pushes_one_fixed_direction_every_round() -> None:
    honest = [make_delta(1), make_delta(2)]
    pushes = [
        flat(Attacker("drift", peer, 5).forge(h, CLAIM, make_view(round=r)).delta) - flat(h)
        for r, (peer, h) in enumerate([("a", honest[0]), ("b", honest[1]), ("a", honest[1])])
    ]
    for push, h in zip(pushes, [honest[0], honest[1], honest[1]], strict=True):
        assert norm_of(push) == pytest.approx(0.5 * norm_of(flat(h)), rel=1e-5)
    unit = [p / p.norm() for p in pushes]
    assert all(float(torch.dot(unit[0], u)) == pytest.approx(1.0, abs=1e-6) for u in unit)


def test_colluding_verifiers_clear_accomplices_and_frame_the_honest() -> None:
    replay, mine = make_delta(1), make_delta(2)
    view = RoundView(
        3, 5, 2, honest=[make_delta(3)], coalition=frozenset({"a", "b"}), accomplices={"b": mine}
    )
    liar = Attacker("collude", "a", 0)
    assert liar.lies_as_verifier and not liar.trains
    assert equal(liar.forge_replay("b", replay, view), mine)  # clears its accomplice
    framed = liar.forge_replay("honest", replay, view)
    assert equal(framed, {k: -t for k, t in replay.items()})  # a mismatch for an honest peer
    quiet = RoundView(3, 5, 2, coalition=frozenset({"a", "b"}))
    assert equal(liar.forge_replay("b", replay, quiet), replay)  # no side channel: honest
    assert equal(Attacker("sign_flip", "a", 0).forge_replay("x", replay, view), replay)
    # its contribution is a free ride on the honest mean, turned by its own spread
    sent = flat(liar.forge(make_delta(9), CLAIM, view).delta)
    mean = flat(make_delta(3))
    assert norm_of(sent - mean) == pytest.approx(0.25 * norm_of(mean), rel=1e-5)


def test_wrong_data_trains_on_its_text_read_backwards() -> None:
    x = torch.tensor([[1, 2, 3, 4]])
    y = torch.tensor([[2, 3, 4, 5]])
    ((rx, ry),) = list(Attacker("wrong_data", "p", 0).poison(iter([(x, y)]), 256))
    assert rx.tolist() == [[5, 4, 3, 2]] and ry.tolist() == [[4, 3, 2, 1]]
    assert torch.equal(rx[:, 1:], ry[:, :-1])  # still next-token pairs
    ((sx, sy),) = list(Attacker("sign_flip", "p", 0).poison(iter([(x, y)]), 256))
    assert torch.equal(sx, x) and torch.equal(sy, y)
