"""Retrying, resumable, size-bounded transfers against a fake coordinator (no sockets, no sleep)."""

from __future__ import annotations

import email.utils
import hashlib
import itertools
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from crowdtrain.client.transfer import (
    ApiError,
    RetryPolicy,
    Stopped,
    TransferError,
    download_blob,
    parse_retry_after,
    request_json,
    upload_payload,
)

BLOB = random.Random(0).randbytes(300_000)
SHA = hashlib.sha256(BLOB).hexdigest()
FAST = RetryPolicy(base=0.01, max_delay=0.1, seed=0)


class _Dropping(httpx.SyncByteStream):
    """A body that sends AFTER bytes and then loses the connection."""

    def __init__(self, data: bytes, after: int) -> None:
        self.data, self.after = data, after

    def __iter__(self) -> Iterator[bytes]:
        yield self.data[: self.after]
        raise httpx.ReadError("connection reset by peer")


class _Chunked(httpx.SyncByteStream):
    """A body without Content-Length, sent in pieces."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __iter__(self) -> Iterator[bytes]:
        for i in range(0, len(self.data), 10_000):
            yield self.data[i : i + 10_000]


@dataclass
class Fault:
    """What the fake coordinator does to one request instead of answering it properly."""

    kind: str  # drop | status | ignore_range | corrupt | connect | chunked | bad_range
    after: int = 0
    status: int = 503
    retry_after: str | None = None
    body: bytes = b""


@dataclass
class FakeCoordinator:
    """Serves blobs with Range support and JSON/PUT endpoints; injects one fault per request."""

    blobs: dict[str, bytes] = field(default_factory=lambda: {SHA: BLOB})
    faults: list[Fault] = field(default_factory=list)
    requests: list[httpx.Request] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url="http://coordinator", transport=httpx.MockTransport(self))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.bodies.append(request.read())
        fault = self.faults.pop(0) if self.faults else None
        if fault is not None and fault.kind == "connect":
            raise httpx.ConnectError("connection refused")
        if fault is not None and fault.kind == "status":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            return httpx.Response(fault.status, headers=headers, content=fault.body)
        path = request.url.path
        if path.startswith("/v1/blobs/"):
            return self._blob(request, path.removeprefix("/v1/blobs/"), fault)
        if request.method == "PUT":
            return httpx.Response(200, json={"receipt": "r-1", "weight": 1.0})
        return httpx.Response(200, json={"ok": True, "path": path})

    def _blob(self, request: httpx.Request, sha: str, fault: Fault | None) -> httpx.Response:
        data = self.blobs.get(sha)
        if data is None:
            return httpx.Response(404, json={"error": "not_found", "detail": "no such blob"})
        if fault is not None and fault.kind == "corrupt":
            data = data[:10] + bytes([data[10] ^ 0xFF]) + data[11:]
        if fault is not None and fault.kind == "chunked":
            return httpx.Response(200, stream=_Chunked(data))
        rng = request.headers.get("range")
        if rng and (fault is None or fault.kind != "ignore_range"):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                return httpx.Response(416, headers={"Content-Range": f"bytes */{len(data)}"})
            if fault is not None and fault.kind == "bad_range":
                start += 1
            body, status = data[start:], 206
            headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        else:
            body, status, headers = data, 200, {}
        headers["Content-Length"] = str(len(body))
        if fault is not None and fault.kind == "drop":
            return httpx.Response(status, headers=headers, stream=_Dropping(body, fault.after))
        return httpx.Response(status, headers=headers, content=body)


class Sleeps(list[float]):
    """A sleep function that records its arguments instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def _download(
    fake: FakeCoordinator, dest: Path, sleeps: Sleeps, policy: RetryPolicy = FAST, **kw: object
) -> Path:
    kw.setdefault("max_bytes", 1 << 20)
    return download_blob(fake.client(), SHA, dest, policy=policy, sleep=sleeps, **kw)  # type: ignore[arg-type]


