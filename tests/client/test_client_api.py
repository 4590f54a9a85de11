"""CoordinatorApi against a fake coordinator: requests sent, replies validated, errors raised."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from crowdtrain.client.api import (
    META_HEADER,
    CoordinatorApi,
    FinishedMsg,
    ProtocolError,
    WaitMsg,
    WorkOrderMsg,
)
from crowdtrain.client.identity import ClientState, verify_manifest
from crowdtrain.client.probe import DeviceInfo
from crowdtrain.client.signing import sign_manifest
from crowdtrain.client.transfer import ApiError, ClientError, RetryPolicy, Stopped
from crowdtrain.config import RunConfig, config_hash
from crowdtrain.data import DataManifest, ShardRef

H = "ab" * 32
BLOB = b"weights" * 1000
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()

WORK = {
    "kind": "work",
    "round": 3,
    "base_version": 2,
    "weights": H,
    "shard_ids": [H, "cd" * 32],
    "seed": 7,
    "step_offset": 100,
    "budget": "steps",
    "max_steps": 50,
    "max_seconds": 30.0,
    "deadline_in": 110.5,
    "max_payload_bytes": 1 << 20,
}
META = {"base_version": 2, "samples": 128, "tokens": 4096, "steps": 8, "train_loss": 2.5}


def _manifest() -> dict[str, Any]:
    run = RunConfig()
    data = DataManifest("c", ("*.py",), 8, 0.0, (ShardRef(H, 8),), (), 8, 1)
    return {
        "format": "crowdtrain-manifest",
        "version": 1,
        "run": run.model_dump(mode="json"),
        "config_hash": config_hash(run),
        "data": data.to_json(),
        "data_hash": data.hash(),
        "initial_weights": BLOB_SHA,
        "param_shapes": {"w": [4, 4]},
    }


Handler = Callable[[httpx.Request], httpx.Response]


class Fake:
    """A fake coordinator; set `reply[path]` to change what an endpoint answers."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        doc = sign_manifest(_manifest(), Ed25519PrivateKey.from_private_bytes(bytes(32)))
        self.reply: dict[str, httpx.Response | Handler] = {
            "/v1/register": httpx.Response(200, json={"peer_id": "peer-1", "token": "tok-1"}),
            "/v1/manifest": httpx.Response(200, json=doc),
            "/v1/work": httpx.Response(200, json=WORK),
            "/v1/heartbeat": httpx.Response(
                200, json={"round": 3, "version": 2, "deadline_in": -1.0}
            ),
            "/v1/status": httpx.Response(200, json={"run": "r", "round": 0, "peers": []}),
            "/v1/contributions/3": httpx.Response(200, json={"receipt": "rcpt", "weight": 0.5}),
            f"/v1/blobs/{BLOB_SHA}": httpx.Response(200, content=BLOB),
        }

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        path = request.url.path.removeprefix("/prefix")
        reply = self.reply.get(path)
        if reply is None:
            return httpx.Response(404, json={"error": "not_found", "detail": "no route"})
        return reply(request) if callable(reply) else reply

    def api(self, **kw: Any) -> CoordinatorApi:
        kw.setdefault("policy", RetryPolicy(base=0.01, max_delay=0.02, max_tries=3, seed=0))
        kw.setdefault("sleep", lambda s: None)
        kw.setdefault("insecure", True)  # a mock transport: nothing leaves the process
        return CoordinatorApi("http://coordinator:8000", transport=httpx.MockTransport(self), **kw)


@pytest.fixture
def fake() -> Fake:
    return Fake()


def test_register_sends_the_device_and_keeps_the_token(fake: Fake) -> None:
    api = fake.api()
    dev = DeviceInfo("cpu", "Some CPU", 4, 1 << 30, "2.0")
    assert api.register("alice", "inv", dev) == ("peer-1", "tok-1")
    assert api.token == "tok-1"
    sent = json.loads(fake.requests[0].content)
    assert sent == {
        "name": "alice",
        "invite": "inv",
        "device": {"kind": "cpu", "threads": 4, "name": "Some CPU"},
    }
    api.work()
    assert fake.requests[-1].headers["authorization"] == "Bearer tok-1"


