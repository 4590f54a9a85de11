"""Deterministic shard assignment and batch sampling: replayable by anyone, spread across peers."""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crowdtrain.data import BatchSampler, DataError, assign_shards, eval_batches, shard_id


def make_shard(tag: int, n_bytes: int = 2048) -> bytes:
    """Pseudo-random bytes that do not depend on any RNG implementation."""
    blocks = (hashlib.sha256(f"{tag}-{i}".encode()).digest() for i in range(n_bytes // 32 + 1))
    return b"".join(blocks)[:n_bytes]


RAW = [make_shard(t) for t in range(6)]
IDS = [shard_id(b) for b in RAW]
SHARDS = {sha: np.frombuffer(b, dtype=np.uint8) for sha, b in zip(IDS, RAW, strict=True)}


def sampler(**overrides: object) -> BatchSampler:
    args: dict[str, object] = {
        "seed": 7,
        "round": 3,
        "peer": "alice",
        "batch_size": 8,
        "context": 16,
    }
    args.update(overrides)
    ids = args.pop("ids", IDS[:4])
    return BatchSampler(SHARDS, ids, **args)  # type: ignore[arg-type]


def same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_batches_have_the_right_shape_and_y_is_x_shifted() -> None:
    x, y = sampler().batch(0)
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.min()) >= 0 and int(x.max()) <= 255


def test_windows_come_from_the_assigned_shards_only() -> None:
    ids = IDS[1:3]
    s = sampler(ids=ids, batch_size=64)
    for i in range(3):
        x, y = s.batch(i)
        rows = torch.cat([x, y[:, -1:]], dim=1).to(torch.uint8).numpy()
        for row in rows:
            window = row.tobytes()
            assert any(window in RAW[IDS.index(sha)] for sha in ids)
            assert not any(window in RAW[j] for j in (0, 3, 4, 5))


def test_same_arguments_give_identical_batches() -> None:
    a, b = sampler(), sampler()
    for i in range(5):
        assert same(a.batch(i), b.batch(i))


@pytest.mark.parametrize(
    "change",
    [{"peer": "bob"}, {"round": 4}, {"seed": 8}, {"ids": IDS[:3]}, {"ids": IDS[3::-1]}],
)
def test_different_arguments_give_different_batches(change: dict[str, object]) -> None:
    assert not same(sampler().batch(0), sampler(**change).batch(0))


def test_batch_i_equals_the_ith_batch_of_iteration() -> None:
    s = sampler()
    replay = sampler()
    for i, batch in enumerate(itertools.islice(iter(s), 6)):
        assert same(batch, replay.batch(i))
    assert not same(s.batch(0), s.batch(1))
    assert same(s.batch(5), s.batch(5))


def test_batches_are_pinned_across_versions() -> None:
    """Replays must agree between machines: pin one batch and one assignment exactly."""
    x, _ = sampler().batch(2)
    assert hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16] == PINNED_BATCH
    got = assign_shards(IDS, seed=1, round=2, peer="carol", k=3)
    assert [IDS.index(s) for s in got] == PINNED_ASSIGNMENT


PINNED_BATCH = "3f9cbb9e9f2d4cea"
PINNED_ASSIGNMENT = [3, 0, 4]


def test_short_shards_are_skipped_and_too_short_ones_raise() -> None:
    short = np.frombuffer(b"abc", dtype=np.uint8)
    shards = {**SHARDS, "short": short}
    s = BatchSampler(shards, ["short", IDS[0]], seed=0, round=0, peer="p", batch_size=4, context=8)
    x, _ = s.batch(0)
    assert x.shape == (4, 8)
    with pytest.raises(DataError, match="longer than the context"):
        BatchSampler(shards, ["short"], seed=0, round=0, peer="p", batch_size=4, context=8)


