"""Typed wrappers for the coordinator's HTTP API, version 1 (docs/API.md).

Each endpoint is one method that sends JSON or raw bytes through the retrying, size-bounded
transfers of `transfer.py` and checks the reply's types and bounds with a small pydantic model
(unknown fields are ignored, so a newer coordinator can add some). Volunteers only make
outbound requests (the design's trust model); the `transport` argument lets tests use
`httpx.MockTransport` and lets the demo route traffic through a fault-injecting proxy.
The round protocol it drives is DiLoCo's (Douillard et al. 2023, arXiv:2311.08105).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Literal, TypedDict, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from crowdtrain import hashcash
from crowdtrain.client.identity import MAX_MANIFEST_DOC_BYTES, coordinator_url
from crowdtrain.client.probe import DeviceInfo
from crowdtrain.client.transfer import (
    ApiError,
    ClientError,
    Progress,
    RetryPolicy,
    Sleep,
    Stopped,
    api_error,
    download_blob,
    interruptible_sleep,
    loads_json,
    request_json,
    tls_context,
    upload_payload,
)
from crowdtrain.config import canonical_json
from crowdtrain.robust.usefulness import Score

log = logging.getLogger(__name__)

SHA256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
CHECK_ID = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")]  # goes into a URL path
MAX_REPLY_BYTES = 1 << 20
MAX_STATUS_BYTES = 16 << 20
META_HEADER = "X-Crowdtrain-Meta"


class ProtocolError(ClientError):
    """The coordinator's reply has the wrong shape for this version of crowdtrain."""


class PeerBanned(ApiError):
    """The coordinator banned this volunteer (403 `banned`): stop, never retry.

    Its message is the coordinator's one sentence, e.g. "this peer is banned: <reason>".
    """

    def __init__(self, detail: str) -> None:
        super().__init__(403, "banned", detail)
        self.args = (detail,)


def _banned_or(exc: ApiError) -> ApiError:
    """EXC, or the PeerBanned it stands for when the coordinator says this peer is banned."""
    if exc.status == 403 and exc.code == "banned" and not isinstance(exc, PeerBanned):
        return PeerBanned(exc.detail)
    return exc


class _Retrying(TypedDict):
    """Keyword arguments of the retrying transfers in `transfer.py`."""

    policy: RetryPolicy
    sleep: Sleep
    stop: threading.Event | None


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


def _not_negative(value: float) -> float:
    return max(0.0, value)


class UpdateMsg(_Msg):
    """How to rebuild weights `weights` from the previous version's instead of downloading
    them: θ = weights `base` + decode(payload blob `payload`) in float32 (the run's
    ``broadcast`` codec), whose safetensors bytes must hash to `weights`; on any mismatch,
    download `weights` whole. The order's `moments` likewise: the second moments of blob
    `second_moments` plus first moments derived from the two θs and the inner steps of round
    `round` (``train.moments.first_moments``), hashing to `moments`."""

    base: SHA256
    payload: SHA256
    round: int = Field(ge=0)
    second_moments: SHA256 | None = None


class WorkOrderMsg(_Msg):
    """`POST /v1/work`: train from weights `weights` on `shard_ids` and upload by the deadline.

    `moments` (when not null) names the AdamW moments published with those weights, which the
    round's optimizer starts from (inner.optimizer_state "published")."""

    kind: Literal["work"]
    round: int = Field(ge=0)
    base_version: int = Field(ge=0)
    weights: SHA256
    update: UpdateMsg | None = None
    moments: SHA256 | None = None
    shard_ids: list[SHA256] = Field(min_length=1, max_length=100_000)
    seed: int = Field(ge=0)
    step_offset: int = Field(ge=0)
    budget: Literal["steps", "seconds"]
    max_steps: int = Field(ge=1, le=1_000_000_000)
    max_seconds: float = Field(gt=0.0, le=7 * 86_400.0, allow_inf_nan=False)
    deadline_in: float = Field(le=30 * 86_400.0, allow_inf_nan=False)
    max_payload_bytes: int = Field(ge=1, le=1 << 40)

    _clamp_deadline = field_validator("deadline_in")(_not_negative)


