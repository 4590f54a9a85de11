"""Robust HTTP transfers for volunteers: retries with back-off, resumable downloads, bounded reads.

Volunteers sit behind ordinary, flaky internet links, so every call to the coordinator retries
connection errors, timeouts and 5xx/408/429 replies with capped exponential back-off and jitter
("Exponential Backoff and Jitter", M. Brooker, AWS Architecture Blog, 2015), honouring the
server's `Retry-After`. Downloads resume where they stopped with HTTP range requests
(RFC 9110 §14) and are verified against their sha256 content address before they are used.
Uploads are plain repeated PUTs, which is safe because the coordinator is idempotent per
(peer, round). Every size is bounded before it is read; replies are JSON or raw bytes, never
pickles. HTTPS connections always verify the coordinator's certificate (`tls_context`); a
certificate that fails verification is not retried (`CertificateError`).

The errors raised here (`ClientError` and its subclasses) carry one sentence for a person.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from crowdtrain import strictjson

log = logging.getLogger(__name__)

Sleep = Callable[[float], None]
Progress = Callable[[int, int], None]
"""Called as progress(bytes_done, bytes_total); bytes_total is 0 while it is unknown."""

MAX_ERROR_BODY = 64 << 10
"""The most bytes of an error reply that are read to find its `{"error", "detail"}`."""

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")
_RETRY_STATUS = frozenset({408, 429})
_CHUNK = 1 << 16
_CORRUPT_TRIES = 3


class ClientError(Exception):
    """A volunteer-side failure; the message is one sentence for a person."""


class TransferError(ClientError):
    """A transfer failed for good: retries ran out, or the reply was too big or malformed."""


class ApiError(ClientError):
    """The coordinator refused a request (a 4xx reply) with an error code and a reason."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        super().__init__(f"the coordinator refused the request ({status} {code}): {detail}")


class CertificateError(ClientError):
    """The coordinator's TLS certificate failed verification: retrying cannot help."""


class Stopped(ClientError):
    """A transfer was abandoned because the volunteer is shutting down (its stop event is set)."""


class ManifestChanged(ClientError):
    """The coordinator's run manifest (or its signing key) differs from the one pinned at join."""


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential back-off with jitter.

    The n-th wait (n = 0, 1, ...) is drawn uniformly from [d·(1 − jitter), d] where
    d = min(max_delay, base · factorⁿ): jitter 1 is "full jitter", 0 is none. `max_tries`
    counts tries, so there are `max_tries − 1` waits; None retries forever. `seed` makes the
    jitter deterministic (for tests). A server's `Retry-After` replaces the drawn wait, raised
    to at least `base` and capped at `max_retry_after` seconds.
    """

    base: float = 0.5
    factor: float = 2.0
    max_delay: float = 30.0
    max_tries: int | None = None
    jitter: float = 0.5
    seed: int | None = None
    max_retry_after: float = 300.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.base) and self.base >= 0):
            raise ValueError(f"RetryPolicy.base must be a finite number >= 0, not {self.base}")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError(f"RetryPolicy.factor must be a finite number >= 1, not {self.factor}")
        if not (math.isfinite(self.max_delay) and self.max_delay >= self.base):
            raise ValueError("RetryPolicy.max_delay must be finite and at least base")
        if self.max_tries is not None and self.max_tries < 1:
            raise ValueError(f"RetryPolicy.max_tries must be at least 1, not {self.max_tries}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"RetryPolicy.jitter must be from 0 to 1, not {self.jitter}")
        if not (math.isfinite(self.max_retry_after) and self.max_retry_after >= 0):
            raise ValueError("RetryPolicy.max_retry_after must be a finite number >= 0")

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The waits between successive tries: `max_tries − 1` of them, or endless if None."""
        rng = rng if rng is not None else random.Random(self.seed)
        ceiling = min(self.base, self.max_delay)
        n = 0
        while self.max_tries is None or n < self.max_tries - 1:
            yield ceiling * (1.0 - self.jitter) + ceiling * self.jitter * rng.random()
            ceiling = min(self.max_delay, ceiling * self.factor)
            n += 1


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or an HTTP date), or None."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        ref = datetime.now(UTC).timestamp() if now is None else now
        seconds = when.timestamp() - ref
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def tls_context(ca_cert: Path | None = None) -> ssl.SSLContext:
    """The TLS settings for talking to a coordinator: the system's trust store, plus the CA
    certificates in the PEM file CA_CERT when given (a run with its own, e.g. self-signed,
    certificate authority). Certificates and host names are always verified."""
    context = ssl.create_default_context()
    if ca_cert is None:
        return context
    try:
        context.load_verify_locations(cafile=ca_cert)
    except ssl.SSLError:
        raise ClientError(f"--ca-cert: {ca_cert} holds no PEM CA certificate") from None
    except OSError as exc:
        raise ClientError(f"--ca-cert: cannot read {ca_cert}: {exc.strerror or exc}") from None
    return context