def test_register_refuses_a_bad_name_and_a_bad_reply(fake: Fake) -> None:
    with pytest.raises(ClientError, match="1 to 64 characters"):
        fake.api().register("", None, {"kind": "cpu", "threads": 1, "name": "x"})
    fake.reply["/v1/register"] = httpx.Response(200, json={"peer_id": "p", "token": "a b"})
    with pytest.raises(ProtocolError, match="token"):
        fake.api().register("bob", None, {"kind": "cpu", "threads": 1, "name": "x"})


def test_a_wrong_invite_is_an_api_error(fake: Fake) -> None:
    fake.reply["/v1/register"] = httpx.Response(
        401, json={"error": "bad_invite", "detail": "the invite key is wrong"}
    )
    with pytest.raises(ApiError) as info:
        fake.api().register("bob", "nope", {"kind": "cpu", "threads": 1, "name": "x"})
    assert info.value.status == 401 and info.value.code == "bad_invite"
    assert len(fake.requests) == 1


def test_manifest_returns_a_document_that_verifies(fake: Fake) -> None:
    doc = fake.api().manifest()
    v = verify_manifest(doc, None)
    assert v.initial_weights == BLOB_SHA
    assert fake.requests[0].method == "GET"


def test_work_returns_typed_orders(fake: Fake) -> None:
    api = fake.api(token="t")
    order = api.work()
    assert isinstance(order, WorkOrderMsg)
    assert order.round == 3 and order.shard_ids[1] == "cd" * 32 and order.budget == "steps"
    assert fake.requests[0].method == "POST"
    fake.reply["/v1/work"] = httpx.Response(
        200, json={"kind": "wait", "retry_after": 2.5, "reason": "round closing", "new": 1}
    )
    wait = api.work()
    assert isinstance(wait, WaitMsg) and wait.retry_after == 2.5
    fake.reply["/v1/work"] = httpx.Response(
        200, json={"kind": "finished", "version": 20, "weights": H}
    )
    done = api.work()
    assert isinstance(done, FinishedMsg) and done.version == 20


@pytest.mark.parametrize(
    "change",
    [
        {"kind": "dance"},
        {"round": -1},
        {"round": "3"},
        {"round": True},
        {"weights": "AB" * 32},
        {"shard_ids": []},
        {"shard_ids": ["x"]},
        {"budget": "tokens"},
        {"max_steps": 0},
        {"max_seconds": 0.0},
        {"max_payload_bytes": 0},
    ],
)
def test_malformed_work_orders_are_refused(fake: Fake, change: dict[str, Any]) -> None:
    fake.reply["/v1/work"] = httpx.Response(200, json={**WORK, **change})
    with pytest.raises(ProtocolError, match="POST /v1/work is malformed"):
        fake.api(token="t").work()


def test_unknown_fields_are_ignored_and_a_negative_deadline_is_clamped(fake: Fake) -> None:
    fake.reply["/v1/work"] = httpx.Response(200, json={**WORK, "deadline_in": -3.0, "x": [1]})
    order = fake.api(token="t").work()
    assert isinstance(order, WorkOrderMsg) and order.deadline_in == 0.0
    beat = fake.api(token="t").heartbeat()
    assert (beat.round, beat.version, beat.deadline_in) == (3, 2, 0.0)


def test_auth_calls_need_a_token(fake: Fake) -> None:
    with pytest.raises(ClientError, match="no token"):
        fake.api().work()
    assert fake.requests == []


def test_status_is_public(fake: Fake) -> None:
    assert fake.api().status()["run"] == "r"
    assert "authorization" not in fake.requests[0].headers