class PriorMsg(_Msg):
    """The `prior` of a verify message: the checked contribution was overlapped.

    Its first `steps` steps continued the target's order of round `round` while θ_base was on
    its way: from θ_s = weights `weights` − decode(payload blob `payload`), on that order's
    batches from batch `first_batch` (step offset `step_offset + first_batch`), AdamW starting
    from the moments `moments` published with `weights` (zeros when null).
    """

    round: int = Field(ge=0)
    base_version: int = Field(ge=0)
    weights: SHA256
    update: UpdateMsg | None = None
    moments: SHA256 | None = None
    payload: SHA256
    shard_ids: list[SHA256] = Field(min_length=1, max_length=100_000)
    seed: int = Field(ge=0)
    step_offset: int = Field(ge=0)
    first_batch: int = Field(ge=0, le=1_000_000_000)
    steps: int = Field(ge=1, le=1_000_000_000)


class _CheckMsg(_Msg):
    """What a check of peer `target`'s work names: its order's round, base weights (as a work
    order names them), shards, seed and step offset, and the check's id."""

    check_id: CHECK_ID
    target: str = Field(min_length=1, max_length=128)
    round: int = Field(ge=0)
    base_version: int = Field(ge=0)
    weights: SHA256
    update: UpdateMsg | None = None
    moments: SHA256 | None = None
    shard_ids: list[SHA256] = Field(min_length=1, max_length=100_000)
    seed: int = Field(ge=0)
    step_offset: int = Field(ge=0)


class VerifyOrderMsg(_CheckMsg):
    """`POST /v1/work`: replay peer `target`'s work order exactly and upload Δ' (a spot-check).

    Train exactly `steps` steps from weights `weights` on the batches that `target` was given
    (the sampler is keyed by the target's peer id), then `PUT /v1/verifications/{check_id}`.
    With `prior`, the first `prior.steps` of them are the previous round's overlapped work,
    rebased onto `weights` (see PriorMsg and `Volunteer.replay`).
    """

    kind: Literal["verify"]
    steps: int = Field(ge=1, le=1_000_000_000)
    max_payload_bytes: int = Field(ge=1, le=1 << 40)
    prior: PriorMsg | None = None


class ScoreOrderMsg(_CheckMsg):
    """`POST /v1/work`: score peer `target`'s contribution (payload blob `payload`) and submit
    the four losses (usefulness scoring on a volunteer, `defence.scoring = "peer"`).

    The losses are those of θ (weights `weights`) and of θ − Δ on `target`'s training batches
    of this order from batch `assigned_batch` on (as many as `defence.score_batch_size`
    sequences take; the sampler is keyed by the target) and on held-out batch
    `heldout_batch` of the validation shards, then `PUT /v1/scores/{check_id}`
    (`crowdtrain.client.work.score_contribution`)."""

    kind: Literal["score"]
    assigned_batch: int = Field(ge=0, le=1_000_000_000)
    heldout_batch: int = Field(ge=0, le=1 << 30)
    payload: SHA256
    max_payload_bytes: int = Field(ge=1, le=1 << 40)


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


WorkReply = WorkOrderMsg | VerifyOrderMsg | ScoreOrderMsg | WaitMsg | FinishedMsg


class RegisterMsg(_Msg):
    """`POST /v1/register`: this volunteer's peer id and bearer token."""

    peer_id: str = Field(min_length=1, max_length=128)
    token: str = Field(min_length=1, max_length=512, pattern=r"^[\x21-\x7e]+$")


class ChallengeMsg(_Msg):
    """`GET /v1/register/challenge`: a proof-of-work challenge and its difficulty."""

    challenge: str = Field(min_length=1, max_length=200)
    bits: int = Field(ge=0, le=hashcash.MAX_BITS)
    expires_in: float = Field(ge=0.0, le=86_400.0, allow_inf_nan=False)


# Registration refusals that a (new) solved challenge answers.
_POW_CODES = frozenset({"pow_required", "pow_expired", "pow_spent", "bad_pow"})


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


class VerificationReceiptMsg(_Msg):
    """`PUT /v1/verifications/{check_id}`: the replay arrived."""

    check_id: str = Field(min_length=1, max_length=128)
    received: Literal[True]