def _cert_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind EXC (httpx wraps it twice), if any."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _retry_cause(exc: httpx.TransportError) -> str:
    """Why a try failed, to retry it; raises CertificateError instead for a certificate that
    failed verification, which no retry fixes."""
    failure = _cert_failure(exc)
    if failure is not None:
        why = failure.verify_message or failure.reason or str(failure)
        raise CertificateError(
            f"the coordinator's TLS certificate failed verification ({why}); if the run uses "
            "its own certificate authority, pass its certificate with --ca-cert FILE"
        )
    return _describe(exc)


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise Stopped("stopped on request while talking to the coordinator")


def interruptible_sleep(stop: threading.Event) -> Sleep:
    """A sleep function that returns early as soon as STOP is set."""

    def sleep(seconds: float) -> None:
        stop.wait(seconds)

    return sleep


class _Backoff:
    """Counts tries of one operation and sleeps between them, or gives up with TransferError.

    With a STOP event, a wait raises Stopped once the event is set (before or during it).
    """

    def __init__(
        self, policy: RetryPolicy, sleep: Sleep, what: str, stop: threading.Event | None = None
    ) -> None:
        self._policy = policy
        self._sleep = sleep
        self._what = what
        self._stop = stop
        self._rng = random.Random(policy.seed)
        self._delays = policy.delays(self._rng)
        self.tries = 1

    def reset(self) -> None:
        """Start the back-off over (after a try that made progress)."""
        self._delays = self._policy.delays(self._rng)

    def wait(self, cause: str, retry_after: float | None = None) -> None:
        _check_stop(self._stop)
        try:
            delay = next(self._delays)
        except StopIteration:
            raise TransferError(
                f"{self._what} failed after {self.tries} tries; last problem: {cause}"
            ) from None
        if retry_after is not None:  # the server knows best, but never busy-loop on "0"
            delay = min(max(retry_after, self._policy.base), self._policy.max_retry_after)
        log.info("%s: %s; retrying in %.1f s", self._what, cause, delay)
        self._sleep(delay)
        _check_stop(self._stop)
        self.tries += 1


def _is_retryable(status: int) -> bool:
    return status >= 500 or status in _RETRY_STATUS


def _declared_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise TransferError(f"the coordinator sent a bad Content-Length {value[:40]!r}") from None
    if n < 0:
        raise TransferError(f"the coordinator sent a negative Content-Length {n}")
    return n


def _read_bounded(response: httpx.Response, max_bytes: int, what: str) -> bytes:
    """Read a streamed reply body, refusing (before and while reading) more than MAX_BYTES."""
    declared = _declared_length(response)
    if declared is not None and declared > max_bytes:
        raise TransferError(
            f"{what}: the reply is {declared} bytes, more than the {max_bytes} allowed"
        )
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise TransferError(f"{what}: the reply is more than the {max_bytes} bytes allowed")
    return bytes(body)