# --- back-off --------------------------------------------------------------------------------


def test_delays_grow_exponentially_are_capped_and_jittered_within_bounds() -> None:
    policy = RetryPolicy(base=0.5, factor=2.0, max_delay=5.0, max_tries=10, jitter=0.5, seed=3)
    delays = list(policy.delays())
    assert len(delays) == 9  # one wait between each pair of tries
    ceilings = [min(5.0, 0.5 * 2**n) for n in range(9)]
    for d, c in zip(delays, ceilings, strict=True):
        assert c * 0.5 <= d <= c
    assert len(set(delays)) == len(delays)  # jittered
    assert list(policy.delays()) == delays  # deterministic for a seed
    assert list(RetryPolicy(max_tries=10, max_delay=5.0, seed=4).delays()) != delays


def test_delays_without_jitter_are_exact_and_endless_without_max_tries() -> None:
    policy = RetryPolicy(base=0.5, factor=2.0, max_delay=4.0, jitter=0.0)
    first = list(itertools.islice(policy.delays(), 200))
    assert first[:6] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert len(first) == 200 and max(first) == 4.0
    assert list(RetryPolicy(max_tries=1).delays()) == []


def test_full_jitter_stays_in_zero_to_ceiling() -> None:
    rng = random.Random(1)
    delays = list(RetryPolicy(base=1.0, max_delay=8.0, max_tries=50, jitter=1.0).delays(rng))
    assert all(0.0 <= d <= 8.0 for d in delays)
    assert min(delays) < 1.0


@pytest.mark.parametrize(
    "kwargs", [{"base": -1.0}, {"factor": 0.5}, {"max_tries": 0}, {"jitter": 1.5}]
)
def test_bad_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="RetryPolicy"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_retry_after_parses_seconds_and_http_dates() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    date = "Sun, 06 Nov 1994 08:49:47 GMT"
    when = email.utils.parsedate_to_datetime(date).timestamp()
    assert parse_retry_after(date, now=when - 10) == pytest.approx(10.0)


# --- downloads -------------------------------------------------------------------------------


def test_a_download_resumes_after_a_dropped_connection(tmp_path: Path) -> None:
    fake = FakeCoordinator(faults=[Fault("drop", after=100_000)])
    sleeps = Sleeps()
    seen: list[tuple[int, int]] = []
    out = _download(fake, tmp_path / "blob", sleeps, progress=lambda d, t: seen.append((d, t)))
    assert out.read_bytes() == BLOB
    assert [r.headers.get("range") for r in fake.requests] == [None, "bytes=100000-"]
    assert len(sleeps) == 1
    assert not (tmp_path / "blob.part").exists()
    assert seen[0] == (100_000, len(BLOB)) and seen[-1] == (len(BLOB), len(BLOB))


def test_many_drops_still_finish_because_progress_resets_the_backoff(tmp_path: Path) -> None:
    faults = [Fault("drop", after=20_000) for _ in range(14)]
    fake = FakeCoordinator(faults=faults)
    policy = RetryPolicy(base=0.01, max_delay=0.1, max_tries=3, seed=0)
    assert _download(fake, tmp_path / "blob", Sleeps(), policy).read_bytes() == BLOB
    assert len(fake.requests) == 15


def test_a_200_reply_to_a_range_request_starts_over(tmp_path: Path) -> None:
    fake = FakeCoordinator(faults=[Fault("drop", after=1000), Fault("ignore_range")])
    out = _download(fake, tmp_path / "blob", Sleeps())
    assert out.read_bytes() == BLOB
    assert fake.requests[1].headers["range"] == "bytes=1000-"


def test_a_206_at_the_wrong_offset_starts_over(tmp_path: Path) -> None:
    fake = FakeCoordinator(faults=[Fault("drop", after=1000), Fault("bad_range")])
    out = _download(fake, tmp_path / "blob", Sleeps())
    assert out.read_bytes() == BLOB
    assert [r.headers.get("range") for r in fake.requests] == [None, "bytes=1000-", None]


