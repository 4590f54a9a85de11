"""Typed wrappers for the coordinator's HTTP API, version 1 (docs/API.md).

Each endpoint is one method that sends JSON or raw bytes through the retrying, size-bounded
transfers of `transfer.py` and checks the reply's types and bounds with a small pydantic model
(unknown fields are ignored, so a newer coordinator can add some). Volunteers only make
outbound requests (the design's trust model); the `transport` argument lets tests use
`httpx.MockTransport` and lets the demo route traffic through a fault-injecting proxy.
The round protocol it drives is DiLoCo's (Douillard et al. 2023, arXiv:2311.08105).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from crowdtrain.client.identity import MAX_MANIFEST_DOC_BYTES, normalize_url
from crowdtrain.client.probe import DeviceInfo
from crowdtrain.client.transfer import (
    ClientError,
    Progress,
    RetryPolicy,
    Sleep,
    api_error,
    download_blob,
    interruptible_sleep,
    loads_json,
    request_json,
    upload_payload,
)
from crowdtrain.config import canonical_json

SHA256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
MAX_REPLY_BYTES = 1 << 20
MAX_STATUS_BYTES = 16 << 20
META_HEADER = "X-Crowdtrain-Meta"


class ProtocolError(ClientError):
    """The coordinator's reply has the wrong shape for this version of crowdtrain."""


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


def _not_negative(value: float) -> float:
    return max(0.0, value)


class WorkOrderMsg(_Msg):
    """`POST /v1/work`: train from weights `weights` on `shard_ids` and upload by the deadline."""

    kind: Literal["work"]
    round: int = Field(ge=0)
    base_version: int = Field(ge=0)
    weights: SHA256
    shard_ids: list[SHA256] = Field(min_length=1, max_length=100_000)
    seed: int = Field(ge=0)
    step_offset: int = Field(ge=0)
    budget: Literal["steps", "seconds"]
    max_steps: int = Field(ge=1, le=1_000_000_000)
    max_seconds: float = Field(gt=0.0, le=7 * 86_400.0, allow_inf_nan=False)
    deadline_in: float = Field(le=30 * 86_400.0, allow_inf_nan=False)
    max_payload_bytes: int = Field(ge=1, le=1 << 40)

    _clamp_deadline = field_validator("deadline_in")(_not_negative)


class WaitMsg(_Msg):
    """`POST /v1/work`: no work now; ask again after `retry_after` seconds."""

    kind: Literal["wait"]
    retry_after: float = Field(ge=0.0, le=86_400.0, allow_inf_nan=False)
    reason: str = Field(max_length=1000)


class FinishedMsg(_Msg):
    """`POST /v1/work`: the run is over; `weights` is the final model."""

    kind: Literal["finished"]
    version: int = Field(ge=0)
    weights: SHA256


WorkReply = WorkOrderMsg | WaitMsg | FinishedMsg


class RegisterMsg(_Msg):
    """`POST /v1/register`: this volunteer's peer id and bearer token."""

    peer_id: str = Field(min_length=1, max_length=128)
    token: str = Field(min_length=1, max_length=512, pattern=r"^[\x21-\x7e]+$")


class HeartbeatMsg(_Msg):
    """`POST /v1/heartbeat`: the current round, model version and time left in the round."""

    round: int = Field(ge=0)
    version: int = Field(ge=0)
    deadline_in: float = Field(le=30 * 86_400.0, allow_inf_nan=False)

    _clamp_deadline = field_validator("deadline_in")(_not_negative)


class ReceiptMsg(_Msg):
    """`PUT /v1/contributions/{round}`: the contribution is durable."""

    receipt: str = Field(min_length=1, max_length=512)
    weight: float = Field(ge=0.0, allow_inf_nan=False)


