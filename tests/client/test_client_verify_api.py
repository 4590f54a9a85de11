"""The client side of verification in `CoordinatorApi`: the verify work message, the replay
upload (`PUT /v1/verifications/{check_id}`) and the 403 that says this peer is banned."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from crowdtrain.client.api import (
    META_HEADER,
    CoordinatorApi,
    PeerBanned,
    ProtocolError,
    VerifyOrderMsg,
    WorkOrderMsg,
)
from crowdtrain.client.transfer import ApiError, ClientError, RetryPolicy, TransferError

H = "ab" * 32
VERIFY = {
    "kind": "verify",
    "check_id": "0123456789abcdef01234567",
    "target": "peer-7",
    "round": 4,
    "base_version": 4,
    "weights": H,
    "shard_ids": [H, "cd" * 32],
    "seed": 11,
    "step_offset": 200,
    "steps": 12,
    "max_payload_bytes": 1 << 20,
}
BANNED = {"error": "banned", "detail": "this peer is banned: its update was 1000x the median"}


class Fake:
    """A coordinator whose replies are set per path; it records every request."""

    def __init__(self, **reply: httpx.Response) -> None:
        self.reply = dict(reply)  # path prefix -> reply
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        for path, reply in self.reply.items():
            if request.url.path.startswith(path):
                return reply
        return httpx.Response(404, json={"error": "not_found", "detail": "no route"})

    def api(self) -> CoordinatorApi:
        return CoordinatorApi(
            "http://coordinator",
            transport=httpx.MockTransport(self),
            insecure=True,
            token="tok",
            policy=RetryPolicy(base=0.01, max_delay=0.02, max_tries=3, seed=0),
            sleep=lambda s: None,
        )


def _work(reply: Any) -> Any:
    return Fake(**{"/v1/work": httpx.Response(200, json=reply)}).api().work()


def test_a_verify_message_is_parsed() -> None:
    msg = _work({**VERIFY, "future_field": 1})
    assert isinstance(msg, VerifyOrderMsg) and not isinstance(msg, WorkOrderMsg)
    assert (msg.check_id, msg.target, msg.round, msg.steps) == (VERIFY["check_id"], "peer-7", 4, 12)
    assert (msg.seed, msg.step_offset, msg.shard_ids) == (11, 200, [H, "cd" * 32])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"check_id": "../contributions/1"}, "check_id"),
        ({"check_id": ""}, "check_id"),
        ({"target": ""}, "target"),
        ({"steps": 0}, "steps"),
        ({"steps": "12"}, "steps"),
        ({"weights": "AB" * 32}, "weights"),
        ({"shard_ids": []}, "shard_ids"),
        ({"step_offset": -1}, "step_offset"),
        ({"max_payload_bytes": 0}, "max_payload_bytes"),
        ({"round": None}, "round"),
    ],
)
def test_a_malformed_verify_message_is_refused(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ProtocolError, match=f"POST /v1/work is malformed \\(verify.{field}"):
        _work({**VERIFY, **change})


def test_a_verify_message_without_its_fields_is_refused() -> None:
    reply = {k: v for k, v in VERIFY.items() if k != "target"}
    with pytest.raises(ProtocolError, match=r"verify\.target: field required"):
        _work(reply)


def test_the_replay_upload_sends_payload_and_steps() -> None:
    reply = {"check_id": VERIFY["check_id"], "received": True}
    fake = Fake(**{"/v1/verifications/": httpx.Response(200, json=reply)})
    msg = fake.api().upload_verification(str(VERIFY["check_id"]), b"\x01delta", 12)
    assert msg.received and msg.check_id == VERIFY["check_id"]
    (req,) = fake.requests
    assert req.method == "PUT" and req.url.path == f"/v1/verifications/{VERIFY['check_id']}"
    assert req.content == b"\x01delta"
    assert req.headers["content-type"] == "application/octet-stream"
    assert req.headers["content-length"] == "6"
    assert req.headers["authorization"] == "Bearer tok"
    assert json.loads(req.headers[META_HEADER]) == {"steps": 12}


def test_the_replay_upload_is_retried_on_5xx() -> None:
    fake = Fake(**{"/v1/verifications/": httpx.Response(503)})
    with pytest.raises(TransferError, match="failed after 3 tries"):
        fake.api().upload_verification("abc", b"x", 1)
    assert len(fake.requests) == 3


def test_a_replay_no_longer_assigned_is_a_409_api_error() -> None:
    refusal = {"error": "not_assigned", "detail": "this spot-check is not assigned to you"}
    fake = Fake(**{"/v1/verifications/": httpx.Response(409, json=refusal)})
    with pytest.raises(ApiError) as info:
        fake.api().upload_verification("abc", b"x", 1)
    assert (info.value.status, info.value.code) == (409, "not_assigned")
    assert not isinstance(info.value, PeerBanned) and len(fake.requests) == 1


def test_bad_replay_uploads_are_refused_before_sending() -> None:
    fake = Fake()
    api = fake.api()
    with pytest.raises(ClientError, match="not a spot-check id"):
        api.upload_verification("a/b", b"x", 1)
    with pytest.raises(ClientError, match="integer >= 0"):
        api.upload_verification("abc", b"x", -1)
    with pytest.raises(ClientError, match="the replay is 5 bytes, more than the work order's 4"):
        api.upload_verification("abc", b"12345", 1, max_payload_bytes=4)
    assert fake.requests == []


def test_a_receipt_for_another_check_is_a_protocol_error() -> None:
    reply = {"check_id": "other", "received": True}
    fake = Fake(**{"/v1/verifications/": httpx.Response(200, json=reply)})
    with pytest.raises(ProtocolError, match="acknowledged spot-check 'other'"):
        fake.api().upload_verification("abc", b"x", 1)
    fake = Fake(**{"/v1/verifications/": httpx.Response(200, json={"check_id": "abc"})})
    with pytest.raises(ProtocolError, match="received"):
        fake.api().upload_verification("abc", b"x", 1)


@pytest.mark.parametrize("path", ["/v1/work", "/v1/heartbeat", "/v1/contributions/", "/v1/ver"])
def test_a_banned_peer_gets_peer_banned_with_the_coordinators_sentence(path: str) -> None:
    fake = Fake(**{path: httpx.Response(403, json=BANNED)})
    api = fake.api()
    with pytest.raises(PeerBanned) as info:
        if path == "/v1/work":
            api.work()
        elif path == "/v1/heartbeat":
            api.heartbeat()
        elif path == "/v1/contributions/":
            meta = {"base_version": 0, "samples": 1, "tokens": 1, "steps": 1, "train_loss": 1.0}
            api.upload(0, b"x", meta)
        else:
            api.upload_verification("abc", b"x", 1)
    assert str(info.value) == BANNED["detail"]
    assert (info.value.status, info.value.code) == (403, "banned")
    assert len(fake.requests) == 1  # never retried


def test_another_403_is_a_plain_api_error() -> None:
    fake = Fake(**{"/v1/work": httpx.Response(403, json={"error": "nope", "detail": "no."})})
    with pytest.raises(ApiError) as info:
        fake.api().work()
    assert not isinstance(info.value, PeerBanned)