def _send(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    max_bytes: int,
    what: str,
    **kwargs: Any,
) -> httpx.Response:
    """One request whose reply body is read with a size bound; the reply comes back read."""
    with client.stream(method, url, **kwargs) as r:
        if r.is_success:
            return _detached(r, _read_bounded(r, max_bytes, what))
        return _detached(r, _read_error_body(r, min(max_bytes, MAX_ERROR_BODY)))


_BODY_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})


def _detached(r: httpx.Response, body: bytes) -> httpx.Response:
    """A read copy of streamed reply R with its (already decoded) BODY."""
    headers = [(k, v) for k, v in r.headers.multi_items() if k.lower() not in _BODY_HEADERS]
    return httpx.Response(r.status_code, headers=headers, content=body, request=r.request)


def _read_error_body(response: httpx.Response, limit: int) -> bytes:
    """Up to LIMIT bytes of an error reply; the rest is dropped (it only explains the error)."""
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk[: limit - len(body)]
        if len(body) >= limit:
            break
    return bytes(body)


def loads_json(raw: bytes) -> Any:
    """Parse JSON bytes strictly (UTF-8, no NaN/Infinity, no duplicate keys); else ValueError."""
    return strictjson.loads(raw)


def api_error(response: httpx.Response) -> ApiError:
    """The ApiError for a refused reply, from its `{"error", "detail"}` body or its text."""
    code = response.reason_phrase.lower().replace(" ", "_") or f"http_{response.status_code}"
    detail = ""
    try:
        body = loads_json(response.content)
    except ValueError:
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("error"), str) and body["error"]:
            code = body["error"]
        if isinstance(body.get("detail"), str):
            detail = body["detail"]
        elif body.get("detail") is not None:
            detail = json.dumps(body["detail"])
    if not detail:
        detail = response.content.decode("utf-8", "replace") or "no reason given"
    detail = " ".join(detail.split())
    if len(detail) > 300:
        detail = detail[:297] + "..."
    return ApiError(response.status_code, code[:64], detail)


def upload_payload(
    client: httpx.Client,
    path_or_url: str,
    payload: bytes,
    *,
    headers: Mapping[str, str],
    policy: RetryPolicy,
    sleep: Sleep = time.sleep,
    stop: threading.Event | None = None,
    max_reply_bytes: int = 1 << 20,
    max_bytes_per_s: float | None = None,
) -> httpx.Response:
    """PUT PAYLOAD as application/octet-stream, retrying connection errors, timeouts and 5xx.

    A 408/429/5xx reply is retried after its `Retry-After` (or the policy's back-off). Any
    other reply, success or refusal, is returned (read, at most MAX_REPLY_BYTES) for the caller
    to interpret. Raises TransferError when the tries run out, Stopped once STOP is set.
    MAX_BYTES_PER_S, if given, paces the body so that the upload leaves the volunteer's link
    usable for other things.
    """
    if max_bytes_per_s is not None and not (math.isfinite(max_bytes_per_s) and max_bytes_per_s > 0):
        raise ClientError(f"the upload rate limit must be positive, not {max_bytes_per_s}")
    send_headers = {
        **headers,
        "Content-Type": "application/octet-stream",
        "Content-Length": str(len(payload)),
    }
    backoff = _Backoff(policy, sleep, f"uploading to {path_or_url}", stop)
    while True:
        content: bytes | Iterator[bytes] = payload
        if max_bytes_per_s is not None:
            content = _paced(payload, max_bytes_per_s, sleep, stop)
        try:
            r = _send(
                client,
                "PUT",
                path_or_url,
                content=content,
                headers=send_headers,
                max_bytes=max_reply_bytes,
                what=f"uploading to {path_or_url}",
            )
        except httpx.TransportError as exc:
            backoff.wait(_retry_cause(exc))
            continue
        if not _is_retryable(r.status_code):
            return r
        backoff.wait(_status_cause(r), parse_retry_after(r.headers.get("retry-after")))