def test_a_complete_part_file_is_finished_by_a_416(tmp_path: Path) -> None:
    (tmp_path / "blob.part").write_bytes(BLOB)
    fake = FakeCoordinator()
    assert _download(fake, tmp_path / "blob", Sleeps()).read_bytes() == BLOB
    assert len(fake.requests) == 1 and fake.requests[0].headers["range"] == f"bytes={len(BLOB)}-"


def test_a_complete_part_file_of_the_expected_size_needs_no_request(tmp_path: Path) -> None:
    (tmp_path / "blob.part").write_bytes(BLOB)
    fake = FakeCoordinator()
    out = _download(fake, tmp_path / "blob", Sleeps(), expected_size=len(BLOB))
    assert out.read_bytes() == BLOB and fake.requests == []


def test_a_corrupt_download_is_fetched_again(tmp_path: Path) -> None:
    fake = FakeCoordinator(faults=[Fault("corrupt")])
    sleeps = Sleeps()
    assert _download(fake, tmp_path / "blob", sleeps).read_bytes() == BLOB
    assert len(fake.requests) == 2 and len(sleeps) == 1
    assert "range" not in fake.requests[1].headers  # from zero, not resumed


def test_a_persistently_corrupt_blob_raises_after_a_few_tries(tmp_path: Path) -> None:
    fake = FakeCoordinator(faults=[Fault("corrupt") for _ in range(10)])
    with pytest.raises(TransferError, match="do not match their sha256 after 3 tries"):
        _download(fake, tmp_path / "blob", Sleeps())
    assert len(fake.requests) == 3
    assert not (tmp_path / "blob").exists() and not (tmp_path / "blob.part").exists()


def test_a_declared_size_over_max_bytes_is_refused_before_reading(tmp_path: Path) -> None:
    fake = FakeCoordinator()
    with pytest.raises(TransferError, match="more than the 1000 allowed"):
        _download(fake, tmp_path / "blob", Sleeps(), max_bytes=1000)
    assert len(fake.requests) == 1
    assert not (tmp_path / "blob.part").exists() or (tmp_path / "blob.part").stat().st_size == 0


def test_an_undeclared_body_is_cut_off_at_max_bytes(tmp_path: Path) -> None:
    fake = FakeCoordinator(faults=[Fault("chunked")])
    with pytest.raises(TransferError, match="more than the 25000 bytes allowed"):
        _download(fake, tmp_path / "blob", Sleeps(), max_bytes=25_000)
    assert (tmp_path / "blob.part").stat().st_size <= 25_000


def test_an_expected_size_larger_than_max_bytes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TransferError, match="more than the 10 allowed"):
        _download(FakeCoordinator(), tmp_path / "b", Sleeps(), max_bytes=10, expected_size=11)


def test_a_blob_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TransferError, match="more than the 299999 allowed"):
        _download(FakeCoordinator(), tmp_path / "b", Sleeps(), expected_size=len(BLOB) - 1)
    with pytest.raises(TransferError, match="but the manifest says 300001"):
        _download(FakeCoordinator(), tmp_path / "b", Sleeps(), expected_size=len(BLOB) + 1)


def test_a_cached_destination_is_returned_without_a_request(tmp_path: Path) -> None:
    dest = tmp_path / "blob"
    dest.write_bytes(BLOB)
    fake = FakeCoordinator()
    assert _download(fake, dest, Sleeps()) == dest
    assert fake.requests == []
    dest.write_bytes(b"stale")
    assert _download(fake, dest, Sleeps()).read_bytes() == BLOB
    assert len(fake.requests) == 1


def test_a_missing_blob_is_an_api_error_and_not_retried(tmp_path: Path) -> None:
    fake = FakeCoordinator(blobs={})
    with pytest.raises(ApiError) as info:
        _download(fake, tmp_path / "blob", Sleeps())
    assert (info.value.status, info.value.code, info.value.detail) == (
        404,
        "not_found",
        "no such blob",
    )
    assert len(fake.requests) == 1