class ContributionMeta(BaseModel):
    """The `X-Crowdtrain-Meta` header of an upload.

    `overlap_steps` counts the round's steps trained speculatively before θ_base arrived (on
    the previous order's batches, then rebased); they continued the order of round
    `overlap_round` (-1 when there are none) from its batch `overlap_first_batch`, starting
    from that round's base minus the Δ this volunteer uploaded for it. With those, a verifier
    can replay the contribution from public data (see `VerifyOrderMsg.prior`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    base_version: int = Field(ge=0)
    samples: int = Field(ge=0)
    tokens: int = Field(ge=0)
    steps: int = Field(ge=0)
    train_loss: float = Field(allow_inf_nan=False)
    overlap_steps: int = Field(0, ge=0)
    overlap_round: int = Field(-1, ge=-1)
    overlap_first_batch: int = Field(0, ge=0)
    compute_s: float = Field(0.0, ge=0, le=1e7, allow_inf_nan=False)
    wall_s: float = Field(0.0, ge=0, le=1e7, allow_inf_nan=False)


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
    `Stopped` instead. BASE_URL must be https:// unless it is this machine or INSECURE is set
    (`coordinator_url`); HTTPS trusts the system's certificate authorities and CA_CERT's.
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
        insecure: bool = False,
        ca_cert: Path | None = None,
    ) -> None:
        self.base_url = coordinator_url(base_url, insecure=insecure)
        self._token: str | None = None
        self.policy = policy if policy is not None else RetryPolicy()
        self.stop = stop
        if sleep is None:
            sleep = time.sleep if stop is None else interruptible_sleep(stop)
        self._sleep = sleep
        self._client = httpx.Client(
            base_url=self.base_url,
            transport=transport,
            verify=tls_context(ca_cert),
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            headers={"User-Agent": _user_agent(), "Accept-Encoding": "identity"},
        )
        self.token = token

    @property
    def token(self) -> str | None:
        """The bearer token; once set, every request carries it (downloads of payloads that
        are private to this volunteer or the checks it is assigned need it)."""
        return self._token

    @token.setter
    def token(self, value: str | None) -> None:
        self._token = value
        if value:
            self._client.headers["Authorization"] = f"Bearer {value}"
        else:
            self._client.headers.pop("Authorization", None)

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

    def _retrying(self) -> _Retrying:
        """The retry settings that every transfer of this client uses."""
        return {"policy": self.policy, "sleep": self._sleep, "stop": self.stop}

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
        try:
            return request_json(
                self._client,
                method,
                path,
                json=body,
                headers=self._auth() if auth else None,
                max_bytes=max_bytes,
                **self._retrying(),
            )
        except ApiError as exc:
            raise _banned_or(exc) from None

    def register(
        self,
        name: str,
        invite: str | None,
        device: DeviceInfo | Mapping[str, Any],
        *,
        identity: str | None = None,
        key: str | None = None,
    ) -> tuple[str, str]:
        """`POST /v1/register`; returns (peer_id, token) and keeps the token for later calls.
        With `key` (``identity.registration_key``) a retry after a lost answer gets the same
        peer back.

        When the run asks for a proof of work, fetches a challenge, solves it (stopping when
        the stop event is set) and registers again; an expired or spent challenge is replaced
        once more."""
        if not 1 <= len(name) <= 64:
            raise ClientError(f"the volunteer name must be 1 to 64 characters, not {len(name)}")
        dev = device.to_json() if isinstance(device, DeviceInfo) else dict(device)
        body: dict[str, Any] = {"name": name, "invite": invite, "device": dev}
        if identity is not None:
            body["identity"] = identity
        if key is not None:
            body["key"] = key
        for attempt in range(3):
            try:
                reply = self._json("POST", "/v1/register", body=body)
                break
            except ApiError as exc:
                if exc.code not in _POW_CODES or attempt == 2:
                    raise
            body["pow"] = self._solve_challenge()
        msg = _validate(TypeAdapter(RegisterMsg), reply, "POST /v1/register")
        self.token = msg.token
        return msg.peer_id, msg.token

    def _solve_challenge(self) -> dict[str, str]:
        """`GET /v1/register/challenge`, solved: the `pow` member of a registration."""
        reply = self._json("GET", "/v1/register/challenge")
        msg = _validate(TypeAdapter(ChallengeMsg), reply, "GET /v1/register/challenge")
        log.info("solving the run's proof of work (%d bits)", msg.bits)
        try:
            nonce = hashcash.solve(msg.challenge, msg.bits, self.stop)
        except hashcash.Stopped:
            raise Stopped("stopped while solving the registration's proof of work") from None
        return {"challenge": msg.challenge, "nonce": nonce}

    def manifest(self) -> dict[str, Any]:
        """`GET /v1/manifest`: the signed manifest document (check it with `verify_manifest`)."""
        doc = self._json("GET", "/v1/manifest", max_bytes=MAX_MANIFEST_DOC_BYTES)
        if not isinstance(doc, dict):
            raise ProtocolError("the coordinator's reply to GET /v1/manifest is not an object")
        return doc

    def work(self) -> WorkReply:
        """`POST /v1/work`: a work order, a spot-check to replay, a contribution to score, a
        request to wait, or the news that the run is over."""
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
        try:
            return download_blob(
                self._client,
                sha256,
                dest,
                expected_size=expected_size,
                max_bytes=max_bytes,
                progress=progress,
                **self._retrying(),
            )
        except ApiError as exc:
            raise _banned_or(exc) from None

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
        ApiError if the coordinator refuses the contribution (PeerBanned if this peer is banned).
        """
        if not isinstance(meta, ContributionMeta):
            try:
                meta = ContributionMeta.model_validate(dict(meta))
            except ValidationError as exc:
                raise ClientError(f"bad contribution metadata ({_describe(exc)})") from None
        reply = self._put(
            f"/v1/contributions/{int(round)}",
            payload,
            meta.model_dump(),
            what="contribution",
            max_payload_bytes=max_payload_bytes,
            max_mbps=max_mbps,
        )
        return _validate(TypeAdapter(ReceiptMsg), reply, f"PUT /v1/contributions/{int(round)}")

    def upload_verification(
        self,
        check_id: str,
        payload: bytes,
        steps: int,
        *,
        max_payload_bytes: int | None = None,
        max_mbps: float | None = None,
    ) -> VerificationReceiptMsg:
        """`PUT /v1/verifications/{check_id}`: upload the replayed Δ' of a spot-check.

        Retries like `upload`; raises ApiError if the coordinator refuses it (409: the check is
        not, or no longer, assigned to this peer).
        """
        try:
            TypeAdapter(CHECK_ID).validate_python(check_id)
        except ValidationError:
            raise ClientError(f"{check_id[:80]!r} is not a spot-check id") from None
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ClientError(f"a replay's step count must be an integer >= 0, not {steps!r}")
        what = f"PUT /v1/verifications/{check_id}"
        reply = self._put(
            f"/v1/verifications/{check_id}",
            payload,
            {"steps": steps},
            what="replay",
            max_payload_bytes=max_payload_bytes,
            max_mbps=max_mbps,
        )
        msg = _validate(TypeAdapter(VerificationReceiptMsg), reply, what)
        if msg.check_id != check_id:
            raise ProtocolError(
                f"the coordinator acknowledged spot-check {msg.check_id[:40]!r} instead of "
                f"{check_id!r}"
            )
        return msg

    def upload_score(self, check_id: str, score: Score) -> VerificationReceiptMsg:
        """`PUT /v1/scores/{check_id}`: submit the usefulness score a score order asked for.
        Raises ApiError if the coordinator refuses it (409: not, or no longer, ours)."""
        try:
            TypeAdapter(CHECK_ID).validate_python(check_id)
        except ValidationError:
            raise ClientError(f"{check_id[:80]!r} is not a check id") from None
        body = {
            "assigned_before": score.assigned_before,
            "assigned_after": score.assigned_after,
            "heldout_before": score.heldout_before,
            "heldout_after": score.heldout_after,
            "assigned_se": score.assigned_se,
        }
        what = f"PUT /v1/scores/{check_id}"
        reply = self._json("PUT", f"/v1/scores/{check_id}", body=body, auth=True)
        msg = _validate(TypeAdapter(VerificationReceiptMsg), reply, what)
        if msg.check_id != check_id:
            raise ProtocolError(
                f"the coordinator acknowledged check {msg.check_id[:40]!r} instead of {check_id!r}"
            )
        return msg

    def _put(
        self,
        path: str,
        payload: bytes,
        meta: Mapping[str, Any],
        *,
        what: str,
        max_payload_bytes: int | None,
        max_mbps: float | None,
    ) -> Any:
        """PUT a codec payload with its meta header, with retries; the parsed JSON reply."""
        if max_payload_bytes is not None and len(payload) > max_payload_bytes:
            raise ClientError(
                f"the {what} is {len(payload)} bytes, more than the work order's "
                f"{max_payload_bytes}; use a smaller codec"
            )
        headers = {**self._auth(), META_HEADER: canonical_json(dict(meta)).decode()}
        r = upload_payload(
            self._client,
            path,
            payload,
            headers=headers,
            max_reply_bytes=MAX_REPLY_BYTES,
            max_bytes_per_s=None if max_mbps is None else max_mbps * 1e6 / 8,
            **self._retrying(),
        )
        if not r.is_success:
            raise _banned_or(api_error(r))
        try:
            return loads_json(r.content)
        except ValueError:
            raise ProtocolError(
                f"the coordinator's reply to PUT {path} is not valid JSON"
            ) from None