def _paced(
    payload: bytes, bytes_per_s: float, sleep: Sleep, stop: threading.Event | None
) -> Iterator[bytes]:
    """PAYLOAD in chunks, sleeping after each one so the rate stays at most BYTES_PER_S."""
    view = memoryview(payload)
    for i in range(0, len(payload), _CHUNK):
        chunk = bytes(view[i : i + _CHUNK])
        began = time.monotonic()
        yield chunk
        lag = len(chunk) / bytes_per_s - (time.monotonic() - began)
        if lag > 0:
            sleep(lag)
        _check_stop(stop)


def request_json(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    json: Any = None,
    headers: Mapping[str, str] | None = None,
    policy: RetryPolicy,
    sleep: Sleep = time.sleep,
    stop: threading.Event | None = None,
    max_bytes: int = 1 << 20,
) -> Any:
    """Send a small JSON request and return the parsed JSON reply (at most MAX_BYTES of it).

    Retries like `upload_payload`; raises ApiError for a refusal (4xx other than 408/429, or
    any other non-2xx reply), TransferError when retries run out or the reply is not JSON,
    Stopped once STOP is set.
    """
    what = f"{method} {url}"
    kwargs: dict[str, Any] = {"headers": dict(headers or {})}
    if json is not None:
        kwargs["json"] = json
    backoff = _Backoff(policy, sleep, what, stop)
    while True:
        try:
            r = _send(client, method, url, max_bytes=max_bytes, what=what, **kwargs)
        except httpx.TransportError as exc:
            backoff.wait(_retry_cause(exc))
            continue
        if _is_retryable(r.status_code):
            backoff.wait(_status_cause(r), parse_retry_after(r.headers.get("retry-after")))
            continue
        if not r.is_success:
            raise api_error(r)
        try:
            return loads_json(r.content)
        except ValueError:
            raise TransferError(f"{what}: the coordinator's reply is not valid JSON") from None


def _describe(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__} ({text[:200]})"


def _status_cause(r: httpx.Response) -> str:
    return f"the coordinator answered {r.status_code} {r.reason_phrase}".rstrip()