def test_a_malformed_hash_is_refused_before_any_request(tmp_path: Path) -> None:
    fake = FakeCoordinator()
    with pytest.raises(Exception, match="not a blob hash"):
        download_blob(fake.client(), "../etc/passwd", tmp_path / "x", max_bytes=10, policy=FAST)
    assert fake.requests == []


def test_download_retries_503_with_retry_after_and_connect_errors(tmp_path: Path) -> None:
    fake = FakeCoordinator(faults=[Fault("status", status=503, retry_after="4"), Fault("connect")])
    sleeps = Sleeps()
    assert _download(fake, tmp_path / "blob", sleeps).read_bytes() == BLOB
    assert sleeps[0] == 4.0 and len(sleeps) == 2


def test_a_stopped_download_keeps_its_partial_file(tmp_path: Path) -> None:
    stop = threading.Event()
    fake = FakeCoordinator(faults=[Fault("drop", after=50_000)])
    with pytest.raises(Stopped):
        download_blob(
            fake.client(),
            SHA,
            tmp_path / "blob",
            max_bytes=1 << 20,
            policy=FAST,
            sleep=lambda s: stop.set(),
            stop=stop,
        )
    assert (tmp_path / "blob.part").stat().st_size == 50_000


# --- JSON calls and uploads ------------------------------------------------------------------


def test_request_json_honours_retry_after() -> None:
    fake = FakeCoordinator(faults=[Fault("status", status=503, retry_after="7")])
    sleeps = Sleeps()
    reply = request_json(fake.client(), "GET", "/v1/status", policy=FAST, sleep=sleeps)
    assert reply == {"ok": True, "path": "/v1/status"}
    assert sleeps == [7.0]


def test_retry_after_is_capped_and_floored_by_the_policy() -> None:
    fake = FakeCoordinator(
        faults=[
            Fault("status", status=429, retry_after="99999"),
            Fault("status", status=503, retry_after="0"),
        ]
    )
    sleeps = Sleeps()
    policy = RetryPolicy(base=0.5, max_retry_after=60.0)
    request_json(fake.client(), "GET", "/v1/status", policy=policy, sleep=sleeps)
    assert sleeps == [60.0, 0.5]


def test_request_json_gives_up_after_max_tries() -> None:
    fake = FakeCoordinator(faults=[Fault("status", status=502) for _ in range(5)])
    sleeps = Sleeps()
    policy = RetryPolicy(max_tries=3, seed=0)
    with pytest.raises(TransferError, match=r"failed after 3 tries.*502"):
        request_json(fake.client(), "POST", "/v1/work", policy=policy, sleep=sleeps)
    assert len(fake.requests) == 3 and len(sleeps) == 2


def test_request_json_retries_timeouts_and_dropped_connections() -> None:
    fake = FakeCoordinator(faults=[Fault("connect"), Fault("connect")])
    sleeps = Sleeps()
    assert request_json(fake.client(), "GET", "/x", policy=FAST, sleep=sleeps)["ok"] is True
    assert len(sleeps) == 2


def test_4xx_is_not_retried_and_carries_the_servers_error() -> None:
    body = b'{"error": "unauthorized", "detail": "the token is wrong"}'
    fake = FakeCoordinator(faults=[Fault("status", status=401, body=body)])
    sleeps = Sleeps()
    with pytest.raises(ApiError) as info:
        request_json(fake.client(), "POST", "/v1/work", policy=FAST, sleep=sleeps)
    err = info.value
    assert (err.status, err.code, err.detail) == (401, "unauthorized", "the token is wrong")
    assert str(err) == "the coordinator refused the request (401 unauthorized): the token is wrong"
    assert len(fake.requests) == 1 and sleeps == []


