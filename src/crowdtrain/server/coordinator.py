"""The coordinator: drives the sans-IO round protocol with real time, storage and payloads.

Every round decision is the protocol core's (`crowdtrain.protocol`); this module only turns
requests into events, decodes and stores payloads, and persists what the protocol decided:
after every accepted contribution the protocol snapshot is committed together with the
contribution row (so a receipt means durable), and after every closed round the new weights, the
outer optimizer state and the aggregate are written as blobs with a version row. A restart with
the same state directory restores the protocol exactly from those records (crash safety).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from crowdtrain import codec
from crowdtrain.client.signing import load_or_create_signing_key, sign_manifest
from crowdtrain.client.work import overlap_start, replay_check
from crowdtrain.config import ConfigError, RunConfig, config_hash
from crowdtrain.data import Shard, ShardStore, ensure_packed_for, eval_batches
from crowdtrain.data.probe import ShardProbe
from crowdtrain.faults import crash_point
from crowdtrain.models import initial_state, param_shapes
from crowdtrain.protocol import (
    Accepted,
    Banned,
    ContributionMalformed,
    ContributionSubmitted,
    DeadlineChanged,
    Decision,
    Event,
    Flagged,
    PeerBanned,
    PeerJoined,
    PeerRecord,
    PeerSeen,
    PeerUnbanned,
    Rejected,
    RoundClosed,
    RoundProtocol,
    RunFinished,
    RunPaused,
    RunResumed,
    ScoreOrder,
    ScoreSubmitted,
    Tick,
    Unknown,
    VerificationSubmitted,
    VerifyOrder,
    Wait,
    WorkOrder,
    WorkRequested,
)
from crowdtrain.protocol.events import PriorWork
from crowdtrain.robust import DeltaSource, DictSource
from crowdtrain.robust.usefulness import Score
from crowdtrain.server.admission import (
    Admission,
    AdmissionConfig,
    AdmissionRefused,
    RateLimiter,
    name_is_printable,
)
from crowdtrain.server.dashboard import (
    SampleCache,
    Timeline,
    device_label,
    rejection_rows,
    round_rows,
    volunteer_rows,
)
from crowdtrain.server.manifest import build_manifest
from crowdtrain.server.metrics import RunMetrics
from crowdtrain.server.tracking import MultiTracker, Tracker
from crowdtrain.store import (
    AlreadyExists,
    BlobNotFound,
    BlobTooLarge,
    ContributionRow,
    DirBlobStore,
    PeerRow,
    SqliteStateStore,
    VersionRow,
)
from crowdtrain.tensorfile import TensorFile
from crowdtrain.train import LocalTrainer, evaluate
from crowdtrain.train.moments import second_only

log = logging.getLogger(__name__)

MAX_META_BYTES = 4096
AdminEvent = PeerBanned | PeerUnbanned | RunPaused | RunResumed | DeadlineChanged


#: The subject a client's registration key is stored under (its sha256 after this prefix),
#: beside identity providers' ``iss#sub`` subjects.
KEY_SUBJECT = "key:"

#: Refused uploads a peer may make at once, and then one per this many seconds.
REFUSALS_BURST = 8
REFUSAL_EVERY_S = 60.0


class Problem(Exception):
    """A request the coordinator refuses: HTTP status, machine code and one sentence."""

    def __init__(
        self, status: int, code: str, detail: str, retry_after: float | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.retry_after = retry_after  # seconds, sent as Retry-After (429 and 503)


@dataclass(frozen=True)
class ContributionMeta:
    """What a volunteer claims about its upload (checked by the protocol and validators)."""

    base_version: int
    samples: int
    tokens: int
    steps: int
    train_loss: float
    overlap_steps: int = 0
    overlap_round: int = -1
    overlap_first_batch: int = 0
    compute_s: float = 0.0  # compute and wall seconds since the volunteer's previous upload
    wall_s: float = 0.0  # (what it says: shown on the dashboard, never used for decisions)


def token_hash(token: str) -> str:
    """Tokens are stored as their sha256 only."""
    return hashlib.sha256(token.encode()).hexdigest()


def put_tensors(blobs: DirBlobStore, group: Mapping[str, torch.Tensor] | bytes) -> str:
    """Store named tensors (streamed in the safetensors form θ is published in) or raw bytes as
    one durable blob; return its id."""
    if isinstance(group, bytes):
        return blobs.put_bytes(group)
    file = TensorFile(group)
    return blobs.put_stream(file.chunks(), max_bytes=file.size)[0]


def _put_group(blobs: DirBlobStore, name: str, group: Mapping[str, torch.Tensor] | bytes) -> str:
    """`put_tensors` for one group of a close, with the chaos suite's kill points around it."""
    crash_point(f"close.before_blob.{name}")
    sha = put_tensors(blobs, group)
    crash_point(f"close.after_blob.{name}")
    return sha


def _peer_json(p: PeerRecord) -> dict[str, Any]:
    """What the status document and the dashboard both show of a peer."""
    return {
        "name": p.name,
        "online": p.online,
        "samples": p.samples,
        "accepted": p.accepted,
        "rejected": p.rejected,
        "flagged": p.flagged,
        "reputation": round(p.standing.score, 4),
        "strikes": round(p.standing.strikes, 3),
        "banned": p.standing.banned,
        "ban_reason": p.standing.ban_reason,
    }


class _LazyPayload:
    """A stored payload decoded fragment by fragment on demand (validated when it arrived).

    The file is mapped on first read, so restoring a snapshot opens nothing until the round
    closes; aggregation never holds a decoded fp32 copy of a contribution.
    """

    def __init__(
        self,
        path: Path | None,
        shapes: Mapping[str, tuple[int, ...]],
        validated: codec.PayloadHeader | None = None,
    ) -> None:
        self._path, self._shapes, self._validated = path, shapes, validated
        self._source: codec.PayloadSource | None = None
        self._opening = threading.Lock()  # on-arrival work and the close may both read it

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        with self._opening:
            if self._source is None:
                if self._path is None:
                    raise FileNotFoundError("the contribution's payload blob is gone")
                self._source = codec.PayloadSource.from_file(
                    self._path, self._shapes, validated=self._validated
                )
            source = self._source
        return source.read(name, start, stop)

    def close(self) -> None:
        with self._opening:
            if self._source is not None:
                self._source.close()
                self._source = None


