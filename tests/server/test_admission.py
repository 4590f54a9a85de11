"""The door against sybils (issue: sybil resistance at the door): rate limits, proof of work,
identity-provider tokens, unique names, and registration without a snapshot rewrite."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from server_helpers import FakeClock, assert_error, register, work

from crowdtrain import hashcash
from crowdtrain.client.api import CoordinatorApi
from crowdtrain.client.transfer import ApiError, RetryPolicy
from crowdtrain.config import RunConfig
from crowdtrain.robust.reputation import is_trusted
from crowdtrain.server.admission import (
    AdmissionConfig,
    Challenges,
    RateLimiter,
    address_key,
    name_is_printable,
)
from crowdtrain.server.app import create_app
from crowdtrain.server.coordinator import Coordinator

DEVICE = {"kind": "cpu", "threads": 1, "name": "t"}


def door(
    config: RunConfig, tmp_path: Path, clock: FakeClock, **admission: Any
) -> tuple[Coordinator, TestClient]:
    coordinator = Coordinator(
        config,
        tmp_path / "state",
        clock=clock,
        admission=AdmissionConfig(**admission),
        eval_batch_count=1,
    )
    return coordinator, TestClient(create_app(coordinator), raise_server_exceptions=False)


def post(client: TestClient, name: str, **extra: Any) -> Any:
    return client.post("/v1/register", json={"name": name, "device": DEVICE, **extra})


# --- the parts ---------------------------------------------------------------------------------


def test_rate_limiter_burst_refill_and_bound() -> None:
    lim = RateLimiter(burst=3, per_s=0.5, max_keys=2)
    assert [lim.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert lim.take("a", 0.0) == pytest.approx(2.0)  # one token in 2 s
    assert lim.wait("a", 1.0) == pytest.approx(1.0)
    assert lim.take("a", 2.0) == 0.0
    lim.take("b", 2.0)
    lim.take("c", 2.0)
    assert len(lim) == 2  # "a", the least recently used, was dropped
    assert RateLimiter(burst=1, per_s=0.0).take("x", 0.0) == 0.0
    assert RateLimiter(burst=0, per_s=0.0).take("x", 0.0) == float("inf")


def test_address_keys_group_ipv6_networks() -> None:
    assert address_key("203.0.113.7", 64) == "203.0.113.7"
    assert address_key("2001:db8:1:2:aaaa::1", 64) == address_key("2001:db8:1:2:bbbb::9", 64)
    assert address_key("2001:db8:1:2::1", 64) != address_key("2001:db8:1:3::1", 64)
    assert address_key("::ffff:203.0.113.7", 64) == "203.0.113.7"
    assert address_key(None, 64) == address_key("testclient", 64) == "unknown"


def test_hashcash_solves_and_checks() -> None:
    nonce = hashcash.solve("c", 12)
    assert hashcash.check("c", nonce, 12)
    for bad in ("", "-1", "1e3", "٣", "1" * 21, " 1"):
        assert not hashcash.check("c", bad, 0)
    assert hashcash.leading_zero_bits(bytes([0, 0x10])) == 11
    stop = threading.Event()
    stop.set()
    with pytest.raises(hashcash.Stopped):
        hashcash.solve("c", 32, stop)
    with pytest.raises(ValueError):
        hashcash.solve("c", 33)


def test_challenges_are_signed_expire_and_admit_once() -> None:
    ch = Challenges(b"k" * 32, bits=8, ttl_s=60.0)
    issued = ch.issue(1000.0)
    c = issued["challenge"]
    nonce = hashcash.solve(c, 8)
    wrong = next(str(n) for n in range(1000) if not hashcash.check(c, str(n), 8))
    with pytest.raises(Exception, match="does not solve"):
        ch.spend(c, wrong, 1000.0)
    ch.spend(c, nonce, 1000.0)
    with pytest.raises(Exception, match="already admitted"):
        ch.spend(c, nonce, 1001.0)
    late = ch.issue(1000.0)["challenge"]
    with pytest.raises(Exception, match="expired"):
        ch.spend(late, hashcash.solve(late, 8), 1061.0)
    expiry, _, rand, mac = c.split(".")
    for forged in (
        f"{int(expiry) + 999}.8.{rand}.{mac}",
        f"{expiry}.0.{rand}.{mac}",
        "x",
        "a.b.c.d",
    ):
        with pytest.raises(Exception, match=r"not this run.s"):
            ch.spend(forged, hashcash.solve(forged, 0), 1000.0)
    other = Challenges(b"other key" * 4, bits=8, ttl_s=60.0).issue(1000.0)["challenge"]
    with pytest.raises(Exception, match="not this run's"):
        ch.spend(other, hashcash.solve(other, 8), 1000.0)
    easier = Challenges(b"k" * 32, bits=2, ttl_s=60.0).issue(1000.0)["challenge"]
    with pytest.raises(Exception, match="below"):
        ch.spend(easier, hashcash.solve(easier, 2), 1000.0)


def test_names_must_be_printable() -> None:
    assert name_is_printable("Ada Lovelace ✓")
    for bad in ("", "   ", "a\x00b", "admin\u202e", "a\u200bb", "a\nb"):
        assert not name_is_printable(bad)


def test_identity_settings_come_together(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="together"):
        AdmissionConfig(identity_key=tmp_path / "k.pem")
    with pytest.raises(ValueError, match="public-key"):
        AdmissionConfig(identity_algorithms=("HS256",))


# --- over HTTP -----------------------------------------------------------------------------------


def test_one_address_is_slowed_after_its_burst(
    config: RunConfig, tmp_path: Path, clock: FakeClock
) -> None:
    coordinator, client = door(config, tmp_path, clock, address_burst=3, address_per_hour=60)
    with client:
        for n in range(3):
            register(client, f"v{n}")
        r = post(client, "v3")
        assert_error(r, 429)
        assert r.json()["error"] == "rate_limited" and int(r.headers["retry-after"]) == 60
        assert len(coordinator.store.list_peers()) == 3
        # refused attempts count too (they also bound guessing an invite key)
        clock.advance(60)
        register(client, "v3")
        assert_error(post(client, "v4"), 429)


def test_the_global_limit_counts_only_admitted_peers(
    config: RunConfig, tmp_path: Path, clock: FakeClock
) -> None:
    coordinator, client = door(
        config, tmp_path, clock, address_burst=0, global_burst=2, global_per_minute=1, invite="k"
    )
    with client:
        for n in range(20):  # bad attempts take nothing from the honest volunteers' share
            assert_error(post(client, f"x{n}", invite="wrong"), 401)
        register(client, "a", invite="k")
        register(client, "b", invite="k")
        r = post(client, "c", invite="k")
        assert_error(r, 429)
        assert r.json()["error"] == "busy" and int(r.headers["retry-after"]) == 60
        clock.advance(60)
        register(client, "c", invite="k")
    assert len(coordinator.store.list_peers()) == 3


def test_names_are_unique_over_http(config: RunConfig, tmp_path: Path, clock: FakeClock) -> None:
    coordinator, client = door(config, tmp_path, clock)
    with client:
        register(client, "Alice")
        for clash in ("alice", "ＡＬＩＣＥ", "Alice  "):
            assert assert_error(post(client, clash), 409)["error"] == "name_taken"
        for bad in ("ali\u202ece", "\t", "a\x07"):
            assert assert_error(post(client, bad), 400)["error"] == "bad_name"
    assert [p.name for p in coordinator.store.list_peers()] == ["Alice"]


def test_proof_of_work_flow(config: RunConfig, tmp_path: Path, clock: FakeClock) -> None:
    coordinator, client = door(config, tmp_path, clock, pow_bits=10)
    with client:
        assert assert_error(post(client, "a"), 401)["error"] == "pow_required"
        doc = client.get("/v1/register/challenge").json()
        assert doc["bits"] == 10 and doc["expires_in"] == 600
        pow_ = {"challenge": doc["challenge"], "nonce": hashcash.solve(doc["challenge"], 10)}
        assert post(client, "a", pow=pow_).status_code == 200
        assert assert_error(post(client, "b", pow=pow_), 401)["error"] == "pow_spent"
        for bad in ({"challenge": doc["challenge"]}, {"challenge": "", "nonce": "1"}):
            assert_error(post(client, "b", pow=bad), 400)
        # the volunteer's client fetches and solves a challenge by itself
        api = CoordinatorApi("http://testserver", transport=client._transport, insecure=True)
        peer_id, _ = api.register("b", None, DEVICE)
        assert {p.peer_id for p in coordinator.store.list_peers()} >= {peer_id}
    _, client2 = door(config, tmp_path / "off", clock)
    with client2:
        assert_error(client2.get("/v1/register/challenge"), 404)


def test_a_name_clash_does_not_spend_the_challenge(
    config: RunConfig, tmp_path: Path, clock: FakeClock
) -> None:
    _, client = door(config, tmp_path, clock, pow_bits=4, global_burst=1, global_per_minute=1)
    with client:
        doc = client.get("/v1/register/challenge").json()
        pow_ = {"challenge": doc["challenge"], "nonce": hashcash.solve(doc["challenge"], 4)}
        assert post(client, "a", pow=pow_).status_code == 200
        doc = client.get("/v1/register/challenge").json()
        pow_ = {"challenge": doc["challenge"], "nonce": hashcash.solve(doc["challenge"], 4)}
        assert assert_error(post(client, "b", pow=pow_), 429)["error"] == "busy"
        clock.advance(61)
        assert post(client, "b", pow=pow_).status_code == 200  # still unspent


@pytest.fixture
def idp(tmp_path: Path) -> tuple[Ed25519PrivateKey, Path]:
    key = Ed25519PrivateKey.generate()
    pem = tmp_path / "idp.pem"
    pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key, pem


def id_token(key: Ed25519PrivateKey, sub: str, **changes: Any) -> str:
    claims = {
        "iss": "https://id.example",
        "aud": "crowdtrain-run",
        "sub": sub,
        "exp": int(time.time()) + 600,
        **changes,
    }
    return jwt.encode(claims, key, algorithm="EdDSA")


def test_identity_provider_tokens(
    config: RunConfig, tmp_path: Path, clock: FakeClock, idp: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pem = idp
    coordinator, client = door(
        config,
        tmp_path,
        clock,
        identity_key=pem,
        identity_issuer="https://id.example",
        identity_audience="crowdtrain-run",
    )
    with client:
        assert assert_error(post(client, "a"), 401)["error"] == "identity_required"
        stranger = Ed25519PrivateKey.generate()
        for bad in (
            id_token(stranger, "1"),
            id_token(key, "1", aud="another-run"),
            id_token(key, "1", iss="https://evil.example"),
            id_token(key, "1", exp=int(time.time()) - 10),
            jwt.encode(
                {"iss": "https://id.example", "aud": "crowdtrain-run", "sub": "1"}, key, "EdDSA"
            ),
            jwt.encode({"sub": "1"}, "a-shared-secret-of-32-bytes-long", algorithm="HS256"),
            "not a token",
        ):
            assert assert_error(post(client, "a", identity=bad), 401)["error"] == "bad_identity"
        first = post(client, "alice", identity=id_token(key, "1")).json()
        assert work(client, _peer(first))["kind"] == "work"
        # the same account again: the same peer, a new token, the old one revoked
        again = post(client, "alice-laptop", identity=id_token(key, "1")).json()
        assert again["peer_id"] == first["peer_id"] and again["token"] != first["token"]
        assert_error(client.post("/v1/work", headers=_peer(first).auth), 401)
        assert work(client, _peer(again))["kind"] in {"work", "wait"}
        # another account is another peer; a banned account cannot come back
        other = post(client, "bob", identity=id_token(key, "2")).json()
        assert other["peer_id"] != first["peer_id"]
        coordinator.store.set_banned(other["peer_id"], True, "test")
        assert_error(post(client, "bob2", identity=id_token(key, "2")), 403)
    assert len(coordinator.store.list_peers()) == 2


def _peer(doc: dict[str, str]) -> Any:
    from server_helpers import Peer

    return Peer(doc["peer_id"], doc["token"])


def test_registration_writes_no_snapshot_and_survives_a_restart(
    config: RunConfig, tmp_path: Path, clock: FakeClock
) -> None:
    coordinator, client = door(config, tmp_path, clock)
    before = coordinator.store.get_json("protocol")
    with client:
        peer = register(client, "v")
    assert coordinator.store.get_json("protocol") == before  # one row, not a snapshot
    coordinator.shutdown()
    again, client = door(config, tmp_path, clock)
    with client:
        assert work(client, peer)["kind"] == "work"
    assert peer.peer_id in again.protocol.peers


def test_client_retries_after_a_rate_limit(
    config: RunConfig, tmp_path: Path, clock: FakeClock
) -> None:
    _, client = door(config, tmp_path, clock, address_burst=1, address_per_hour=3600)
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        clock.advance(s)

    with client:
        register(client, "a")
        api = CoordinatorApi(
            "http://testserver",
            transport=client._transport,
            insecure=True,
            policy=RetryPolicy(max_tries=3),
            sleep=sleep,
        )
        api.register("b", None, DEVICE)
        assert slept == [1.0]  # the Retry-After of one token per second
        clock.advance(1)
        with pytest.raises(ApiError, match="name_taken"):
            api.register("A", None, DEVICE)


def test_seed_invite_starts_established(
    config: RunConfig, tmp_path: Path, clock: FakeClock
) -> None:
    key = "organizer-seed-key-0123"
    coordinator, client = door(config, tmp_path, clock, invite="open", seed_invite=key)
    with client:
        seed = register(client, "seed", invite=key)
        plain = register(client, "plain", invite="open")
        assert_error(post(client, "x", invite="seed"), 401)
    defence = coordinator.config.defence
    assert is_trusted(coordinator.protocol.peers[seed.peer_id].standing, defence)
    assert not is_trusted(coordinator.protocol.peers[plain.peer_id].standing, defence)
    coordinator.shutdown()
    again, _ = door(config, tmp_path, clock)  # the seed's standing survives a restart
    assert is_trusted(again.protocol.peers[seed.peer_id].standing, defence)
    with pytest.raises(ValueError):
        AdmissionConfig(seed_invite="short")


def test_the_state_is_private_to_the_coordinators_user(
    config: RunConfig, tmp_path: Path, clock: FakeClock
) -> None:
    coordinator, _ = door(config, tmp_path, clock)
    state = tmp_path / "state"
    assert state.stat().st_mode & 0o777 == 0o700
    assert (state / "state.sqlite").stat().st_mode & 0o077 == 0
    coordinator.shutdown()


def test_a_registration_key_gets_the_same_peer_back_after_a_lost_answer(
    config: RunConfig, tmp_path: Path, clock: FakeClock
) -> None:
    """A client that registered but lost the answer (a crash, a dropped connection) registers
    again with its key: the same peer with a new token, where the name alone gets 409."""
    coordinator, client = door(config, tmp_path, clock)
    key, other = "k" * 40, "z" * 40
    with client:
        first = post(client, "Alice", key=key)
        assert first.status_code == 200
        again = post(client, "Alice", key=key)
        assert again.status_code == 200
        assert again.json()["peer_id"] == first.json()["peer_id"]
        assert again.json()["token"] != first.json()["token"]
        old = {"Authorization": f"Bearer {first.json()['token']}"}
        assert assert_error(client.post("/v1/work", headers=old), 401)["error"] == "bad_token"
        new = {"Authorization": f"Bearer {again.json()['token']}"}
        assert client.post("/v1/work", headers=new).status_code == 200
        assert assert_error(post(client, "Alice", key=other), 409)["error"] == "name_taken"
        assert assert_error(post(client, "Alice"), 409)["error"] == "name_taken"
        for bad in ("short", "k" * 200, "k" * 39 + "!"):
            assert post(client, "Bob", key=bad).status_code == 400
    assert [p.name for p in coordinator.store.list_peers()] == ["Alice"]
    # the key survives a restart: it is stored with the peer (hashed), not in memory
    coordinator.shutdown()
    _, client = door(config, tmp_path, clock)
    with client:
        assert post(client, "Alice", key=key).json()["peer_id"] == first.json()["peer_id"]
