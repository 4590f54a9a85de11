"""Behaviour every StateStore and BlobStore must have, run against each implementation.

The fixtures `open_state` and `open_blobs` are parametrised by backend name; a new backend (for
example PostgreSQL or S3) joins the suite by adding an entry to STATE_BACKENDS / BLOB_BACKENDS.
The tests only use the Protocol types.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crowdtrain.store import (
    AlreadyExists,
    BlobMismatch,
    BlobNotFound,
    BlobStore,
    BlobTooLarge,
    ContributionRow,
    DirBlobStore,
    InvalidBlobId,
    PeerNotFound,
    PeerRow,
    SqliteStateStore,
    StateStore,
    StoreError,
    VersionRow,
)

STATE_BACKENDS: dict[str, Callable[[Path], StateStore]] = {
    "sqlite": lambda root: SqliteStateStore(root / "state.sqlite"),
}
BLOB_BACKENDS: dict[str, Callable[[Path], BlobStore]] = {
    "dir": lambda root: DirBlobStore(root / "blobs"),
}

OpenState = Callable[[], StateStore]
OpenBlobs = Callable[[], BlobStore]


@pytest.fixture(params=sorted(STATE_BACKENDS))
def open_state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenState]:
    """Opens (and reopens) one state store of the backend; closes all of them afterwards."""
    opened: list[StateStore] = []

    def open_() -> StateStore:
        store = STATE_BACKENDS[request.param](tmp_path)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def state(open_state: OpenState) -> StateStore:
    return open_state()


@pytest.fixture(params=sorted(BLOB_BACKENDS))
def open_blobs(request: pytest.FixtureRequest, tmp_path: Path) -> OpenBlobs:
    return lambda: BLOB_BACKENDS[request.param](tmp_path)


@pytest.fixture
def blobs(open_blobs: OpenBlobs) -> BlobStore:
    return open_blobs()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def peer(n: int, **changes: object) -> PeerRow:
    fields: dict[str, object] = {
        "peer_id": f"p{n}",
        "name": f"peer {n}",
        "token_hash": sha(f"token {n}".encode()),
        "device": {"kind": "cpu", "threads": 4, "name": f"box {n}"},
        "created_at": 100.0 + n,
        "last_seen": 100.0 + n,
    }
    fields.update(changes)
    return PeerRow(**fields)  # type: ignore[arg-type]


def contribution(peer_id: str, round: int, **changes: object) -> ContributionRow:
    fields: dict[str, object] = {
        "peer_id": peer_id,
        "round": round,
        "receipt": f"r-{peer_id}-{round}",
        "blob_sha": sha(f"{peer_id}/{round}".encode()),
        "samples": 64,
        "tokens": 2048,
        "steps": 8,
        "train_loss": 3.25,
        "weight": 0.5,
        "payload_bytes": 1234,
        "received_at": 200.0 + round,
        "status": "accepted",
        "reason": None,
    }
    fields.update(changes)
    return ContributionRow(**fields)  # type: ignore[arg-type]


def version(n: int, **changes: object) -> VersionRow:
    fields: dict[str, object] = {
        "version": n,
        "round": n,
        "weights_sha": sha(f"w{n}".encode()),
        "optimizer_sha": sha(f"o{n}".encode()) if n else None,
        "aggregate_sha": sha(f"a{n}".encode()) if n else None,
        "created_at": 300.0 + n,
        "metrics": {"train_loss": 2.5, "contributors": n, "bytes_up": 10 * n},
    }
    fields.update(changes)
    return VersionRow(**fields)  # type: ignore[arg-type]


# --- state store: peers --------------------------------------------------------------------------


def test_state_store_satisfies_protocol(state: StateStore) -> None:
    assert isinstance(state, StateStore)


def test_peers_round_trip(state: StateStore) -> None:
    a, b = peer(2), peer(1, device={"kind": "cuda", "threads": 8, "gpus": ["A100"]})
    state.add_peer(a)
    state.add_peer(b)
    assert state.get_peer("p2") == a
    assert state.get_peer("p1") == b
    assert state.get_peer("nobody") is None
    assert state.peer_by_token_hash(a.token_hash) == a
    assert state.peer_by_token_hash(sha(b"unknown")) is None
    assert state.list_peers() == [b, a]  # oldest first


def test_duplicate_peer_id_or_token_is_refused(state: StateStore) -> None:
    state.add_peer(peer(1))
    with pytest.raises(AlreadyExists):
        state.add_peer(peer(1, token_hash=sha(b"other")))
    with pytest.raises(AlreadyExists):
        state.add_peer(peer(2, token_hash=peer(1).token_hash))
    assert state.list_peers() == [peer(1)]


def test_names_are_unique_by_their_key(state: StateStore) -> None:
    state.add_peer(peer(1, name="Alice"))
    for clash in ("alice", "ALICE", " Alice ", "\uff21lice", "Alice\u3000"):
        with pytest.raises(AlreadyExists):
            state.add_peer(peer(2, name=clash))
        assert state.peer_by_name(clash) == peer(1, name="Alice")
    assert state.peer_by_name("Bob") is None
    state.add_peer(peer(2, name="Alice B"))
    assert [p.peer_id for p in state.list_peers()] == ["p1", "p2"]


def test_subjects_are_unique_and_tokens_replaceable(state: StateStore) -> None:
    state.add_peer(peer(1, subject="https://id.example#42"))
    state.add_peer(peer(2))  # no subject: any number of those
    state.add_peer(peer(3))
    with pytest.raises(AlreadyExists):
        state.add_peer(peer(4, subject="https://id.example#42"))
    assert state.peer_by_subject("https://id.example#42") == peer(
        1, subject="https://id.example#42"
    )
    assert state.peer_by_subject("https://id.example#43") is None
    state.replace_token("p1", sha(b"new"))
    assert state.peer_by_token_hash(peer(1).token_hash) is None
    row = state.peer_by_token_hash(sha(b"new"))
    assert row is not None and row.peer_id == "p1"
    with pytest.raises(AlreadyExists):  # another peer's token
        state.replace_token("p2", sha(b"new"))
    with pytest.raises(PeerNotFound):
        state.replace_token("nobody", sha(b"x"))


def test_touch_peer_only_moves_forward(state: StateStore) -> None:
    state.add_peer(peer(1))
    state.touch_peer("p1", 150.5)
    assert state.get_peer("p1") == peer(1, last_seen=150.5)
    state.touch_peer("p1", 120.0)
    assert state.get_peer("p1") == peer(1, last_seen=150.5)
    with pytest.raises(PeerNotFound):
        state.touch_peer("nobody", 1.0)


def test_ban_and_unban(state: StateStore) -> None:
    state.add_peer(peer(1))
    state.set_banned("p1", True, "copied another peer's delta")
    row = state.get_peer("p1")
    assert row is not None and row.banned and row.ban_reason == "copied another peer's delta"
    assert state.peer_by_token_hash(peer(1).token_hash) == row
    state.set_banned("p1", False, None)
    assert state.get_peer("p1") == peer(1)
    with pytest.raises(PeerNotFound):
        state.set_banned("nobody", True, "x")


# --- state store: contributions ------------------------------------------------------------------


def test_contributions_round_trip(state: StateStore) -> None:
    state.add_peer(peer(1))
    state.add_peer(peer(2))
    first = contribution("p2", 0)
    second = contribution("p1", 0, weight=1.5, blob_sha=None, reason="note")
    other_round = contribution("p1", 1)
    for row in (first, second, other_round):
        state.record_contribution(row)
    assert state.get_contribution("p2", 0) == first
    assert state.get_contribution("p1", 0) == second
    assert state.get_contribution("p1", 2) is None
    assert state.contributions_for_round(0) == [first, second]  # order recorded
    assert state.contributions_for_round(1) == [other_round]
    assert state.contributions_for_round(7) == []


def test_one_accepted_contribution_per_peer_and_round(state: StateStore) -> None:
    state.add_peer(peer(1))
    state.record_contribution(contribution("p1", 3))
    with pytest.raises(AlreadyExists):
        state.record_contribution(contribution("p1", 3, receipt="another"))
    assert state.contributions_for_round(3) == [contribution("p1", 3)]


def test_blob_accepted_says_whether_an_accepted_payload_is_that_blob(state: StateStore) -> None:
    state.add_peer(peer(1))
    state.add_peer(peer(2))
    state.record_contribution(contribution("p1", 0, blob_sha=sha(b"x"), status="rejected"))
    assert not state.blob_accepted(sha(b"x"))
    state.record_contribution(contribution("p2", 0, blob_sha=sha(b"x")))
    assert state.blob_accepted(sha(b"x")) and not state.blob_accepted(sha(b"y"))
    assert state.blob_authors(sha(b"x")) == {"p1", "p2"} and state.blob_authors(sha(b"y")) == set()


def test_rejected_contributions_may_repeat(state: StateStore) -> None:
    state.add_peer(peer(1))
    bad1 = contribution("p1", 0, status="rejected", reason="norm too large", weight=0.0)
    bad2 = contribution("p1", 0, status="rejected", reason="stale base", received_at=250.0)
    state.record_contribution(bad1)
    state.record_contribution(bad2)
    assert state.get_contribution("p1", 0) == bad2  # the latest rejected one
    good = contribution("p1", 0)
    state.record_contribution(good)
    bad3 = contribution("p1", 0, status="rejected", reason="round closed")
    state.record_contribution(bad3)
    assert state.get_contribution("p1", 0) == good  # accepted wins over later rejections
    assert state.contributions_for_round(0) == [bad1, bad2, good, bad3]
    assert state.contributions_for_round(0, status="accepted") == [good]
    assert state.contributions_for_round(0, status="rejected") == [bad1, bad2, bad3]


def test_contribution_for_unknown_peer_is_refused(state: StateStore) -> None:
    with pytest.raises(PeerNotFound):
        state.record_contribution(contribution("ghost", 0))
    assert state.contributions_for_round(0) == []


def test_non_finite_losses_round_trip(state: StateStore) -> None:
    state.add_peer(peer(1))
    state.add_peer(peer(2))
    state.record_contribution(contribution("p1", 0, train_loss=math.nan, status="rejected"))
    state.record_contribution(contribution("p2", 0, train_loss=math.inf, weight=-math.inf))
    nan_row = state.get_contribution("p1", 0)
    inf_row = state.get_contribution("p2", 0)
    assert nan_row is not None and math.isnan(nan_row.train_loss) and nan_row.weight == 0.5
    assert inf_row is not None and inf_row.train_loss == math.inf and inf_row.weight == -math.inf


def test_contribution_row_validates_status_and_counts() -> None:
    with pytest.raises(ValueError, match="status"):
        contribution("p1", 0, status="maybe")
    with pytest.raises(ValueError, match="samples"):
        contribution("p1", 0, samples=-1)


# --- state store: versions and documents ---------------------------------------------------------


def test_versions(state: StateStore) -> None:
    assert state.latest_version() is None
    assert state.list_versions() == []
    rows = [version(0, metrics={}), version(2), version(1)]
    for row in rows:
        state.add_version(row)
    assert state.latest_version() == rows[1]
    assert state.get_version(1) == rows[2]
    assert state.get_version(9) is None
    assert state.list_versions() == [rows[0], rows[2], rows[1]]
    with pytest.raises(AlreadyExists):
        state.add_version(version(2, weights_sha=sha(b"other")))
    assert state.get_version(2) == rows[1]


def test_json_documents(state: StateStore) -> None:
    assert state.get_json("manifest") is None
    doc = {"format": "crowdtrain-manifest", "shapes": {"w": [3, 4]}, "ok": True, "x": None}
    state.put_json("manifest", doc)
    state.put_json("counter", 1)
    assert state.get_json("manifest") == doc
    state.put_json("counter", 2)
    assert state.get_json("counter") == 2
    state.put_json("tuple", (1, "a"))
    assert state.get_json("tuple") == [1, "a"]
    with pytest.raises(ValueError):
        state.put_json("", 1)


# --- state store: transactions, reopening, threads -----------------------------------------------


def test_transaction_commits_together(state: StateStore) -> None:
    with state.transaction():
        state.add_peer(peer(1))
        state.record_contribution(contribution("p1", 0))
        state.add_version(version(1))
        state.put_json("round", 1)
    assert state.get_contribution("p1", 0) == contribution("p1", 0)
    assert state.get_json("round") == 1


def test_transaction_rollback_leaves_nothing(open_state: OpenState) -> None:
    state = open_state()
    state.add_peer(peer(0))
    with pytest.raises(RuntimeError, match="boom"), state.transaction():
        state.add_peer(peer(1))
        state.touch_peer("p0", 999.0)
        state.record_contribution(contribution("p1", 0))
        state.add_version(version(1))
        state.put_json("round", 1)
        raise RuntimeError("boom")
    for store in (state, open_state()):
        assert store.list_peers() == [peer(0)]
        assert store.contributions_for_round(0) == []
        assert store.list_versions() == []
        assert store.get_json("round") is None


def test_nested_transaction_joins_the_outer_one(state: StateStore) -> None:
    with pytest.raises(RuntimeError), state.transaction():
        state.add_peer(peer(1))
        with state.transaction():
            state.add_peer(peer(2))
        raise RuntimeError("outer fails")
    assert state.list_peers() == []


def test_failed_nested_block_is_undone_alone(state: StateStore) -> None:
    with state.transaction():
        state.add_peer(peer(1))
        with pytest.raises(RuntimeError), state.transaction():
            state.add_peer(peer(2))
            raise RuntimeError("inner fails")
        state.record_contribution(contribution("p1", 0))
        with pytest.raises(AlreadyExists):  # a failed write inside a transaction is recoverable
            state.record_contribution(contribution("p1", 0))
        state.put_json("after", True)
    assert state.list_peers() == [peer(1)]
    assert state.contributions_for_round(0) == [contribution("p1", 0)]
    assert state.get_json("after") is True


def test_reopen_returns_committed_data(open_state: OpenState) -> None:
    state = open_state()
    state.add_peer(peer(1))
    state.record_contribution(contribution("p1", 0))
    state.add_version(version(0))
    state.put_json("manifest", {"a": [1, 2]})
    state.close()
    state.close()  # closing twice is fine
    with pytest.raises(StoreError):
        state.get_peer("p1")
    again = open_state()
    assert again.list_peers() == [peer(1)]
    assert again.get_contribution("p1", 0) == contribution("p1", 0)
    assert again.latest_version() == version(0)
    assert again.get_json("manifest") == {"a": [1, 2]}


def test_concurrent_writers_from_threads(state: StateStore) -> None:
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(20):
                n = 100 * t + i
                with state.transaction():
                    state.add_peer(peer(n))
                    state.record_contribution(contribution(f"p{n}", t))
                state.touch_peer(f"p{n}", 1000.0 + i)
                state.get_peer(f"p{n}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(state.list_peers()) == 80
    assert [len(state.contributions_for_round(t)) for t in range(4)] == [20, 20, 20, 20]


# --- blob store ----------------------------------------------------------------------------------


def test_blob_store_satisfies_protocol(blobs: BlobStore) -> None:
    assert isinstance(blobs, BlobStore)


def test_put_and_read_round_trip(blobs: BlobStore) -> None:
    data = bytes(range(256)) * 40
    blob_id = blobs.put_bytes(data)
    assert blob_id == sha(data)
    assert blobs.has(blob_id)
    assert blobs.size(blob_id) == len(data)
    assert blobs.read(blob_id) == data
    assert b"".join(blobs.iter_range(blob_id)) == data
    assert blobs.put_bytes(data) == blob_id  # idempotent
    assert blobs.read(blob_id) == data
    empty = blobs.put_bytes(b"")
    assert empty == sha(b"") and blobs.size(empty) == 0 and blobs.read(empty) == b""


def test_blobs_survive_reopening(open_blobs: OpenBlobs) -> None:
    blob_id = open_blobs().put_bytes(b"weights")
    assert open_blobs().read(blob_id) == b"weights"


def test_read_respects_cap(blobs: BlobStore) -> None:
    blob_id = blobs.put_bytes(b"x" * 100)
    assert blobs.read(blob_id, max_bytes=100) == b"x" * 100
    with pytest.raises(BlobTooLarge):
        blobs.read(blob_id, max_bytes=99)


def test_missing_blob(blobs: BlobStore) -> None:
    missing = sha(b"never stored")
    assert not blobs.has(missing)
    with pytest.raises(BlobNotFound):
        blobs.size(missing)
    with pytest.raises(BlobNotFound):
        blobs.read(missing)
    with pytest.raises(BlobNotFound):
        blobs.iter_range(missing)  # raised at the call, before iterating
    blobs.delete(missing)  # no-op


def test_delete(blobs: BlobStore) -> None:
    blob_id = blobs.put_bytes(b"old payload")
    blobs.delete(blob_id)
    assert not blobs.has(blob_id)
    with pytest.raises(BlobNotFound):
        blobs.read(blob_id)
    assert blobs.put_bytes(b"old payload") == blob_id
    assert blobs.read(blob_id) == b"old payload"


BAD_IDS = [
    "../x",
    "../../etc/passwd",
    "ab/../" + "0" * 58,
    "/" + "a" * 63,
    "A" * 64,
    "a" * 63,
    "a" * 65,
    "a" * 64 + "\n",
    "g" * 64,
    "",
]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_malformed_ids_are_refused(blobs: BlobStore, bad: str) -> None:
    assert not blobs.has(bad)
    calls: list[Callable[[], object]] = [
        lambda: blobs.size(bad),
        lambda: blobs.read(bad),
        lambda: blobs.iter_range(bad),
        lambda: blobs.local_path(bad),
        lambda: blobs.delete(bad),
        lambda: blobs.put_stream([b"x"], max_bytes=10, expected_sha=bad),
    ]
    for call in calls:
        with pytest.raises(InvalidBlobId) as info:
            call()
        assert isinstance(info.value, BlobNotFound) and isinstance(info.value, ValueError)


def test_put_stream(blobs: BlobStore) -> None:
    chunks = [b"abc", b"", b"defgh", b"i" * 1000]
    data = b"".join(chunks)
    assert blobs.put_stream(iter(chunks), max_bytes=len(data)) == (sha(data), len(data))
    assert blobs.read(sha(data)) == data
    again = blobs.put_stream(chunks, max_bytes=len(data), expected_sha=sha(data))
    assert again == (sha(data), len(data))


def test_put_stream_over_cap_stops_reading(blobs: BlobStore) -> None:
    pulled = 0

    def endless() -> Iterator[bytes]:  # 10 kB, well past the cap (bounded so a bug can't hang)
        nonlocal pulled
        for _ in range(1000):
            pulled += 1
            yield b"z" * 10

    with pytest.raises(BlobTooLarge):
        blobs.put_stream(endless(), max_bytes=95)
    assert pulled == 10  # the tenth chunk crossed the cap; nothing more was read
    assert not blobs.has(sha(b"z" * 90)) and not blobs.has(sha(b"z" * 100))


def test_put_stream_expected_sha_mismatch(blobs: BlobStore) -> None:
    with pytest.raises(BlobMismatch):
        blobs.put_stream([b"what arrived"], max_bytes=100, expected_sha=sha(b"what was promised"))
    assert not blobs.has(sha(b"what arrived"))
    assert not blobs.has(sha(b"what was promised"))


def test_put_async_stream(blobs: BlobStore) -> None:
    async def source(parts: list[bytes]) -> AsyncIterator[bytes]:
        for part in parts:
            await asyncio.sleep(0)
            yield part

    data = [b"payload-", b"bytes" * 100]
    whole = b"".join(data)
    got = asyncio.run(blobs.put_async_stream(source(data), max_bytes=len(whole)))
    assert got == (sha(whole), len(whole))
    assert blobs.read(sha(whole)) == whole
    with pytest.raises(BlobTooLarge):
        asyncio.run(blobs.put_async_stream(source([b"a" * 10] * 5), max_bytes=49))
    assert not blobs.has(sha(b"a" * 50))
    with pytest.raises(BlobMismatch):
        asyncio.run(
            blobs.put_async_stream(source([b"abc"]), max_bytes=10, expected_sha=sha(b"abd"))
        )
    assert not blobs.has(sha(b"abc"))


RANGE_DATA = bytes((i * 37 + 11) % 256 for i in range(1000))
bound = st.none() | st.integers(min_value=-1200, max_value=1200)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(start=st.integers(min_value=-1200, max_value=1200), stop=bound, chunk=st.integers(1, 300))
def test_any_range_is_the_slice(blobs: BlobStore, start: int, stop: int | None, chunk: int) -> None:
    blob_id = blobs.put_bytes(RANGE_DATA)  # idempotent, so cheap after the first example
    pieces = list(blobs.iter_range(blob_id, start, stop, chunk))
    assert b"".join(pieces) == RANGE_DATA[start:stop]
    assert all(0 < len(piece) <= chunk for piece in pieces)
