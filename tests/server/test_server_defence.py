"""The verification pipeline through the coordinator's HTTP API: refusals, bans, spot-checks."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors
from server_helpers import (
    FakeClock,
    Peer,
    ask_for_check,
    assert_error,
    make_payload,
    meta,
    nan_payload,
    register,
    upload,
    work,
)

from crowdtrain import codec
from crowdtrain.client.api import ScoreOrderMsg
from crowdtrain.config import RunConfig
from crowdtrain.data import BatchSampler
from crowdtrain.server.app import create_app
from crowdtrain.server.coordinator import ContributionMeta, Coordinator
from crowdtrain.train import LocalTrainer


def defended(config: RunConfig, **defence: Any) -> RunConfig:
    """The server tests' config with the verification stages on (scoring off: random deltas)."""
    doc = config.model_dump()
    doc["defence"] = {
        **doc["defence"],
        "enabled": True,
        "score_per_round": 0,
        "check_confirm": "off",
        **defence,
    }
    return RunConfig.model_validate(doc)


def serve(config: RunConfig, tmp_path: Path, clock: FakeClock) -> Iterator[TestClient]:
    coord = Coordinator(config, tmp_path / "state", clock=clock, eval_batch_count=1)
    with TestClient(create_app(coord), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def strict(config: RunConfig, tmp_path: Path, clock: FakeClock) -> Iterator[TestClient]:
    """Bans on the first failure."""
    yield from serve(defended(config, ban_strikes=1.0), tmp_path, clock)


@pytest.fixture
def checking(config: RunConfig, tmp_path: Path, clock: FakeClock) -> Iterator[TestClient]:
    """Every contribution is spot-checked and every peer may verify at once; one verifier's
    report decides (two peers leave no second verifier for either's work)."""
    yield from serve(checking_config(config), tmp_path, clock)


def checking_config(config: RunConfig) -> RunConfig:
    """`checking`'s run: every contribution checked, every peer a verifier, one report decides."""
    return defended(
        config,
        check_p_new=1.0,
        probation_rounds=0,
        reputation_initial=1.0,
        trust_threshold=0.0,
        check_fail_quorum=1,
    )


@pytest.fixture
def two_verifiers(config: RunConfig, tmp_path: Path, clock: FakeClock) -> Iterator[TestClient]:
    """`checking` with the default quorums: a failure needs two agreeing verifiers."""
    cfg = defended(
        config,
        check_p_new=1.0,
        probation_rounds=0,
        reputation_initial=1.0,
        trust_threshold=0.0,
    )
    yield from serve(cfg, tmp_path, clock)


def status_of(client: TestClient, name: str) -> dict[str, Any]:
    doc = client.get("/v1/status").json()
    return next(p for p in doc["peers"] if p["name"] == name)


def test_a_nan_payload_is_refused_and_bans_the_peer_with_its_reason(
    strict: TestClient, config: RunConfig
) -> None:
    peer = register(strict, "nan-sender")
    order = work(strict, peer)
    assert order["kind"] == "work"
    doc = assert_error(upload(strict, peer, 0, nan_payload(config)), 400)
    assert doc["error"] == "bad_payload"
    banned = assert_error(strict.post("/v1/work", headers=peer.auth), 403)
    assert banned["error"] == "banned" and "NaN" in banned["detail"]
    entry = status_of(strict, "nan-sender")
    assert entry["banned"] and "format" in entry["ban_reason"]
    verdicts = strict.get("/v1/status").json()["verdicts"]
    assert [v["outcome"] for v in verdicts] == ["rejected", "banned"]
    assert verdicts[0]["stage"] == "format" and verdicts[0]["peer"] == "nan-sender"


def test_an_inflated_sample_claim_is_refused(strict: TestClient, config: RunConfig) -> None:
    peer = register(strict, "inflater")
    work(strict, peer)
    claim = meta(samples=800, tokens=25_600)  # 100x what 2 steps of batch 4 make
    doc = assert_error(upload(strict, peer, 0, make_payload(config), claim), 400)
    assert doc["error"] == "bad_claim" and "800" in doc["detail"]
    assert status_of(strict, "inflater")["banned"]


def test_an_honest_claim_is_accepted(strict: TestClient, config: RunConfig) -> None:
    peer = register(strict, "honest")
    work(strict, peer)
    r = upload(strict, peer, 0, make_payload(config))
    assert r.status_code == 200, r.text
    assert r.json()["weight"] == pytest.approx(8 * config.defence.probation_weight)


def close_round_zero(client: TestClient, config: RunConfig) -> tuple[Peer, Peer, bytes]:
    a, b = register(client, "a"), register(client, "b")
    work(client, a), work(client, b)
    payload_b = make_payload(config, seed=2)
    assert upload(client, a, 0, make_payload(config, seed=1)).status_code == 200
    assert upload(client, b, 0, payload_b).status_code == 200
    return a, b, payload_b


def put_verification(client: TestClient, peer: Peer, check_id: str, payload: bytes) -> Any:
    headers = {**peer.auth, "X-Crowdtrain-Meta": '{"steps": 2}'}
    return client.put(f"/v1/verifications/{check_id}", content=payload, headers=headers)


def test_a_trusted_peer_replays_another_peers_work_and_a_match_passes(
    checking: TestClient, config: RunConfig
) -> None:
    a, b, payload_b = close_round_zero(checking, config)
    order = ask_for_check(checking, config, a, b)
    assert order["kind"] == "verify"
    target = "b" if order["target"] != a.peer_id else "a"
    assert order["target"] != a.peer_id and order["steps"] == 2
    assert order["round"] == 0 and order["weights"] and order["shard_ids"]
    replay = payload_b if target == "b" else make_payload(config, seed=1)
    r = put_verification(checking, a, order["check_id"], replay)
    assert r.json() == {"check_id": order["check_id"], "received": True}
    verdicts = checking.get("/v1/status").json()["verdicts"]
    assert [v["outcome"] for v in verdicts] == ["check_passed"]
    assert status_of(checking, "a")["verified"] == 1


def test_a_replay_that_differs_fails_the_check_and_bans_the_target(
    checking: TestClient, config: RunConfig
) -> None:
    a, b, _ = close_round_zero(checking, config)
    order = ask_for_check(checking, config, a, b)
    assert order["kind"] == "verify" and order["target"] == b.peer_id
    other = make_payload(config, seed=99)
    assert put_verification(checking, a, order["check_id"], other).status_code == 200
    entry = status_of(checking, "b")
    assert entry["banned"] and "replay differs" in entry["ban_reason"]
    assert entry["samples"] == 0  # the voided contribution earns nothing
    assert_error(checking.post("/v1/work", headers=b.auth), 403)


def test_one_verifiers_mismatch_does_not_ban_the_target_a_second_ones_does(
    two_verifiers: TestClient, config: RunConfig
) -> None:
    client = two_verifiers
    a, b, c = register(client, "a"), register(client, "b"), register(client, "c")
    for peer in (a, b, c):
        work(client, peer)
    for i, peer in enumerate((a, b, c)):
        assert upload(client, peer, 0, make_payload(config, seed=i + 1)).status_code == 200
    order = ask_for_check(client, config, a, b, c)
    assert order["kind"] == "verify"
    target = order["target"]
    name = {b.peer_id: "b", c.peer_id: "c", a.peer_id: "a"}[target]
    lie = make_payload(config, seed=99)
    assert put_verification(client, a, order["check_id"], lie).status_code == 200
    entry = status_of(client, name)
    assert not entry["banned"] and entry["samples"] > 0  # one report decides nothing
    other = c if target != c.peer_id else b
    second = ask_for_check(client, config, other)
    while second["kind"] == "verify" and second["check_id"] != order["check_id"]:
        put_verification(client, other, second["check_id"], lie)
        second = work(client, other)
    assert second["kind"] == "verify" and second["check_id"] == order["check_id"]
    assert put_verification(client, other, order["check_id"], lie).status_code == 200
    entry = status_of(client, name)
    assert entry["banned"] and "replay differs" in entry["ban_reason"]


def test_verifications_for_unknown_or_foreign_checks_are_refused(
    checking: TestClient, config: RunConfig
) -> None:
    a, b, payload_b = close_round_zero(checking, config)
    coordinator = checking.app.state.coordinator  # type: ignore[attr-defined]
    stored = set(coordinator.blobs.root.rglob("*"))
    other = make_payload(config, seed=99)  # bytes the coordinator holds nowhere
    doc = assert_error(put_verification(checking, a, "ab" * 12, other), 409)
    assert doc["error"] == "no_check"
    assert set(coordinator.blobs.root.rglob("*")) == stored  # refused before it was read
    order = ask_for_check(checking, config, a, b)
    assert order["kind"] == "verify"
    doc = assert_error(put_verification(checking, b, order["check_id"], payload_b), 409)
    assert doc["error"] == "no_check"
    bad = assert_error(put_verification(checking, a, "not-hex!", payload_b), 400)
    assert bad["error"]


def honest_upload(coord: Coordinator, config: RunConfig, peer_id: str, *, flip: bool) -> None:
    """Train the peer's real work order with LocalTrainer (as a volunteer would) and submit."""
    order = coord.work(peer_id)
    assert order["kind"] == "work"
    shards = {sha: coord.shard_store.load(sha) for sha in order["shard_ids"]}
    sampler = BatchSampler(
        shards,
        order["shard_ids"],
        seed=order["seed"],
        round=order["round"],
        peer=peer_id,
        batch_size=config.data.batch_size,
        context=config.model.context,
    )
    base = dict(load_safetensors(coord.blobs.read(order["weights"])))
    result = LocalTrainer(config.model, config.inner).train(
        base, iter(sampler), step_offset=order["step_offset"], max_steps=order["max_steps"]
    )
    delta = {k: -v if flip else v for k, v in result.delta.items()}
    payload = codec.encode(delta, config.codec)
    sha = coord.blobs.put_bytes(payload)
    meta = ContributionMeta(0, result.samples, result.tokens, result.steps, result.loss_mean)
    coord.submit(peer_id, order["round"], meta, sha, len(payload))


def test_the_coordinator_replays_spot_checks_itself_when_configured(
    config: RunConfig, tmp_path: Path, clock: FakeClock
) -> None:
    cfg = defended(config, spot_check="coordinator", check_p_new=1.0)
    coord = Coordinator(cfg, tmp_path / "state", clock=clock, eval_batch_count=1)
    honest = coord.register("honest", {})["peer_id"]
    cheat = coord.register("cheat", {})["peer_id"]
    torch.set_num_threads(1)
    honest_upload(coord, cfg, honest, flip=False)
    honest_upload(coord, cfg, cheat, flip=True)  # passes screening, fails the replay
    assert coord.protocol.version == 1
    for _ in range(2):  # one replay at a time, in a background thread
        coord.tick()
        assert coord._replaying is not None
        coord._replaying.join(timeout=120)
    outcomes = {v["peer"]: v["outcome"] for v in coord.status()["verdicts"]}
    assert outcomes["honest"] == "check_passed"
    assert outcomes["cheat"] in ("check_failed", "banned")
    cheat_entry = next(p for p in coord.status()["peers"] if p["name"] == "cheat")
    assert cheat_entry["banned"] and "replay differs" in cheat_entry["ban_reason"]
    assert coord.store.get_peer(cheat) is not None and coord.store.get_peer(cheat).banned


@pytest.mark.parametrize("workers", [0, 2])
def test_work_on_arrival_in_worker_threads_screens_the_round(
    config: RunConfig, tmp_path: Path, clock: FakeClock, workers: int
) -> None:
    """The coordinator computes each accepted contribution's norm, fingerprint and score on
    its worker threads as it arrives (workers=0: all at the close), and the close uses them:
    the sign-flipped upload is flagged, the others aggregated (that the decisions are the
    same either way is asserted on the protocol, tests/protocol/test_protocol_defence.py)."""
    cfg = defended(config, score_per_round=4, score_min_steps=1)
    cfg = cfg.model_copy(update={"rounds": cfg.rounds.model_copy(update={"quorum": 4})})
    torch.set_num_threads(1)
    coord = Coordinator(cfg, tmp_path / "state", clock=clock, eval_batch_count=1, workers=workers)
    peers = [coord.register(f"p{i}", {})["peer_id"] for i in range(4)]
    for i, peer in enumerate(peers):
        honest_upload(coord, cfg, peer, flip=i == 3)
        if i < 3:
            assert coord.protocol.version == 0
    assert coord.protocol.version == 1 and coord.protocol.scored == 4
    assert (coord.arrival_s > 0) == (workers > 0)
    flagged = [
        (v["peer"], v["stage"]) for v in coord.status()["verdicts"] if v["outcome"] == "flagged"
    ]
    assert flagged == [("p3", "usefulness")]
    coord.shutdown()


@pytest.fixture
def peer_scoring(config: RunConfig, tmp_path: Path, clock: FakeClock) -> Iterator[TestClient]:
    """Volunteers score every contribution (score orders); every peer may verify at once."""
    cfg = defended(
        config,
        scoring="peer",
        spot_check="off",
        score_per_round=4,
        score_min_steps=1,
        probation_rounds=0,
        reputation_initial=1.0,
        trust_threshold=0.0,
    )
    yield from serve(cfg, tmp_path, clock)


def put_score(client: TestClient, peer: Peer, check_id: str, body: Any) -> Any:
    return client.put(f"/v1/scores/{check_id}", json=body, headers=peer.auth)


GOOD_SCORE = {
    "assigned_before": 3.0,
    "assigned_after": 2.5,
    "heldout_before": 3.1,
    "heldout_after": 3.05,
    "assigned_se": 0.01,
}
BAD_SCORE = {**GOOD_SCORE, "assigned_after": 3.6, "heldout_after": 3.7}


def test_a_score_order_over_http_and_two_failing_scores_flag_the_contribution(
    peer_scoring: TestClient, config: RunConfig
) -> None:
    client = peer_scoring
    a, b, c = register(client, "a"), register(client, "b"), register(client, "c")
    for peer in (a, b, c):
        work(client, peer)
    for i, peer in enumerate((a, b, c)):
        assert upload(client, peer, 0, make_payload(config, seed=i + 1)).status_code == 200
    order = ask_for_check(client, config, a, b, c)
    assert order["kind"] == "score" and order["target"] != a.peer_id
    msg = ScoreOrderMsg.model_validate(order)  # what the client reads, as the API documents it
    assert client.get(f"/v1/blobs/{msg.payload}", headers=a.auth).status_code == 200  # scorer
    # refused unread or unparsed: too long, not JSON, a missing field; a check not ours
    too_long = {**GOOD_SCORE, "pad": "x" * 5000}
    assert assert_error(put_score(client, a, msg.check_id, too_long), 413)["error"] == "too_large"
    r = client.put(
        f"/v1/scores/{msg.check_id}", content=b"{nope", headers={**a.auth, "content-type": "x"}
    )
    assert assert_error(r, 400)["error"] == "bad_body"
    partial = {k: v for k, v in GOOD_SCORE.items() if k != "heldout_after"}
    assert assert_error(put_score(client, a, msg.check_id, partial), 400)["error"] == "bad_body"
    assert assert_error(put_score(client, b, msg.check_id, GOOD_SCORE), 409)["error"] == "no_check"
    r = put_score(client, a, msg.check_id, BAD_SCORE)
    assert r.json() == {"check_id": msg.check_id, "received": True}
    name = {b.peer_id: "b", c.peer_id: "c"}[msg.target]
    assert status_of(client, name)["flagged"] == 0  # one report decides nothing
    other = c if msg.target == b.peer_id else b
    second = ask_for_check(client, config, other)
    while second["kind"] == "score" and second["check_id"] != msg.check_id:
        put_score(client, other, second["check_id"], GOOD_SCORE)
        second = work(client, other)
    assert second["check_id"] == msg.check_id
    assert put_score(client, other, msg.check_id, BAD_SCORE).status_code == 200
    entry = status_of(client, name)
    assert entry["flagged"] == 1 and entry["samples"] == 0
    verdicts = client.get("/v1/status").json()["verdicts"]
    assert any(v["stage"] == "usefulness" and v["outcome"] == "flagged" for v in verdicts)


def test_a_contribution_payload_is_private_to_its_author_its_verifiers_and_the_admin(
    config: RunConfig, tmp_path: Path, clock: FakeClock
) -> None:
    cfg = checking_config(config)
    coord = Coordinator(cfg, tmp_path / "state", clock=clock, eval_batch_count=1, admin_token="adm")
    with TestClient(create_app(coord), raise_server_exceptions=False) as client:
        a, b, payload_b = close_round_zero(client, config)
        c = register(client, "c")
        sha_b = hashlib.sha256(payload_b).hexdigest()

        def get(headers: dict[str, str]) -> Any:
            return client.get(f"/v1/blobs/{sha_b}", headers=headers)

        assert get(b.auth).content == payload_b  # its author
        assert get({"Authorization": "Bearer adm"}).status_code == 200  # the admin
        for who in ({}, c.auth, {"Authorization": "Bearer not-a-token"}):
            assert assert_error(get(who), 403)["error"] == "private_blob"
        # a verifier assigned to check it may read it
        order = ask_for_check(client, config, a, b)
        assert order["kind"] == "verify"
        assert order["target"] == b.peer_id  # a cannot check itself
        assert get(a.auth).content == payload_b
        # weights and data shards stay public
        weights = coord.store.get_version(1)
        assert weights is not None
        assert client.get(f"/v1/blobs/{weights.weights_sha}").status_code == 200