class Coordinator:
    """One run's coordinator state: stores, manifest, protocol, and the lock around them."""

    def __init__(
        self,
        config: RunConfig,
        state_dir: Path,
        *,
        admission: AdmissionConfig | None = None,
        admin_token: str | None = None,
        clock: Callable[[], float] = time.time,
        eval_batch_count: int = 4,
        trackers: list[Tracker] | None = None,
        workers: int = 1,
    ) -> None:
        self.config = config
        self.state_dir = state_dir
        self.admission_config = admission if admission is not None else AdmissionConfig()
        self.admin_token = admin_token
        self.clock = clock
        self.lock = threading.RLock()
        self.last_close_timing: dict[str, float] = {}
        self.metrics = RunMetrics()
        self.timeline = Timeline()
        self.samples = SampleCache(config.model)
        self.trackers = MultiTracker(trackers or [])
        self._closing: dict[str, float] = {}  # timings of the close in progress
        self._compute: dict[tuple[str, int], tuple[float, float]] = {}  # (peer, round) -> s
        self._devices: dict[str, str] = {}  # peer id -> device label, for the dashboard
        self._sources: list[_LazyPayload] = []
        self._replays: list[VerifyOrder] = []  # spot-checks the coordinator runs itself
        self._replaying: threading.Thread | None = None
        # On-arrival work (norms, fingerprints, scores of accepted contributions), off the
        # round's critical path; every event that may close a round waits for it first.
        self.workers = max(1, workers)
        self.on_arrival = workers > 0  # workers=0: everything at the close (for comparison)
        self._arrival_lock = threading.Lock()
        self.arrival_s = 0.0  # seconds of on-arrival work done so far, all threads together
        self._arrivals = ThreadPoolExecutor(self.workers, "crowdtrain-arrival")
        # New versions' evaluations run apart from the on-arrival work: an evaluation takes the
        # lock to store its loss, and an event that may close a round waits, under the lock,
        # for the on-arrival work; queued behind an evaluation, that work would never start
        # (the deadlock the chaos suite found: tests/chaos, a restart with a version to evaluate).
        self._evaluating = ThreadPoolExecutor(1, "crowdtrain-eval")
        self._pending: list[Future[None]] = []
        self._evals: list[Future[None]] = []  # new versions' evaluations, after their commit
        # Writing a close's blobs: mostly waiting on the disk, so threads beyond the workers.
        self._persisting = ThreadPoolExecutor(min(4, max(1, workers)), "crowdtrain-persist")
        state_dir.mkdir(parents=True, exist_ok=True)
        # The state holds token hashes, the fingerprint and admission secrets and every
        # volunteer's payload: only the coordinator's user may enter it.
        state_dir.chmod(0o700)
        self.blobs = DirBlobStore(state_dir / "blobs")
        self.store = SqliteStateStore(state_dir / "state.sqlite")
        for name in ("state.sqlite", "state.sqlite-wal", "state.sqlite-shm"):
            if (state_dir / name).exists():
                (state_dir / name).chmod(0o600)
        self._check_config()
        self.shapes = param_shapes(config.model)
        self.max_payload_bytes = codec.max_payload_bytes(self.shapes, config.codec)
        data_dir = Path(config.data.dir)
        self.data = ensure_packed_for(config.data)
        shards = ShardStore(data_dir)
        for sha in self.data.train_ids + self.data.val_ids:
            if not self.blobs.has(sha):
                self.blobs.put_bytes(shards.load(sha, verify=True).tobytes())
        val = {sha: shards.load(sha) for sha in self.data.val_ids}
        self.shard_store = shards
        self.probe = ShardProbe.of_run(shards.load, self.data.val_ids, config)
        self.secret = self._secret()
        self.admission = Admission(self.admission_config, self._admission_secret())
        # Refused uploads a peer may make: REFUSALS_BURST, then one a REFUSAL_EVERY_S; beyond
        # that its uploads get 429 before their bodies are read.
        self._refusals = RateLimiter(REFUSALS_BURST, 1.0 / REFUSAL_EVERY_S)
        self.evals = eval_batches(
            val,
            self.data.val_ids,
            batch_size=16,
            context=config.model.context,
            n_batches=eval_batch_count,
            seed=config.data.seed,
        )
        self.protocol = self._load_protocol()
        # replays the coordinator owed before a restart (checks it confirms) are owed again
        self._replays = [
            replace(c.order, peer_id="")
            for c in self.protocol.checks.values()
            if c.confirming and isinstance(c.order, VerifyOrder)
        ]
        latest = self.store.latest_version()
        if latest is not None and latest.metrics.get("eval_loss", 0.0) is None:
            # stopped between storing a version and evaluating it
            self._evals.append(
                self._evaluating.submit(self._evaluate, latest, self.protocol.params)
            )
        key = load_or_create_signing_key(state_dir / "coordinator.key")
        initial = self.store.get_version(0)
        assert initial is not None
        manifest = build_manifest(config, self.data, initial.weights_sha, self.shapes)
        self.manifest = sign_manifest(manifest, key)
        if self.store.get_json("manifest") != self.manifest:
            with self.store.transaction():  # for `crowdtrain export`, which has no corpus
                self.store.put_json("manifest", self.manifest)

    # --- start-up ------------------------------------------------------------------------

    def _check_config(self) -> None:
        wanted = config_hash(self.config)
        stored = self.store.get_json("config_hash")
        if stored is None:
            self.store.put_json("config_hash", wanted)
            self.store.put_json("config", self.config.model_dump(mode="json"))
        elif stored != wanted:
            raise ConfigError(
                f"the state directory {self.state_dir} belongs to a run with config "
                f"{str(stored)[:12]}, not {wanted[:12]}; use the original config or a new --state"
            )

    def _stored_secret(self, key: str, make: Callable[[], Any]) -> Any:
        """The run's secret KEY: made once by MAKE, kept in the store across restarts."""
        stored = self.store.get_json(key)
        if stored is None:
            stored = make()
            with self.store.transaction():
                self.store.put_json(key, stored)
        return stored

    def _secret(self) -> int:
        """The key of copy-detection fingerprints: random per run, never shown to peers."""
        return int(self._stored_secret("fingerprint_secret", lambda: secrets.randbits(62)))

    def _admission_secret(self) -> bytes:
        """The key that signs proof-of-work challenges: random per run, kept across restarts
        so that a challenge issued before one still admits after it."""
        return bytes.fromhex(self._stored_secret("admission_secret", lambda: secrets.token_hex(32)))

    def _new_protocol(self, params: Mapping[str, torch.Tensor]) -> RoundProtocol:
        return RoundProtocol(
            self.config,
            params,
            self.data.train_ids,
            self.clock,
            probe=self.probe,
            secret=self.secret,
        )

    def _tensors(self, sha: str | None) -> dict[str, torch.Tensor]:
        if sha is None:
            return {}
        return dict(load_safetensors(self.blobs.read(sha)))

    def _source(self, ref: str, header: codec.PayloadHeader | None = None) -> DeltaSource:
        """A stored payload as a source; with the HEADER its validation returned, opening it
        skips the data checks (a payload restored from the store is checked again)."""
        path = self.blobs.local_path(ref) if self.blobs.has(ref) else None
        source = _LazyPayload(path, self.shapes, header)
        self._sources.append(source)
        return source

    def _release_sources(self) -> None:
        """Unmap the payloads a closed round read (a later read would map them again)."""
        for source in self._sources:
            source.close()
        self._sources.clear()

    def _load_protocol(self) -> RoundProtocol:
        proto = self._restore_protocol()
        proto.workers = self.workers
        return proto

    def _restore_protocol(self) -> RoundProtocol:
        latest = self.store.latest_version()
        if latest is None:
            theta0 = initial_state(self.config.model)
            sha = put_tensors(self.blobs, theta0)
            metrics = {"eval_loss": evaluate(self.config.model, theta0, self.evals)}
            crash_point("start.before_version0")
            with self.store.transaction():
                self.store.add_version(VersionRow(0, -1, sha, None, None, self.clock(), metrics))
            return self._new_protocol(theta0)
        snapshot = self.store.get_json("protocol")
        tensors = {
            "params": self._tensors(latest.weights_sha),
            "outer": self._tensors(latest.optimizer_sha),
            "aggregate": self._tensors(latest.aggregate_sha),
            "fingerprints": self._tensors(latest.metrics.get("fingerprints_sha")),
            "moments": self._tensors(latest.metrics.get("moments_sha")),
            "broadcast": self._tensors(latest.metrics.get("residual_sha")),
        }
        if snapshot is None or snapshot.get("version") != latest.version:
            proto = self._new_protocol(tensors["params"])
            proto.outer.load_state_dict(tensors["outer"])
            proto.moments = tensors["moments"]
            proto.broadcast.residual = tensors["broadcast"]
            proto.version = latest.version
            return proto
        log.info("resuming at version %d, round %d", latest.version, snapshot["round"]["number"])
        return RoundProtocol.restore(
            self.config,
            snapshot,
            tensors,
            self.data.train_ids,
            self.clock,
            self._source,
            probe=self.probe,
            secret=self.secret,
        )

    # --- requests ------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the on-arrival workers (what they were doing is recomputed at the close)."""
        self._arrivals.shutdown(wait=True, cancel_futures=True)
        self._persisting.shutdown(wait=True, cancel_futures=True)
        self._evaluating.shutdown(wait=True, cancel_futures=True)

    def _timed(self, job: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        try:
            crash_point("arrival.analysis")
            job()
        finally:
            with self._arrival_lock:
                self.arrival_s += time.perf_counter() - t0

    def settle(self) -> None:
        """Wait for the background work so far: the on-arrival work of the contributions
        accepted, and the evaluation of the versions stored."""
        self._settle_arrivals()
        evals, self._evals = self._evals, []
        for job in evals:
            try:
                job.result()
            except Exception:  # the version stays without its loss; the log says why
                log.exception("evaluating a new version failed")

    def _settle_arrivals(self) -> None:
        pending, self._pending = self._pending, []
        for job in pending:
            try:
                job.result()
            except Exception:  # the close computes whatever a failed job left out
                log.exception("on-arrival work failed")

    def _handle(self, event: Event) -> list[Decision]:
        """Hand `event` to the protocol (the caller holds the lock), timing a round's close.
        Before an event that may close the round, the on-arrival work is waited for, so that
        the close finds it done (had it not, the close would compute what is missing: the
        waiting saves work, it is not needed for correctness)."""
        if not isinstance(event, (PeerSeen, PeerJoined, WorkRequested)):
            self._settle_arrivals()
        opened_at = self.protocol.opened_at
        t0 = time.perf_counter()
        decisions = self.protocol.handle(event)
        if any(isinstance(d, RoundClosed) for d in decisions):
            self._closing = {"aggregation_s": time.perf_counter() - t0, "opened_at": opened_at}
        return decisions

    def register_challenge(self) -> dict[str, Any]:
        """A proof-of-work challenge for `register` (docs/API.md); 404 when the run needs none."""
        if not self.admission_config.pow_bits:
            raise Problem(404, "no_pow", "this run needs no proof of work to register")
        return self.admission.challenges.issue(self.clock())

    def register(
        self,
        name: str,
        device: Mapping[str, Any],
        *,
        host: str | None = None,
        invite: str | None = None,
        pow_challenge: str | None = None,
        pow_nonce: str | None = None,
        identity: str | None = None,
        key: str | None = None,
    ) -> dict[str, str]:
        """Admit a volunteer through the door (``server.admission``); return its id and bearer
        token (stored hashed). Display names are unique (`name_key`); with an identity provider,
        a known account gets its own peer back with a new token, unless it is banned. Without
        one, a client's registration `key` does the same: registering again with it (after an
        answer lost to a crash) returns the same peer, whatever the name."""
        if not name_is_printable(name):
            raise Problem(400, "bad_name", "a volunteer name must be printable text")
        token = secrets.token_urlsafe(32)
        now = self.clock()
        with self.lock:
            try:
                subject, seed = self.admission.check(
                    host,
                    now,
                    invite=invite,
                    pow_challenge=pow_challenge,
                    pow_nonce=pow_nonce,
                    identity=identity,
                )
            except AdmissionRefused as exc:
                raise Problem(exc.status, exc.code, exc.detail, exc.retry_after) from None
            if subject is None and key is not None:  # the client's own registration key
                subject = KEY_SUBJECT + hashlib.sha256(key.encode()).hexdigest()
            known = self.store.peer_by_subject(subject) if subject is not None else None
            if known is not None:
                if known.banned:
                    reason = known.ban_reason or "no reason"
                    raise Problem(403, "banned", f"this account's peer is banned: {reason}")
                with self.store.transaction():
                    self.store.replace_token(known.peer_id, token_hash(token))
                return {"peer_id": known.peer_id, "token": token}
            if self.store.peer_by_name(name) is not None:
                raise Problem(409, "name_taken", "another volunteer has this name; pick another")
            peer_id = "p-" + secrets.token_hex(8)
            row = PeerRow(peer_id, name, token_hash(token), dict(device), now, now, subject=subject)
            try:
                with self.store.transaction():
                    self.store.add_peer(row)
                    crash_point("register.in_transaction")
                crash_point("register.after_commit")
            except AlreadyExists:
                raise Problem(409, "name_taken", "another volunteer has this name") from None
            self.admission.admitted(now)
            # The row above is durable; the protocol learns of the peer now, and again from
            # the row at its first authenticated call if a restart comes before the next
            # snapshot (so registering costs one row, not a rewrite of the whole snapshot).
            self._handle(PeerJoined(peer_id, name, seed=seed))
            if seed:  # a seed's standing is not in its row: keep it across a restart
                self._persist_snapshot()
        return {"peer_id": peer_id, "token": token}

    def authenticate(self, token: str | None) -> str:
        """The peer id behind a bearer token, or Problem(401)."""
        if not token:
            raise Problem(401, "no_token", "this call needs an Authorization: Bearer token")
        row = self.store.peer_by_token_hash(token_hash(token))
        if row is None:
            raise Problem(401, "bad_token", "the bearer token is not valid for this run")
        if row.banned:
            raise Problem(403, "banned", f"this peer is banned: {row.ban_reason or 'no reason'}")
        with self.lock:
            if row.peer_id not in self.protocol.peers:
                self._handle(PeerJoined(row.peer_id, row.name))
        return row.peer_id

    def work(self, peer_id: str) -> dict[str, Any]:
        """The next thing for a volunteer to do, as the JSON of docs/API.md."""
        with self.lock:
            decisions = self._handle(WorkRequested(peer_id))
            # A wait (or the run's end) changes nothing durable: only the peer's online flag
            # and last_seen, which a heartbeat does not persist either. Rewriting the protocol
            # snapshot for it cost O(peers) under the lock on every poll, and waiting volunteers
            # poll every 0.25 s (bench/load_volunteers.py).
            if not all(isinstance(d, (Wait, RunFinished, Unknown)) for d in decisions):
                self._persist(decisions)
            now = self.clock()
            for d in decisions:
                if isinstance(d, WorkOrder):
                    crash_point("work.after_order")
                    return {
                        "kind": "work",
                        **self._work_json(d),
                        "budget": d.budget,
                        "max_steps": d.max_steps,
                        "max_seconds": d.max_seconds,
                        "deadline_in": max(0.0, d.deadline - now),
                        "max_payload_bytes": self.max_payload_bytes,
                    }
                if isinstance(d, VerifyOrder):
                    return {
                        "kind": "verify",
                        **self._check_json(d),
                        "steps": d.steps,
                        "prior": self._prior_json(d.prior),
                    }
                if isinstance(d, ScoreOrder):
                    return {
                        "kind": "score",
                        **self._check_json(d),
                        "assigned_batch": d.assigned_batch,
                        "heldout_batch": d.heldout_batch,
                        "payload": d.payload_ref,
                    }
                if isinstance(d, Banned):
                    raise Problem(403, "banned", f"this peer is banned: {d.reason}")
                if isinstance(d, Wait):
                    return {"kind": "wait", "retry_after": d.retry_after, "reason": d.reason}
                if isinstance(d, RunFinished):
                    return self._finished()
                if isinstance(d, Unknown):
                    raise Problem(401, "unknown_peer", d.reason)
        return {"kind": "wait", "retry_after": 1.0, "reason": "no work right now"}

    def _check_json(self, check: VerifyOrder | ScoreOrder) -> dict[str, Any]:
        """What a verify and a score message share: the check, its target and the order."""
        return {
            "check_id": check.check_id,
            "target": check.target,
            **self._work_json(check),
            "max_payload_bytes": self.max_payload_bytes,
        }

    def _work_json(self, work: WorkOrder | VerifyOrder | ScoreOrder | PriorWork) -> dict[str, Any]:
        """What names a stream of training batches and its start: round, base weights (by
        blob id), shards, seed, step offset."""
        version = self.store.get_version(work.base_version)
        assert version is not None
        return {
            "round": work.round,
            "base_version": work.base_version,
            "weights": version.weights_sha,
            "update": self._update_json(version),
            "moments": version.metrics.get("moments_sha"),
            "shard_ids": list(work.shard_ids),
            "seed": work.seed,
            "step_offset": work.step_offset,
        }

    def _update_json(self, version: VersionRow) -> dict[str, Any] | None:
        """How a volunteer holding the previous version's θ rebuilds this one (compressed
        broadcast, ``protocol.broadcast``): that θ's blob, the update's, the round whose close
        made it and the second moments published with it (from which, and the two θs, it
        derives the first moments, ``train.moments.first_moments``)."""
        update = version.metrics.get("update_sha")
        if not isinstance(update, str):
            return None
        previous = self.store.get_version(version.version - 1)
        if previous is None:
            return None
        return {
            "base": previous.weights_sha,
            "payload": update,
            "round": version.round,
            "second_moments": version.metrics.get("second_moments_sha"),
        }

    def _prior_json(self, prior: PriorWork | None) -> dict[str, Any] | None:
        """The `prior` of a verify message: where an overlapped contribution's start comes from."""
        if prior is None:
            return None
        return {
            **self._work_json(prior),
            "payload": prior.payload_ref,
            "first_batch": prior.first_batch,
            "steps": prior.steps,
        }

    def _finished(self) -> dict[str, Any]:
        latest = self.store.latest_version()
        assert latest is not None
        return {"kind": "finished", "version": latest.version, "weights": latest.weights_sha}

    def existing_receipt(self, peer_id: str, round_number: int) -> dict[str, Any] | None:
        """The receipt of an already accepted upload (uploads are idempotent per round)."""
        row = self.store.get_contribution(peer_id, round_number)
        if row is None or row.status != "accepted":
            return None
        return {"receipt": row.receipt, "weight": row.weight}

    def submit(
        self, peer_id: str, round_number: int, meta: ContributionMeta, payload_sha: str, size: int
    ) -> dict[str, Any]:
        """Validate a stored payload, hand it to the protocol, persist, and return the receipt.

        The payload is checked completely here (crowdtrain.codec.validate) but not decoded; the
        aggregator decodes it fragment by fragment from the blob when the round closes.
        """
        try:
            payload = self.blobs.read(payload_sha, max_bytes=self.max_payload_bytes)
            header = codec.validate(payload, self.shapes, max_bytes=self.max_payload_bytes)
        except BlobNotFound:  # the same bytes, refused for another peer meanwhile, were dropped
            raise Problem(503, "retry", "the upload was lost; send it again", 1.0) from None
        except (codec.PayloadError, BlobTooLarge) as exc:
            with self.lock:
                self._persist(self._handle(ContributionMalformed(peer_id, round_number, str(exc))))
            self._record_rejection(peer_id, round_number, meta, payload_sha, size, str(exc))
            self._refused(peer_id, payload_sha)
            raise Problem(400, "bad_payload", str(exc)) from None
        del payload
        crash_point("submit.after_validate")
        event = ContributionSubmitted(
            peer_id=peer_id,
            round=round_number,
            base_version=meta.base_version,
            delta=self._source(payload_sha, header),
            samples=meta.samples,
            tokens=meta.tokens,
            steps=meta.steps,
            train_loss=meta.train_loss,
            payload_bytes=size,
            ref=payload_sha,
            overlap_steps=meta.overlap_steps,
            overlap_round=meta.overlap_round,
            overlap_first_batch=meta.overlap_first_batch,
        )
        with self.lock:
            decisions = self._handle(event)
            row = None
            for d in decisions:
                if isinstance(d, Accepted):
                    row = ContributionRow(
                        peer_id,
                        round_number,
                        d.receipt,
                        payload_sha,
                        meta.samples,
                        meta.tokens,
                        meta.steps,
                        meta.train_loss,
                        d.weight,
                        size,
                        self.clock(),
                        "accepted",
                        None,
                    )
            if row is not None:
                self._compute[(peer_id, round_number)] = (meta.compute_s, meta.wall_s)
            # The contribution row, a round it closed and the snapshot commit together.
            self._persist(decisions, row)
            current, finished = self.protocol.round, self.protocol.finished
            job = None
            if row is not None and not any(isinstance(d, RoundClosed) for d in decisions):
                job = self.protocol.analysis_job(peer_id, round_number)
            if job is not None and self.on_arrival:
                self._pending.append(self._arrivals.submit(self._timed, job))
        for d in decisions:
            if isinstance(d, Accepted):
                return {"receipt": d.receipt, "weight": d.weight}
            if isinstance(d, Rejected):
                reason = d.reason
                if d.code == "closed" and round_number > current and not finished:
                    reason = f"round {round_number} has not opened yet; the open round is {current}"
                self._record_rejection(peer_id, round_number, meta, payload_sha, size, reason)
                self._refused(peer_id, payload_sha)
                status = 409 if d.code in ("closed", "no_order", "bad_base") else 400
                raise Problem(status, d.code, reason)
            if isinstance(d, Banned):
                raise Problem(403, "banned", f"this peer is banned: {d.reason}")
            if isinstance(d, Unknown):
                raise Problem(401, "unknown_peer", d.reason)
        raise Problem(500, "internal", "the protocol gave no decision for this contribution")

    def check_blob_access(self, sha: str, token: str | None) -> None:
        """Problem(403) unless the blob SHA is public or TOKEN may read it. A volunteer's
        contribution payload is readable only by its author, the verifiers assigned to check
        or score it (its payload, or the prior payload of an overlapped replay) and the admin;
        weights, moments, updates, data shards and replays are public."""
        authors = self.store.blob_authors(sha)
        if not authors:
            return
        if token and self.admin_token and secrets.compare_digest(token, self.admin_token):
            return
        row = self.store.peer_by_token_hash(token_hash(token)) if token else None
        if row is not None and not row.banned:
            if row.peer_id in authors:
                return
            with self.lock:
                for check in self.protocol.checks.values():
                    order, refs = check.order, {check.ref}
                    if isinstance(order, ScoreOrder):
                        refs.add(order.payload_ref)
                    elif order.prior is not None:  # an overlapped replay starts from it
                        refs.add(order.prior.payload_ref)
                    if row.peer_id in check.assigned and sha in refs:
                        return
        raise Problem(
            403,
            "private_blob",
            "this blob is a volunteer's contribution: only its author, the verifiers assigned "
            "to it and the admin may read it (send the bearer token)",
        )

    def expect_upload(self, peer_id: str) -> None:
        """Problem(429) when PEER_ID has had too many uploads refused lately: asked before an
        upload's body is read, so a peer that floods refused uploads is slowed before it can
        fill the disk or the link (honest volunteers see a refusal a run, if any)."""
        with self.lock:
            wait = self._refusals.wait(peer_id, self.clock())
        if wait:
            raise Problem(
                429, "too_many_refusals", "too many of this peer's uploads were refused", wait
            )

    def _refused(self, peer_id: str, payload_sha: str) -> None:
        """Count a refused upload against PEER_ID, and keep its bytes only if an accepted
        contribution is the same blob (blobs are content-addressed); the row keeps the hash
        and the reason as evidence."""
        with self.lock:
            self._refusals.take(peer_id, self.clock())
            if not self.store.blob_accepted(payload_sha):
                self.blobs.delete(payload_sha)

    def expect_verification(self, peer_id: str, check_id: str) -> None:
        """Problem(409) unless CHECK_ID is an open spot-check assigned to PEER_ID: asked before
        a replay's body is read, so an upload for no check stores nothing."""
        with self.lock:
            check = self.protocol.checks.get(check_id)
            if check is None or not isinstance(check.order, VerifyOrder):
                raise Problem(409, "no_check", f"no open spot-check has id {check_id}")
            if peer_id not in check.assigned:
                raise Problem(409, "no_check", "this check is not assigned to this peer")

    def verification(
        self, peer_id: str, check_id: str, steps: int, payload_sha: str, size: int
    ) -> dict[str, Any]:
        """A trusted peer's replay of a spot-checked work order (docs/SECURITY.md, stage g)."""
        try:
            payload = self.blobs.read(payload_sha, max_bytes=self.max_payload_bytes)
            header = codec.validate(payload, self.shapes, max_bytes=self.max_payload_bytes)
        except (codec.PayloadError, BlobTooLarge) as exc:
            self._refused(peer_id, payload_sha)
            raise Problem(400, "bad_payload", str(exc)) from None
        del payload
        event = VerificationSubmitted(check_id, peer_id, self._source(payload_sha, header), steps)
        with self.lock:
            decisions = self._handle(event)
            self._persist(decisions)
        for d in decisions:
            if isinstance(d, Unknown):  # the check ended while the body came
                self._refused(peer_id, payload_sha)
                raise Problem(409, "no_check", d.reason)
        return {"check_id": check_id, "received": True}

    def score(self, peer_id: str, check_id: str, score: Score) -> dict[str, Any]:
        """A trusted peer's usefulness score of another's contribution (a score order)."""
        with self.lock:
            decisions = self._handle(ScoreSubmitted(check_id, peer_id, score))
            self._persist(decisions)
        for d in decisions:
            if isinstance(d, Unknown):
                raise Problem(409, "no_check", d.reason)
        return {"check_id": check_id, "received": True}

    def _record_rejection(
        self, peer_id: str, rnd: int, meta: ContributionMeta, sha: str, size: int, reason: str
    ) -> None:
        row = ContributionRow(
            peer_id,
            rnd,
            "",
            sha,
            meta.samples,
            meta.tokens,
            meta.steps,
            meta.train_loss,
            0.0,
            size,
            self.clock(),
            "rejected",
            reason,
        )
        with self.store.transaction():
            self.store.record_contribution(row)

    def tick(self) -> None:
        """Let time pass: close a round whose deadline came with its quorum met; start the
        next spot-check replay the coordinator runs itself (`defence.spot_check = coordinator`)."""
        with self.lock:
            self._persist(self._handle(Tick()))
            peers = list(self.protocol.peers.values())
            online = sum(p.online for p in peers)
            banned = sum(p.standing.banned for p in peers)
            state = (self.protocol.round, self.protocol.paused, self.protocol.finished)
            idle = self._replaying is None or not self._replaying.is_alive()
            if self._replays and idle:
                order = self._replays.pop(0)
                self._replaying = threading.Thread(target=self._replay, args=(order,), daemon=True)
                self._replaying.start()
        self.metrics.peers(online=online, registered=len(peers), banned=banned)
        self.metrics.state(*state)
        self.timeline.sample(self.clock(), online, *self.metrics.bytes_totals())

    def _shard_map(self, order: VerifyOrder) -> dict[str, Shard]:
        """The shards a replay of `order` reads (its own and its prior's), from the store."""
        prior = () if order.prior is None else order.prior.shard_ids
        return self.shard_store.load_many([*order.shard_ids, *prior])

    def _base_of(self, base_version: int) -> dict[str, torch.Tensor]:
        """θ of a version with the AdamW moments published with it (if any): where its work
        orders start."""
        version = self.store.get_version(base_version)
        assert version is not None
        moments = self._tensors(version.metrics.get("moments_sha"))
        return {**self._tensors(version.weights_sha), **moments}

    def _prior_start(self, prior: PriorWork) -> dict[str, torch.Tensor]:
        """Where a checked contribution's overlapped steps began: θ_prior − decode(payload),
        with θ_prior's published moments."""
        theta = self._base_of(prior.base_version)
        payload = self.blobs.read(prior.payload_ref, max_bytes=self.max_payload_bytes)
        return overlap_start(
            theta, codec.decode(payload, self.shapes, max_bytes=self.max_payload_bytes)
        )

    def _replay(self, order: VerifyOrder) -> None:
        """Recompute a spot-checked work order here and hand the result to the protocol."""
        try:
            trainer = LocalTrainer(self.config.model, self.config.inner)
            result = replay_check(
                trainer.train,
                order,
                self._base_of(order.base_version),
                self._shard_map(order),
                self.config,
                None if order.prior is None else self._prior_start(order.prior),
            )
            event = VerificationSubmitted(
                order.check_id, "", DictSource(result.delta), result.steps
            )
            with self.lock:
                self._persist(self._handle(event))
        except Exception:  # a failed replay must not take the coordinator down
            log.exception("the spot-check replay %s failed", order.check_id)

    def admin(self, event: AdminEvent) -> None:
        """An administrator's action (pause, resume, ban, unban, deadline), made durable."""
        with self.lock:
            try:
                decisions = self._handle(event)
            except ValueError as exc:
                raise Problem(400, "bad_request", str(exc)) from None
            for d in decisions:
                if isinstance(d, Unknown):
                    raise Problem(404, "unknown_peer", "there is no peer with this id in the run")
            if decisions:
                self._persist(decisions)
            else:
                with self.store.transaction():  # the peer row and the snapshot together
                    if isinstance(event, PeerUnbanned):
                        self.store.set_banned(event.peer_id, False, None)
                    self._persist_snapshot()
        log.warning("administrator: %s", event)

    def heartbeat(self, peer_id: str) -> dict[str, Any]:
        """Liveness: the volunteer is here; tell it where the run is."""
        now = self.clock()
        self.store.touch_peer(peer_id, now)
        with self.lock:
            self._handle(PeerSeen(peer_id))
            return {
                "round": self.protocol.round,
                "version": self.protocol.version,
                "deadline_in": max(0.0, self.protocol.deadline - now),
            }

    # --- persistence ---------------------------------------------------------------------

    def _persist_snapshot(self) -> None:
        self.store.put_json("protocol", self.protocol.snapshot())
        crash_point("snapshot.written")

    def _persist(self, decisions: list[Decision], accepted: ContributionRow | None = None) -> None:
        """Commit what `decisions` changed in one transaction: the accepted contribution's row
        (once per peer and round), the versions of closed rounds, and the protocol snapshot.

        Blobs are written before the transaction (an orphan blob is harmless). Payload blobs are
        kept: they are what volunteers sent, for audit and for restoring an open round.
        """
        if not decisions:
            return
        try:
            versions = [self._close_version(d) for d in decisions if isinstance(d, RoundClosed)]
            new = accepted is not None and (
                self.existing_receipt(accepted.peer_id, accepted.round) is None
            )
            with self.store.transaction():
                if new and accepted is not None:
                    self.store.record_contribution(accepted)
                for version in versions:
                    self.store.add_version(version)
                for d in decisions:
                    if isinstance(d, Banned):
                        self.store.set_banned(d.peer_id, True, d.reason)
                self._persist_snapshot()
                if new:
                    crash_point("receipt.in_transaction")
                if versions:
                    crash_point("close.in_transaction")
            if new:
                crash_point("receipt.after_commit")
            if versions:
                crash_point("close.after_commit")
        except Exception:
            # The protocol moved on in memory but not on disk: return to what the store holds,
            # so that a retry (or the next tick) starts from the durable state.
            self.protocol = self._load_protocol()
            raise
        for version in versions:
            if version.metrics["eval_loss"] is None:
                params = self.protocol.params  # replaced at the next close, never changed
                self._evals.append(self._evaluating.submit(self._evaluate, version, params))
            else:
                self._report_close(version)
        for d in decisions:
            if isinstance(d, Accepted) and new and accepted is not None:
                self.metrics.contribution(True, samples=accepted.samples)
            elif isinstance(d, Rejected):
                self.metrics.contribution(False, reason=d.code)
            elif isinstance(d, Flagged):
                self.metrics.contribution(False, reason=d.stage)
            if isinstance(d, Banned):
                log.warning("peer %s banned: %s", d.peer_id, d.reason)
            elif isinstance(d, VerifyOrder) and not d.peer_id:
                self._replays.append(d)
        if versions:
            self._release_sources()

    def _evaluate(self, version: VersionRow, params: Mapping[str, torch.Tensor]) -> None:
        """The held-out loss of a stored version, recorded with it and then reported."""
        t0 = time.perf_counter()
        loss = evaluate(self.config.model, params, self.evals)
        metrics = {**version.metrics, "eval_loss": loss}
        crash_point("eval.before_commit")
        with self.lock:
            with self.store.transaction():
                self.store.set_version_metrics(version.version, metrics)
            crash_point("eval.after_commit")
            self.last_close_timing["eval_s"] = time.perf_counter() - t0
        self._report_close(replace(version, metrics=metrics))

    def _report_close(self, version: VersionRow) -> None:
        """A closed round's numbers to the log, Prometheus and the experiment trackers."""
        m = version.metrics
        log.info("round %d closed: eval loss %.4f", version.round, m["eval_loss"])
        self.metrics.round_closed(
            round=version.round,
            version=version.version,
            eval_loss=m["eval_loss"],
            train_loss=m["train_loss"],
            aggregation_s=m["aggregation_s"] or 0.0,
            duration_s=m["round_s"],
        )
        if self.trackers.trackers:
            numbers = {
                "eval_loss": m["eval_loss"],
                "train_loss": m["train_loss"],
                "samples": m["samples"],
                "bytes_up": m["bytes_up"],
                "contributors": len(m["contributors"]),
                "aggregation_s": m["aggregation_s"] or 0.0,
                "round_s": m["round_s"],
                "peers_online": sum(p.online for p in self.protocol.peers.values()),
            }
            if m["compute_utilization"] is not None:
                numbers["compute_utilization"] = m["compute_utilization"]
            self.trackers.log(numbers, version.round)

    def _close_version(self, closed: RoundClosed) -> VersionRow:
        """Write a closed round's weights, optimizer state and aggregate; return its version row."""
        crash_point("close.aggregated")
        tensors = self.protocol.tensors()
        t0 = time.perf_counter()
        # What a restart needs, stored as blobs at once (`_put_blobs`); empty state is not stored.
        groups: dict[str, Mapping[str, torch.Tensor] | bytes] = {
            "weights": tensors["params"],
            "outer": tensors["outer"],
            "aggregate": tensors["aggregate"],
            "fingerprints": tensors["fingerprints"],
        }
        optional = {
            "moments": tensors["moments"],
            "second": second_only(tensors["moments"]),
            "residual": tensors["broadcast"],
        }
        groups.update({name: t for name, t in optional.items() if t})
        if self.protocol.broadcast.update is not None:
            groups["update"] = self.protocol.broadcast.update
        stored = self._put_blobs(groups)
        t1 = time.perf_counter()
        self.last_close_timing = {"persist_s": t1 - t0}
        eval_loss = None  # evaluated after the commit, off the round's critical path
        if self.protocol.finished:  # nothing waits on the last version: its loss comes with it
            eval_loss = evaluate(self.config.model, tensors["params"], self.evals)
            self.last_close_timing["eval_s"] = time.perf_counter() - t1
        compute = [self._compute.pop((p, closed.round), (0.0, 0.0)) for p in closed.contributors]
        wall = sum(w for _, w in compute)
        self._compute = {k: v for k, v in self._compute.items() if k[1] > closed.round}
        metrics = {
            "train_loss": closed.train_loss,
            "eval_loss": eval_loss,
            "samples": closed.samples,
            "bytes_up": closed.payload_bytes,
            "contributors": list(closed.contributors),
            "weights": list(closed.weights),
            "tau": closed.tau,
            "fingerprints_sha": stored["fingerprints"],
            "moments_sha": stored.get("moments"),
            "second_moments_sha": stored.get("second"),
            "residual_sha": stored.get("residual"),
            "update_sha": stored.get("update"),
            "aggregation_s": self._closing.get("aggregation_s"),
            "round_s": self.clock() - self._closing.get("opened_at", self.clock()),
            "compute_utilization": min(1.0, sum(c for c, _ in compute) / wall) if wall else None,
        }
        return VersionRow(
            closed.new_version,
            closed.round,
            stored["weights"],
            stored["outer"],
            stored["aggregate"],
            self.clock(),
            metrics,
        )

    def _put_blobs(
        self, groups: Mapping[str, Mapping[str, torch.Tensor] | bytes]
    ) -> dict[str, str]:
        """Store each group (named tensors, or raw bytes) as one durable blob; return the ids.
        The groups go to the persist threads at once, so one blob's hashing overlaps another's
        writes and fsync, and tensors are streamed (`TensorFile`), never copied into one
        ``bytes`` first: at a close this is θ, the aggregate, the moments and the residual."""
        futures = {
            name: self._persisting.submit(_put_group, self.blobs, name, group)
            for name, group in groups.items()
        }
        return {name: future.result() for name, future in futures.items()}

    # --- views ---------------------------------------------------------------------------

    def dashboard(self, since: int | None = None) -> dict[str, Any]:
        """The document the dashboard polls (docs/API.md, "Dashboard"); with `since`, its
        `rounds` hold only the rounds that made versions after that one."""
        with self.lock:
            proto = self.protocol
            names = {p.peer_id: p.name for p in proto.peers.values()}
            peers = [
                {"peer_id": p.peer_id, **_peer_json(p), "last_seen": p.last_seen}
                for p in proto.peers.values()
            ]
            rnd = {
                "number": proto.round,
                "total": self.config.rounds.total,
                "opened_at": proto.opened_at,
                "deadline": proto.deadline,
                "quorum": self.config.rounds.quorum,
                "round_seconds": proto.round_seconds,
                "assigned": sorted(names.get(p, p) for p in proto.assigned()),
                "submitted": sorted(names.get(p, p) for p in proto.submitted()),
            }
            rejections = rejection_rows(proto.verdicts, names)
            head = {
                "finished": proto.finished,
                "paused": proto.paused,
                "version": proto.version,
            }
            version = proto.version

            def params() -> dict[str, torch.Tensor]:
                with self.lock:
                    return {k: v.clone() for k, v in self.protocol.params.items()}

        initial = self.store.get_version(0)
        assert initial is not None
        versions = self.store.list_versions(after=-1 if since is None else since)
        bytes_in, bytes_out = self.metrics.bytes_totals()
        sample = self.samples.get(version, params)
        return {
            "run": self.config.name,
            "now": self.clock(),
            "started_at": initial.created_at,
            **head,
            "round": rnd,
            "initial_eval_loss": initial.metrics.get("eval_loss"),
            "since": since,
            "rounds": round_rows(versions, initial.created_at),
            **self.timeline.to_json(),
            "totals": {
                "bytes_in": bytes_in,
                "bytes_out": bytes_out,
                "samples": sum(p["samples"] for p in peers),
                "contributions_accepted": sum(p["accepted"] for p in peers),
                "contributions_rejected": sum(p["rejected"] for p in peers),
                "contributions_flagged": sum(p["flagged"] for p in peers),
            },
            "volunteers": volunteer_rows(peers, self._device_labels(names)),
            "rejections": rejections,
            "sample": None if sample is None else asdict(sample),
        }

    def _device_labels(self, peer_ids: Iterable[str]) -> dict[str, str]:
        """What each peer said about its machine, as the dashboard shows it; read from the
        store only when a peer is new to this cache (devices do not change)."""
        if any(p not in self._devices for p in peer_ids):
            self._devices = {r.peer_id: device_label(r.device) for r in self.store.list_peers()}
        return self._devices

    def status(self) -> dict[str, Any]:
        """The public status document."""
        with self.lock:
            peers = [
                {
                    **_peer_json(p),
                    "failures": p.standing.failures,
                    "verified": p.standing.verified,
                }
                for p in self.protocol.peers.values()
            ]
            names = {p.peer_id: p.name for p in self.protocol.peers.values()}
            verdicts = [
                {**asdict(v), "peer": names.get(v.peer_id, v.peer_id)}
                for v in self.protocol.verdicts[-200:]
            ]
            rnd, version, finished = (
                self.protocol.round,
                self.protocol.version,
                self.protocol.finished,
            )
        versions = self.store.list_versions()
        rounds = [
            {
                "round": v.round,
                "version": v.version,
                "contributors": len(v.metrics.get("contributors", [])),
                "samples": v.metrics.get("samples", 0),
                "train_loss": v.metrics.get("train_loss"),
                "eval_loss": v.metrics.get("eval_loss"),
                "bytes_up": v.metrics.get("bytes_up", 0),
            }
            for v in versions
            if v.version > 0
        ]
        return {
            "initial_eval_loss": versions[0].metrics.get("eval_loss") if versions else None,
            "run": self.config.name,
            "round": rnd,
            "version": version,
            "finished": finished,
            "peers": peers,
            "rounds": rounds,
            "verdicts": verdicts,
        }