def sha256_file(path: Path) -> str:
    """sha256 hex of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class _Restart(Exception):
    """The partial download is unusable; start it again from byte zero."""


def download_blob(
    client: httpx.Client,
    sha256: str,
    dest: Path,
    *,
    expected_size: int | None = None,
    max_bytes: int,
    policy: RetryPolicy,
    sleep: Sleep = time.sleep,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
) -> Path:
    """Download the blob SHA256 (`GET /v1/blobs/{sha256}`) to DEST, resuming after drops.

    Bytes go to `DEST.part`; after a dropped connection or a 5xx reply the next try asks for
    `Range: bytes=<have>-` and appends. A 200 reply to a range request starts over; a 206 must
    start exactly where the partial file ends. No more than MAX_BYTES (or EXPECTED_SIZE) bytes
    are ever written. The whole file's sha256 must equal SHA256, else it is deleted and fetched
    again (up to 3 times, or fewer if the policy allows fewer tries). The finished file is moved
    to DEST atomically; a DEST that already holds the right bytes is returned at once.
    Setting STOP abandons the download with Stopped, keeping the partial file for a resume.
    """
    if not _SHA256_HEX.fullmatch(sha256):
        raise ClientError(f"{sha256[:80]!r} is not a blob hash (64 lowercase hex digits)")
    limit = max_bytes
    if expected_size is not None:
        if expected_size > max_bytes:
            raise TransferError(
                f"blob {sha256[:12]} is {expected_size} bytes, more than the {max_bytes} allowed"
            )
        limit = expected_size
    dest = Path(dest)
    if dest.is_file() and dest.stat().st_size <= limit and sha256_file(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    what = f"downloading blob {sha256[:12]}"
    backoff = _Backoff(policy, sleep, what, stop)
    corrupt_limit = min(_CORRUPT_TRIES, policy.max_tries or _CORRUPT_TRIES)
    corrupt = 0
    while True:
        have = _file_size(part)
        if have > limit:
            _unlink(part)
            have = 0
        complete = expected_size is not None and have == expected_size
        cause, retry_after = "the connection closed before the whole blob arrived", None
        if not complete:
            try:
                complete = _fetch(client, sha256, part, have, limit, expected_size, progress, stop)
            except _Restart as exc:
                _unlink(part)
                cause = str(exc)
            except httpx.TransportError as exc:
                cause = _retry_cause(exc)
            except _Retry as exc:
                cause, retry_after = exc.cause, exc.retry_after
        if complete:
            if sha256_file(part) == sha256:
                os.replace(part, dest)
                return dest
            _unlink(part)
            corrupt += 1
            if corrupt >= corrupt_limit:
                raise TransferError(
                    f"{what}: the bytes received do not match their sha256 after {corrupt} tries"
                )
            cause = "the bytes received do not match their sha256"
        elif _file_size(part) > have:
            backoff.reset()
        backoff.wait(cause, retry_after)


class _Retry(Exception):
    """The coordinator asked to try again later (5xx, 408 or 429)."""

    def __init__(self, cause: str, retry_after: float | None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.retry_after = retry_after


def _fetch(
    client: httpx.Client,
    sha256: str,
    part: Path,
    have: int,
    limit: int,
    expected_size: int | None,
    progress: Progress | None,
    stop: threading.Event | None,
) -> bool:
    """One GET of the blob into PART from offset HAVE; True when the whole body arrived."""
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with client.stream("GET", f"/v1/blobs/{sha256}", headers=headers) as r:
        if r.status_code == 416 and have:
            m = _UNSATISFIED_RANGE.fullmatch(r.headers.get("content-range", ""))
            if m and int(m.group(1)) == have:
                return True
            raise _Restart("the coordinator refused to resume the partial download")
        if _is_retryable(r.status_code):
            raise _Retry(_status_cause(r), parse_retry_after(r.headers.get("retry-after")))
        if r.status_code == 200:
            offset, total = 0, _declared_length(r)
        elif r.status_code == 206 and have:
            offset, total = _content_range(r, have)
        else:
            if r.is_success:
                raise TransferError(f"downloading blob {sha256[:12]}: unexpected {r.status_code}")
            raise api_error(_detached(r, _read_error_body(r, MAX_ERROR_BODY)))
        if total is not None and total > limit:
            raise TransferError(
                f"blob {sha256[:12]} is {total} bytes, more than the {limit} allowed"
            )
        if total is not None and expected_size is not None and total != expected_size:
            raise TransferError(
                f"blob {sha256[:12]} is {total} bytes, but the manifest says {expected_size}"
            )
        shown_total = expected_size if expected_size is not None else (total or 0)
        with part.open("r+b" if offset else "wb") as f:
            f.seek(offset)
            f.truncate()
            done = _copy_body(r, f, offset, limit, sha256, progress, shown_total, stop)
            f.flush()
            os.fsync(f.fileno())
        return total is None or done == total


def _content_range(r: httpx.Response, have: int) -> tuple[int, int | None]:
    m = _CONTENT_RANGE.fullmatch(r.headers.get("content-range", ""))
    if not m or int(m.group(1)) != have or int(m.group(2)) < have:
        raise _Restart("the coordinator resumed the download at the wrong offset")
    total = None if m.group(3) == "*" else int(m.group(3))
    if total is not None and int(m.group(2)) >= total:
        raise _Restart("the coordinator sent an inconsistent Content-Range")
    length = _declared_length(r)
    if length is not None and length != int(m.group(2)) - have + 1:
        raise _Restart("the coordinator's Content-Length disagrees with its Content-Range")
    return have, total


def _copy_body(
    r: httpx.Response,
    f: BinaryIO,
    offset: int,
    limit: int,
    sha256: str,
    progress: Progress | None,
    total: int,
    stop: threading.Event | None,
) -> int:
    done = offset
    for chunk in r.iter_bytes():
        _check_stop(stop)
        if done + len(chunk) > limit:
            raise TransferError(f"blob {sha256[:12]} is more than the {limit} bytes allowed")
        f.write(chunk)
        done += len(chunk)
        if progress is not None:
            progress(done, total)
    return done