def test_upload_sends_payload_and_meta_and_returns_the_receipt(fake: Fake) -> None:
    receipt = fake.api(token="t").upload(3, b"\x00payload", META)
    assert (receipt.receipt, receipt.weight) == ("rcpt", 0.5)
    req = fake.requests[0]
    assert req.method == "PUT" and req.url.path == "/v1/contributions/3"
    assert req.content == b"\x00payload"
    assert req.headers["content-type"] == "application/octet-stream"
    assert req.headers["content-length"] == "8"
    overlap = {"overlap_steps": 0, "overlap_round": -1, "overlap_first_batch": 0}
    timing = {"compute_s": 0.0, "wall_s": 0.0}
    assert json.loads(req.headers[META_HEADER]) == {**META, **overlap, **timing}
    assert req.headers["authorization"] == "Bearer t"


def test_a_refused_upload_is_an_api_error(fake: Fake) -> None:
    fake.reply["/v1/contributions/3"] = httpx.Response(
        409, json={"error": "round_closed", "detail": "round 3 is closed"}
    )
    with pytest.raises(ApiError) as info:
        fake.api(token="t").upload(3, b"x", META)
    assert (info.value.status, info.value.code) == (409, "round_closed")
    assert len(fake.requests) == 1


def test_an_oversized_payload_or_bad_meta_is_refused_before_sending(fake: Fake) -> None:
    api = fake.api(token="t")
    with pytest.raises(ClientError, match="more than the work order's 4"):
        api.upload(3, b"12345", META, max_payload_bytes=4)
    with pytest.raises(ClientError, match="bad contribution metadata"):
        api.upload(3, b"x", {**META, "samples": -1})
    with pytest.raises(ClientError, match="bad contribution metadata"):
        api.upload(3, b"x", {**META, "train_loss": float("nan")})
    assert fake.requests == []


def test_an_upload_is_retried_until_it_gets_a_receipt(fake: Fake) -> None:
    replies = [httpx.Response(503, headers={"Retry-After": "1"}), None]

    def flaky(request: httpx.Request) -> httpx.Response:
        reply = replies.pop(0)
        return reply or httpx.Response(200, json={"receipt": "rcpt", "weight": 1.0})

    fake.reply["/v1/contributions/3"] = flaky
    slept: list[float] = []
    receipt = fake.api(token="t", sleep=slept.append).upload(3, b"x", META, max_mbps=100.0)
    assert receipt.receipt == "rcpt" and slept[0] == 1.0
    assert [r.content for r in fake.requests] == [b"x", b"x"]


def test_download_fetches_and_verifies_a_blob(fake: Fake, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    path = fake.api().download(BLOB_SHA, tmp_path / "w", 1 << 20, lambda d, t: seen.append((d, t)))
    assert path.read_bytes() == BLOB and seen[-1] == (len(BLOB), len(BLOB))
    assert fake.requests[0].headers["accept-encoding"] == "identity"


def test_a_base_url_with_a_path_prefix_is_kept(fake: Fake) -> None:
    api = CoordinatorApi(
        "http://coordinator:8000/prefix/",
        transport=httpx.MockTransport(fake),
        token="t",
        insecure=True,
    )
    api.work()
    assert fake.requests[0].url.path == "/prefix/v1/work"
    api.close()


def test_a_stop_event_interrupts_a_waiting_call(fake: Fake) -> None:
    stop = threading.Event()

    def busy(request: httpx.Request) -> httpx.Response:
        stop.set()
        return httpx.Response(503)

    fake.reply["/v1/work"] = busy
    with (
        CoordinatorApi(
            "http://c", transport=httpx.MockTransport(fake), token="t", stop=stop, insecure=True
        ) as api,
        pytest.raises(Stopped),
    ):
        api.work()
    assert len(fake.requests) == 1


def test_state_pins_what_the_api_verified(fake: Fake) -> None:
    api = fake.api()
    peer, token = api.register("a", None, {"kind": "cpu", "threads": 1, "name": "x"})
    state = ClientState(api.base_url, peer, token).pin(verify_manifest(api.manifest(), None))
    assert verify_manifest(api.manifest(), state).hash == state.manifest_hash