def test_a_shard_exactly_context_plus_one_long_gives_its_only_window() -> None:
    data = np.arange(9, dtype=np.uint8)
    x, y = BatchSampler(
        {"s": data}, ["s"], seed=0, round=0, peer="p", batch_size=3, context=8
    ).batch(0)
    assert torch.equal(x, torch.arange(8).repeat(3, 1))
    assert torch.equal(y, torch.arange(1, 9).repeat(3, 1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ids": ["nope"]}, "not loaded"),
        ({"ids": []}, "no shards"),
        ({"batch_size": 0}, "batch_size"),
        ({"context": 0}, "context"),
        ({"seed": -1}, "seed"),
        ({"peer": ""}, "peer"),
    ],
)
def test_bad_sampler_arguments_raise(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(DataError, match=message):
        sampler(**kwargs)


def test_eval_batches_are_fixed_and_distinct_from_training() -> None:
    a = eval_batches(SHARDS, IDS[4:], batch_size=4, context=16, n_batches=3)
    b = eval_batches(SHARDS, IDS[4:], batch_size=4, context=16, n_batches=3)
    assert len(a) == 3
    assert all(same(p, q) for p, q in zip(a, b, strict=True))
    assert a[0][0].shape == (4, 16)
    assert not same(
        a[0], eval_batches(SHARDS, IDS[4:], batch_size=4, context=16, n_batches=1, seed=1)[0]
    )


def test_eval_without_validation_shards_raises() -> None:
    with pytest.raises(DataError, match="no validation shards"):
        eval_batches(SHARDS, [], batch_size=4, context=16, n_batches=1)


def test_assign_shards_is_deterministic_and_varies_by_round() -> None:
    a = assign_shards(IDS, seed=0, round=1, peer="alice", k=2)
    assert a == assign_shards(IDS, seed=0, round=1, peer="alice", k=2)
    assert len(a) == len(set(a)) == 2
    assert set(a) <= set(IDS)
    per_round = {tuple(assign_shards(IDS, seed=0, round=r, peer="alice", k=2)) for r in range(20)}
    assert len(per_round) > 5
    assert sorted(assign_shards(IDS, seed=0, round=1, peer="alice", k=99)) == sorted(IDS)


def test_assign_shards_spreads_peers_over_the_shards() -> None:
    ids = [shard_id(str(i).encode()) for i in range(40)]
    counts = Counter(
        sha
        for p in range(200)
        for sha in assign_shards(ids, seed=0, round=0, peer=f"peer-{p}", k=4)
    )
    assert set(counts) == set(ids)  # every shard is used by someone
    assert max(counts.values()) < 3 * 200 * 4 / 40


def test_slots_give_disjoint_shards() -> None:
    ids = [shard_id(str(i).encode()) for i in range(12)]
    blocks = [assign_shards(ids, seed=5, round=2, peer=f"p{s}", k=4, slot=s) for s in range(3)]
    assert sorted(itertools.chain(*blocks)) == sorted(ids)


def test_bad_assignment_arguments_raise() -> None:
    with pytest.raises(DataError, match="no training shards"):
        assign_shards([], seed=0, round=0, peer="a", k=1)
    with pytest.raises(DataError, match="duplicates"):
        assign_shards([IDS[0], IDS[0]], seed=0, round=0, peer="a", k=1)
    with pytest.raises(DataError, match="k must"):
        assign_shards(IDS, seed=0, round=0, peer="a", k=0)
    with pytest.raises(DataError, match="round"):
        assign_shards(IDS, seed=0, round=-1, peer="a", k=1)


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 30),
    k=st.integers(1, 40),
    seed=st.integers(0, 2**64),
    rnd=st.integers(0, 10**6),
    peer=st.text(min_size=1, max_size=20),
)
def test_assignments_are_distinct_subsets(n: int, k: int, seed: int, rnd: int, peer: str) -> None:
    ids = [shard_id(str(i).encode()) for i in range(n)]
    got = assign_shards(ids, seed=seed, round=rnd, peer=peer, k=k)
    assert len(got) == min(n, k) == len(set(got))
    assert set(got) <= set(ids)
    assert got == assign_shards(ids, seed=seed, round=rnd, peer=peer, k=k)


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=4),
    context=st.integers(1, 40),
    batch=st.integers(1, 16),
    i=st.integers(0, 2**40),
)
def test_sampled_windows_are_real_windows(
    sizes: list[int], context: int, batch: int, i: int
) -> None:
    raws = [make_shard(100 + j, n) for j, n in enumerate(sizes)]
    shards = {f"s{j}": np.frombuffer(r, dtype=np.uint8) for j, r in enumerate(raws)}
    if max(sizes) <= context:
        with pytest.raises(DataError):
            BatchSampler(
                shards, list(shards), seed=0, round=0, peer="p", batch_size=batch, context=context
            )
        return
    s = BatchSampler(
        shards, list(shards), seed=0, round=0, peer="p", batch_size=batch, context=context
    )
    x, y = s.batch(i)
    assert x.shape == (batch, context)
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in torch.cat([x, y[:, -1:]], dim=1).to(torch.uint8).numpy():
        assert any(row.tobytes() in r for r in raws)