def test_api_error_falls_back_to_the_reply_text() -> None:
    fake = FakeCoordinator(faults=[Fault("status", status=400, body=b"bad\nthing " * 100)])
    with pytest.raises(ApiError) as info:
        request_json(fake.client(), "POST", "/x", policy=FAST, sleep=Sleeps())
    assert info.value.code == "bad_request"
    assert info.value.detail.startswith("bad thing bad thing")
    assert len(info.value.detail) <= 300 and "\n" not in info.value.detail


def test_request_json_sends_json_and_refuses_a_large_reply() -> None:
    big = b'{"x": "' + b"a" * 5000 + b'"}'
    fake = FakeCoordinator(faults=[Fault("status", status=200, body=big)])
    with pytest.raises(TransferError, match="more than the 1000"):
        request_json(
            fake.client(), "POST", "/x", json={"a": 1}, policy=FAST, sleep=Sleeps(), max_bytes=1000
        )
    assert fake.bodies[0] == b'{"a":1}' or fake.bodies[0] == b'{"a": 1}'


def test_request_json_refuses_a_reply_that_is_not_json() -> None:
    fake = FakeCoordinator(faults=[Fault("status", status=200, body=b"<html>")])
    with pytest.raises(TransferError, match="not valid JSON"):
        request_json(fake.client(), "GET", "/x", policy=FAST, sleep=Sleeps())


def test_upload_retries_5xx_then_returns_the_reply() -> None:
    fake = FakeCoordinator(faults=[Fault("status", status=503, retry_after="2"), Fault("connect")])
    sleeps = Sleeps()
    payload = b"\x01\x02" * 1000
    r = upload_payload(
        fake.client(), "/v1/contributions/3", payload, headers={"X": "1"}, policy=FAST, sleep=sleeps
    )
    assert r.status_code == 200 and r.json() == {"receipt": "r-1", "weight": 1.0}
    assert sleeps[0] == 2.0 and len(sleeps) == 2
    assert fake.bodies == [payload] * 3
    last = fake.requests[-1]
    assert last.method == "PUT" and last.headers["x"] == "1"
    assert last.headers["content-type"] == "application/octet-stream"
    assert last.headers["content-length"] == str(len(payload))


@pytest.mark.parametrize("status", [400, 401, 409, 413])
def test_upload_does_not_retry_a_refusal(status: int) -> None:
    body = b'{"error": "closed", "detail": "round 3 is closed"}'
    fake = FakeCoordinator(faults=[Fault("status", status=status, body=body)])
    sleeps = Sleeps()
    r = upload_payload(
        fake.client(), "/v1/contributions/3", b"x", headers={}, policy=FAST, sleep=sleeps
    )
    assert r.status_code == status and r.json()["error"] == "closed"
    assert len(fake.requests) == 1 and sleeps == []


def test_upload_retries_408_and_429() -> None:
    fake = FakeCoordinator(faults=[Fault("status", status=408), Fault("status", status=429)])
    sleeps = Sleeps()
    r = upload_payload(fake.client(), "/v1/c/1", b"x", headers={}, policy=FAST, sleep=sleeps)
    assert r.status_code == 200 and len(sleeps) == 2


def test_a_paced_upload_sleeps_for_its_size_and_keeps_content_length() -> None:
    fake = FakeCoordinator()
    sleeps = Sleeps()
    payload = bytes(300_000)
    upload_payload(
        fake.client(),
        "/v1/c/1",
        payload,
        headers={},
        policy=FAST,
        sleep=sleeps,
        max_bytes_per_s=100_000.0,
    )
    assert fake.bodies == [payload]
    assert fake.requests[0].headers["content-length"] == "300000"
    assert "transfer-encoding" not in fake.requests[0].headers
    assert sum(sleeps) == pytest.approx(3.0, abs=0.5)


def test_a_set_stop_event_ends_retries() -> None:
    stop = threading.Event()
    fake = FakeCoordinator(faults=[Fault("connect") for _ in range(5)])
    with pytest.raises(Stopped):
        request_json(fake.client(), "GET", "/x", policy=FAST, sleep=lambda s: stop.set(), stop=stop)
    assert len(fake.requests) == 1