class ContributionMeta(BaseModel):
    """The `X-Crowdtrain-Meta` header of an upload."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    base_version: int = Field(ge=0)
    samples: int = Field(ge=0)
    tokens: int = Field(ge=0)
    steps: int = Field(ge=0)
    train_loss: float = Field(allow_inf_nan=False)


_WORK_REPLY: TypeAdapter[WorkReply] = TypeAdapter(Annotated[WorkReply, Field(discriminator="kind")])

M = TypeVar("M")


def _describe(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return f"{where}: {err['msg'].lower()}"


def _validate(adapter: TypeAdapter[M], data: Any, what: str) -> M:
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        raise ProtocolError(
            f"the coordinator's reply to {what} is malformed ({_describe(exc)}); "
            "it may run a different crowdtrain version"
        ) from None


def _user_agent() -> str:
    try:
        return f"crowdtrain/{version('crowdtrain')}"
    except PackageNotFoundError:
        return "crowdtrain"


class CoordinatorApi:
    """A client of one coordinator: one method per endpoint, with retries and size bounds.

    Every call retries by POLICY, sleeping with SLEEP (by default `time.sleep`, or a wait on
    STOP when given). Once STOP is set, a call that would wait or is moving bytes raises
    `Stopped` instead.
    """

    def __init__(
        self,
        base_url: str,
        *,
        transport: httpx.BaseTransport | None = None,
        token: str | None = None,
        policy: RetryPolicy | None = None,
        sleep: Sleep | None = None,
        timeout: float = 30.0,
        stop: threading.Event | None = None,
    ) -> None:
        self.base_url = normalize_url(base_url)
        self.token = token
        self.policy = policy if policy is not None else RetryPolicy()
        self.stop = stop
        if sleep is None:
            sleep = time.sleep if stop is None else interruptible_sleep(stop)
        self._sleep = sleep
        self._client = httpx.Client(
            base_url=self.base_url,
            transport=transport,
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            headers={"User-Agent": _user_agent(), "Accept-Encoding": "identity"},
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> CoordinatorApi:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _auth(self) -> dict[str, str]:
        if not self.token:
            raise ClientError("this volunteer has no token yet; register with the coordinator")
        return {"Authorization": f"Bearer {self.token}"}

    def _json(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        auth: bool = False,
        max_bytes: int = MAX_REPLY_BYTES,
    ) -> Any:
        return request_json(
            self._client,
            method,
            path,
            json=body,
            headers=self._auth() if auth else None,
            policy=self.policy,
            sleep=self._sleep,
            stop=self.stop,
            max_bytes=max_bytes,
        )

    def register(
        self, name: str, invite: str | None, device: DeviceInfo | Mapping[str, Any]
    ) -> tuple[str, str]:
        """`POST /v1/register`; returns (peer_id, token) and keeps the token for later calls."""
        if not 1 <= len(name) <= 64:
            raise ClientError(f"the volunteer name must be 1 to 64 characters, not {len(name)}")
        dev = device.to_json() if isinstance(device, DeviceInfo) else dict(device)
        reply = self._json(
            "POST", "/v1/register", body={"name": name, "invite": invite, "device": dev}
        )
        msg = _validate(TypeAdapter(RegisterMsg), reply, "POST /v1/register")
        self.token = msg.token
        return msg.peer_id, msg.token

    def manifest(self) -> dict[str, Any]:
        """`GET /v1/manifest`: the signed manifest document (check it with `verify_manifest`)."""
        doc = self._json("GET", "/v1/manifest", max_bytes=MAX_MANIFEST_DOC_BYTES)
        if not isinstance(doc, dict):
            raise ProtocolError("the coordinator's reply to GET /v1/manifest is not an object")
        return doc

    def work(self) -> WorkReply:
        """`POST /v1/work`: a work order, a request to wait, or the news that the run is over."""
        reply = self._json("POST", "/v1/work", auth=True)
        return _validate(_WORK_REPLY, reply, "POST /v1/work")

    def heartbeat(self) -> HeartbeatMsg:
        """`POST /v1/heartbeat`: tell the coordinator this volunteer is alive."""
        reply = self._json("POST", "/v1/heartbeat", auth=True)
        return _validate(TypeAdapter(HeartbeatMsg), reply, "POST /v1/heartbeat")

    def status(self) -> dict[str, Any]:
        """`GET /v1/status`: the public run status (a JSON object)."""
        reply = self._json("GET", "/v1/status", max_bytes=MAX_STATUS_BYTES)
        if not isinstance(reply, dict):
            raise ProtocolError("the coordinator's reply to GET /v1/status is not an object")
        return reply

    def download(
        self,
        sha256: str,
        dest: Path,
        max_bytes: int,
        progress: Progress | None = None,
        *,
        expected_size: int | None = None,
    ) -> Path:
        """`GET /v1/blobs/{sha256}` into DEST, resumable and verified (see `download_blob`)."""
        return download_blob(
            self._client,
            sha256,
            dest,
            expected_size=expected_size,
            max_bytes=max_bytes,
            policy=self.policy,
            sleep=self._sleep,
            stop=self.stop,
            progress=progress,
        )

    def upload(
        self,
        round: int,
        payload: bytes,
        meta: ContributionMeta | Mapping[str, Any],
        *,
        max_payload_bytes: int | None = None,
        max_mbps: float | None = None,
    ) -> ReceiptMsg:
        """`PUT /v1/contributions/{round}`: upload a codec payload; returns the receipt.

        MAX_MBPS (megabits per second), if given, caps the upload rate. Raises ClientError if
        PAYLOAD is larger than MAX_PAYLOAD_BYTES (the work order's cap) or META is malformed,
        ApiError if the coordinator refuses the contribution.
        """
        if max_payload_bytes is not None and len(payload) > max_payload_bytes:
            raise ClientError(
                f"the contribution is {len(payload)} bytes, more than the work order's "
                f"{max_payload_bytes}; use a smaller codec"
            )
        if not isinstance(meta, ContributionMeta):
            try:
                meta = ContributionMeta.model_validate(dict(meta))
            except ValidationError as exc:
                raise ClientError(f"bad contribution metadata ({_describe(exc)})") from None
        headers = {**self._auth(), META_HEADER: canonical_json(meta.model_dump()).decode()}
        what = f"PUT /v1/contributions/{round}"
        r = upload_payload(
            self._client,
            f"/v1/contributions/{int(round)}",
            payload,
            headers=headers,
            policy=self.policy,
            sleep=self._sleep,
            stop=self.stop,
            max_reply_bytes=MAX_REPLY_BYTES,
            max_bytes_per_s=None if max_mbps is None else max_mbps * 1e6 / 8,
        )
        if not r.is_success:
            raise api_error(r)
        try:
            reply = loads_json(r.content)
        except ValueError:
            raise ProtocolError(f"the coordinator's reply to {what} is not valid JSON") from None
        return _validate(TypeAdapter(ReceiptMsg), reply, what)
