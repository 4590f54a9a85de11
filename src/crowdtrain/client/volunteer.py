"""The volunteer's HTTP driver: join, pin the manifest, then drive `VolunteerMachine` until the
run ends.

The logic of a volunteer — orders, training, overlap and rebase, encoding, replays, attacks for
testing defences — is the sans-IO machine of `client/machine.py`, shared with the in-process
swarm and the discrete-event simulator. This module only carries out its decisions with real
I/O: requests through `CoordinatorApi` (retrying, resumable, size-bounded transfers), blobs
verified by sha256 and cached on disk, `LocalTrainer` on this machine's cores, overlapped
training in a background thread that a spot-check replay pauses (Streaming DiLoCo's overlap,
Douillard et al. 2025, arXiv:2501.18512), heartbeats, and the live statistics the `join`
command shows.

A replay runs on a trainer of its own, so pausing overlapped training in the middle of a call
keeps that call's optimizer state (a replay of it later stays bit-exact) while the replay
trains. With AdamW fresh for every training call the replay is bit-exact on the same hardware
and thread count (BOINC-style recomputation spot-checks, Anderson, J. Grid Computing 2020).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from crowdtrain import codec
from crowdtrain.adversary import ATTACKS, Attacker
from crowdtrain.client import events as ve
from crowdtrain.client.api import (
    CoordinatorApi,
    FinishedMsg,
    PeerBanned,
    ScoreOrderMsg,
    UpdateMsg,
    VerifyOrderMsg,
    WaitMsg,
    WorkOrderMsg,
)
from crowdtrain.client.identity import (
    ClientState,
    forget_key,
    load_state,
    registration_key,
    save_state,
    verify_manifest,
)
from crowdtrain.client.machine import VolunteerMachine, heartbeat_interval
from crowdtrain.client.probe import DeviceInfo
from crowdtrain.client.transfer import ApiError, ClientError
from crowdtrain.client.work import TrainFn, overlap_start
from crowdtrain.config import RunConfig
from crowdtrain.data.atomic import atomic_write_bytes
from crowdtrain.protocol.broadcast import apply_update, weights_bytes
from crowdtrain.robust.usefulness import Scorers
from crowdtrain.train import Contribution, LocalTrainer
from crowdtrain.train.moments import derive_first, validate

log = logging.getLogger(__name__)

Order = WorkOrderMsg | VerifyOrderMsg
R = TypeVar("R")


@dataclass
class VolunteerStats:
    """What a volunteer did: the numbers its live display and summary show."""

    name: str = ""
    peer_id: str = ""
    round: int = -1
    step: int = 0
    loss: float = float("nan")
    samples: int = 0
    rounds: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    compute_s: float = 0.0
    refused: int = 0
    verified: int = 0
    verify_steps: int = 0
    rebuilt: int = 0  # blobs (θ or moments) rebuilt from an update instead of downloaded
    up_mbps: float = 0.0
    down_mbps: float = 0.0
    first_train: float | None = None
    receipts: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    status: str = "starting"

    def utilization(self) -> float:
        """Fraction of wall time spent computing, from the first training step to now.

        Joining and the first downloads come before the first step and are not counted: they
        happen once per volunteer, not once per round.
        """
        wall = time.monotonic() - (self.first_train or self.started)
        return self.compute_s / wall if wall > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """The summary document (`crowdtrain join --summary PATH`)."""
        return {
            "name": self.name,
            "peer_id": self.peer_id,
            "samples": self.samples,
            "rounds": self.rounds,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "compute_s": round(self.compute_s, 3),
            "wall_s": round(time.monotonic() - self.started, 3),
            "utilization": round(self.utilization(), 4),
            "refused": self.refused,
            "verified": self.verified,
            "verify_steps": self.verify_steps,
            "rebuilt": self.rebuilt,
            "receipts": self.receipts,
        }


@dataclass(frozen=True)
class JoinOptions:
    """How one volunteer joins a run."""

    url: str
    name: str
    device: DeviceInfo
    cache_dir: Path
    config_dir: Path | None = None
    invite: str | None = None
    identity: str | None = None  # a token from the run's identity provider, if it uses one
    max_upload_mbps: float | None = None
    slowdown: float = 1.0  # >1 emulates a slower machine (sleeps (slowdown-1)× each step)
    attack: str | None = None  # for testing defences: an attack from crowdtrain.adversary

    def __post_init__(self) -> None:
        if self.attack is not None and self.attack not in ATTACKS:
            raise ClientError(
                f"unknown attack {self.attack!r}; the attacks are {', '.join(ATTACKS)}"
            )


class Volunteer:
    """One volunteer process: its identity, trainers, caches, and the machine it drives."""

    def __init__(
        self,
        options: JoinOptions,
        api: CoordinatorApi,
        *,
        on_update: Callable[[VolunteerStats], None] | None = None,
    ) -> None:
        self.options = options
        self.api = api
        self.stats = VolunteerStats(name=options.name)
        self.on_update = on_update or (lambda s: None)
        self.shards: dict[str, np.ndarray] = {}
        self.cache = options.cache_dir
        self.cache.mkdir(parents=True, exist_ok=True)
        self._replayer: LocalTrainer | None = None
        self._halt = threading.Event()
        self._spec = _BackgroundTraining()
        # (wall clock, compute seconds) at the last upload: each upload reports the compute
        # and wall seconds since, for the coordinator's utilization view.
        self._mark = (time.monotonic(), 0.0)

    # --- set-up --------------------------------------------------------------------------

    def join(self) -> RunConfig:
        """Register (once), verify and pin the manifest; return the run config."""
        state = load_state(self.options.url, self.options.config_dir)
        if state is None:
            peer_id, token = self.api.register(
                self.options.name,
                self.options.invite,
                self.options.device.to_json(),
                identity=self.options.identity,
                key=registration_key(self.options.url, self.options.config_dir),
            )
            state = ClientState(url=self.options.url, peer_id=peer_id, token=token)
            save_state(state, self.options.config_dir)
            forget_key(self.options.url, self.options.config_dir)
        self.api.token = state.token
        verified = verify_manifest(self.api.manifest(), state)
        save_state(state.pin(verified), self.options.config_dir)
        self.stats.peer_id = state.peer_id
        self.config = verified.config
        self.shapes = verified.param_shapes
        self.val_ids = list(verified.data.val_ids)  # held-out batches of score orders
        torch.set_num_threads(self.options.device.threads)
        self.trainer = self._new_trainer()
        attacker = None
        if self.options.attack is not None:
            attacker = Attacker(self.options.attack, state.peer_id, seed=self.config.seed)
        self.machine = VolunteerMachine(state.peer_id, self.config, self.shapes, attacker=attacker)
        return self.config

    def _new_trainer(self) -> LocalTrainer:
        return LocalTrainer(self.config.model, self.config.inner, device=self.options.device.kind)

    def _fetch(self, sha: str, max_bytes: int) -> bytes:
        path = self.cache / sha
        before = path.stat().st_size if path.exists() else 0
        t0 = time.monotonic()
        self.api.download(sha, path, max_bytes=max_bytes)
        got = max(0, path.stat().st_size - before)
        if got:
            self.stats.bytes_down += got
            self.stats.down_mbps = got * 8 / 1e6 / max(1e-6, time.monotonic() - t0)
        return path.read_bytes()

    @property
    def _blob_limit(self) -> int:
        """The largest θ or moments blob of this model: its tensors in fp32 and a header."""
        return sum(4 * int(np.prod(s)) for s in self.shapes.values()) + (1 << 20)

    def _weights(self, sha: str, update: UpdateMsg | None = None) -> dict[str, torch.Tensor]:
        """θ of blob `sha`: from the cache, rebuilt from the previous θ and the compressed
        update when this volunteer holds that θ (``protocol.broadcast``), else downloaded."""
        if self._can_rebuild(sha, update):
            assert update is not None
            self._rebuild(sha, "weights", lambda: self._rebuilt_weights(update))
        tensors = load_safetensors(self._fetch(sha, self._blob_limit))
        if {k: tuple(v.shape) for k, v in tensors.items()} != self.shapes:
            raise ClientError(f"the weights blob {sha[:12]} does not match the run's model shapes")
        return {k: v.to(torch.float32) for k, v in tensors.items()}

    def _rebuilt_weights(self, update: UpdateMsg) -> bytes:
        """θ_base + decode(update), as the blob the coordinator published."""
        base = load_safetensors((self.cache / update.base).read_bytes())
        spec = self.config.broadcast.spec()
        payload = self._fetch(update.payload, codec.max_payload_bytes(self.shapes, spec))
        return weights_bytes(apply_update(base, payload, self.shapes))

    def _derived_moments(self, update: UpdateMsg, theta: Mapping[str, torch.Tensor]) -> bytes:
        """The update's second moments plus the first moments derived from θ_base and `theta`
        over the inner steps of the update's round (``train.moments.first_moments``)."""
        if update.second_moments is None:
            raise ValueError("the update names no second moments")
        inner = self.config.inner
        steps = range(update.round * inner.steps, (update.round + 1) * inner.steps)
        before = load_safetensors((self.cache / update.base).read_bytes())
        second = dict(load_safetensors(self._fetch(update.second_moments, self._blob_limit)))
        first = derive_first(inner, before, theta, second, round_steps=steps)
        return weights_bytes({**second, **first})

    def _can_rebuild(self, sha: str, update: UpdateMsg | None) -> bool:
        """Whether blob `sha` is missing and `update` names a base this volunteer holds."""
        return (
            update is not None
            and not (self.cache / sha).exists()
            and (self.cache / update.base).exists()
        )

    def _rebuild(self, sha: str, what: str, build: Callable[[], bytes]) -> None:
        """Cache blob `sha` as `build()`'s bytes when this volunteer holds the update's base
        and they hash to `sha`; on any failure or mismatch, leave it to a download."""
        try:
            data = build()
        except (ApiError, ClientError, codec.PayloadError, KeyError, ValueError, OSError) as exc:
            log.info("could not rebuild the %s %s (%s); downloading", what, sha[:12], exc)
            return
        if hashlib.sha256(data).hexdigest() != sha:
            log.warning(
                "the %s rebuilt from the update do not match %s; downloading", what, sha[:12]
            )
            return
        atomic_write_bytes(self.cache / sha, data)
        self.stats.rebuilt += 1

    def _shards(self, ids: list[str]) -> dict[str, np.ndarray]:
        limit = self.config.data.shard_bytes
        for sha in ids:
            if sha not in self.shards:
                self.shards[sha] = np.frombuffer(self._fetch(sha, limit), dtype=np.uint8)
        return {sha: self.shards[sha] for sha in ids}

    def _moments(
        self,
        sha: str,
        update: UpdateMsg | None = None,
        theta: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The published AdamW moments of blob `sha`, checked against the model's shapes: from
        the cache, derived from the second moments and the two θs (`theta` and the update's
        base) when this volunteer holds them, else downloaded."""
        if theta is not None and self._can_rebuild(sha, update):
            assert update is not None
            self._rebuild(sha, "moments", lambda: self._derived_moments(update, theta))
        tensors = load_safetensors(self._fetch(sha, self._blob_limit))
        try:
            validate(tensors, self.shapes)
        except ValueError as exc:
            raise ClientError(f"the moments blob {sha[:12]} is bad: {exc}") from None
        return dict(tensors)

    def _prefetch(self, order: Order) -> dict[str, torch.Tensor]:
        """Download (or find cached) the order's shards, θ_base and the moments published with
        it; return θ_base with the moments (``train.moments``)."""
        self._shards(order.shard_ids)
        base = self._weights(order.weights, order.update)
        if order.moments is not None:
            base.update(self._moments(order.moments, order.update, base))
        return base

    def _prior(self, order: VerifyOrderMsg) -> dict[str, torch.Tensor] | None:
        """For a replay of overlapped work: where its overlapped steps began, θ_prior −
        decode(prior payload), from blobs downloaded and verified (and the prior shards)."""
        prior = order.prior
        if prior is None:
            return None
        self._shards(prior.shard_ids)
        theta = self._weights(prior.weights, prior.update)
        if prior.moments is not None:
            theta.update(self._moments(prior.moments, prior.update, theta))
        try:
            sent = codec.decode(
                self._fetch(prior.payload, order.max_payload_bytes),
                self.shapes,
                max_bytes=order.max_payload_bytes,
            )
        except codec.PayloadError as exc:
            raise ClientError(f"the prior payload {prior.payload[:12]} is bad: {exc}") from None
        return overlap_start(theta, sent)

    def _scored(self, order: ScoreOrderMsg) -> dict[str, torch.Tensor]:
        """A score order's contribution, downloaded, verified and decoded, and the validation
        shards its held-out batch comes from."""
        self._shards(self.val_ids)
        try:
            return codec.decode(
                self._fetch(order.payload, order.max_payload_bytes),
                self.shapes,
                max_bytes=order.max_payload_bytes,
            )
        except codec.PayloadError as exc:
            raise ClientError(f"the scored payload {order.payload[:12]} is bad: {exc}") from None

    @functools.cached_property
    def scorers(self) -> Scorers:
        """The model score orders are computed with (on the CPU, `robust.usefulness`)."""
        return Scorers(self.config.model)

    # --- training ------------------------------------------------------------------------

    def _counted(self, trainer: LocalTrainer, spec: _BackgroundTraining | None = None) -> TrainFn:
        """`trainer.train`, each call counted as compute (less the time a paused overlapped
        training spends paused) and shown step by step."""

        def train(*args: Any, **kwargs: Any) -> Contribution:
            t0 = time.monotonic()
            paused0 = spec.paused_s if spec is not None else 0.0
            last = [t0]

            def on_step(step: int, loss: float) -> None:
                now = time.monotonic()
                self.stats.step, self.stats.loss = step, loss
                if self.options.slowdown > 1.0:
                    time.sleep((now - last[0]) * (self.options.slowdown - 1.0))
                self.on_update(self.stats)
                if spec is not None:
                    spec.gate()
                last[0] = time.monotonic()

            result = trainer.train(*args, on_step=on_step, **kwargs)
            paused = spec.paused_s - paused0 if spec is not None else 0.0
            self.stats.compute_s += max(0.0, time.monotonic() - t0 - paused)
            return result

        return train

    def _segment(
        self, trainer: LocalTrainer, segment: ve.Segment, spec: _BackgroundTraining | None = None
    ) -> Contribution:
        batches = self.machine.batches(segment, self.shards)
        train = self._counted(trainer, spec)
        if spec is None:
            return segment.run(train, batches)
        return segment.run(train, batches, stop=spec.stop)

    def replayer(self) -> LocalTrainer:
        """The trainer of spot-check replays: its own, so that a paused overlapped training
        call (and, with `inner.keep_optimizer_state`, our own moments) stays untouched."""
        if self._replayer is None:
            self._replayer = self._new_trainer()
        return self._replayer

    def replay(self, order: VerifyOrderMsg, base: Mapping[str, torch.Tensor]) -> Contribution:
        """Replay spot-check `order` from `base` exactly, as the machine's `Replay` does."""
        return self._replay(ve.Replay(order, base, self._prior(order)))

    def _replay(self, decision: ve.Replay) -> Contribution:
        return decision.run(self._counted(self.replayer()), self.shards, self.config)

    # --- the loop ------------------------------------------------------------------------

    def run(self, stop: threading.Event, max_rounds: int | None = None) -> VolunteerStats:
        """Work until the run finishes, `stop` is set, or `max_rounds` rounds are uploaded.

        Raises PeerBanned (without retrying) once the coordinator has banned this peer.
        """
        self.stats.started = time.monotonic()
        self._halt.clear()
        beat = threading.Thread(target=self._heartbeats, args=(stop,), daemon=True)
        beat.start()
        try:
            self._loop(stop, max_rounds)
        except PeerBanned:
            self.stats.status = "banned"
            raise
        else:
            self.stats.status = "done"
        finally:
            self._spec.finish()
            self._halt.set()
            self.on_update(self.stats)
        return self.stats

    def _loop(self, stop: threading.Event, max_rounds: int | None) -> None:
        pending: deque[ve.Decision] = deque(self.machine.handle(ve.Start()))
        while pending and not stop.is_set():
            decision = pending.popleft()
            if isinstance(decision, ve.Stop):
                if decision.banned:
                    raise PeerBanned(decision.reason)
                return
            try:
                event = self._carry_out(decision, stop)
            except PeerBanned as exc:
                event = ve.GotBanned(exc.detail)
            if event is not None:
                pending.extend(self.machine.handle(event))
            uploaded = isinstance(decision, ve.Upload)
            if uploaded and max_rounds is not None and self.stats.rounds >= max_rounds:
                return

    def _carry_out(self, d: ve.Decision, stop: threading.Event) -> ve.Event | None:
        """Do what decision `d` says with real I/O; return the event that answers it."""
        if isinstance(d, ve.AskForWork):
            return self._ask()
        if isinstance(d, ve.Wait):
            self._show(f"waiting: {d.reason}")
            stop.wait(min(d.seconds, 5.0))
            return ve.Woke()
        if isinstance(d, ve.Fetch):
            order = d.order
            assert isinstance(order, WorkOrderMsg | VerifyOrderMsg | ScoreOrderMsg)
            if isinstance(order, ScoreOrderMsg):  # θ without the moments: nothing trains
                self._shards(order.shard_ids)
                theta = self._weights(order.weights, order.update)
                return ve.InputsReady(theta, target=self._scored(order))
            base = self._prefetch(order)
            prior = self._prior(order) if isinstance(order, VerifyOrderMsg) else None
            return ve.InputsReady(base, prior)
        if isinstance(d, ve.Train):
            if self.stats.first_train is None:
                self.stats.first_train = time.monotonic()
            self.stats.round = d.round
            self._show(f"training round {d.round}")
            return ve.Trained(self._segment(self.trainer, d.segment))
        if isinstance(d, ve.Replay):
            self._show(f"verifying round {d.check.round} of {d.check.target}")
            result = self._replay(d)
            self.stats.verify_steps += result.steps
            return ve.Trained(result)
        if isinstance(d, ve.Evaluate):
            self._show(f"scoring round {d.check.round} of {d.check.target}")
            return ve.Evaluated(d.run(self.scorers, self.shards, self.val_ids, self.config))
        if isinstance(d, ve.Speculate):
            self._spec = _BackgroundTraining()
            self._spec.start(lambda spec: self._segment(self.trainer, d.segment, spec))
            return None
        if isinstance(d, ve.PauseSpeculation):
            self._spec.pause()
            return None
        if isinstance(d, ve.ResumeSpeculation):
            self._spec.resume()
            return None
        if isinstance(d, ve.StopSpeculation):
            return ve.SpeculationEnded(self._spec.finish())
        if isinstance(d, ve.Upload):
            return ve.Uploaded(self._upload(d))
        if isinstance(d, ve.UploadReplay):
            return ve.Uploaded(self._upload_replay(d))
        if isinstance(d, ve.UploadScore):
            return ve.Uploaded(self._upload_score(d))
        raise TypeError(f"unknown decision {type(d).__name__}")

    def _show(self, status: str) -> None:
        self.stats.status = status
        self.on_update(self.stats)

    def _ask(self) -> ve.Event:
        msg = self.api.work()
        if isinstance(msg, WorkOrderMsg):
            return ve.GotWork(msg)
        if isinstance(msg, VerifyOrderMsg):
            return ve.GotCheck(msg)
        if isinstance(msg, ScoreOrderMsg):
            return ve.GotScore(msg)
        if isinstance(msg, FinishedMsg):
            return ve.GotFinished()
        assert isinstance(msg, WaitMsg)
        return ve.GotWait(msg.retry_after, msg.reason)

    def _upload(self, d: ve.Upload) -> bool:
        """Upload one round's payload with its claim (False: refused for this round only)."""
        order = d.order
        assert isinstance(order, WorkOrderMsg)
        meta = {**d.meta(), **self._utilization_since_last_upload()}
        self._show(f"uploading round {order.round}")
        t0 = time.monotonic()
        receipt = self._unless_refused(
            f"round {order.round}: the coordinator refused the contribution",
            lambda: self.api.upload(
                order.round,
                d.payload,
                meta,
                max_payload_bytes=order.max_payload_bytes,
                max_mbps=self.options.max_upload_mbps,
            ),
        )
        if receipt is None:
            self.stats.refused += 1
            return False
        self.stats.bytes_up += len(d.payload)
        self.stats.up_mbps = len(d.payload) * 8 / 1e6 / max(1e-6, time.monotonic() - t0)
        self.stats.samples += d.claim.samples
        self.stats.rounds += 1
        self.stats.receipts.append({"round": order.round, "receipt": receipt.receipt})
        return True

    def _upload_replay(self, d: ve.UploadReplay) -> bool:
        """Upload a spot-check's Δ' (False: no longer ours, or already decided)."""
        order = d.check
        assert isinstance(order, VerifyOrderMsg)
        self._show(f"uploading the replay of round {order.round} of {order.target}")
        receipt = self._unless_refused(
            f"spot-check {order.check_id}: the coordinator refused the replay",
            lambda: self.api.upload_verification(
                order.check_id,
                d.payload,
                d.result.steps,
                max_payload_bytes=order.max_payload_bytes,
                max_mbps=self.options.max_upload_mbps,
            ),
        )
        if receipt is None:
            return False
        self.stats.bytes_up += len(d.payload)
        self.stats.verified += 1
        return True

    def _upload_score(self, d: ve.UploadScore) -> bool:
        """Submit a score order's losses (False: no longer ours, or already decided)."""
        check = d.check
        receipt = self._unless_refused(
            f"score order {check.check_id}: the coordinator refused the score",
            lambda: self.api.upload_score(check.check_id, d.score),
        )
        if receipt is None:
            return False
        self.stats.verified += 1
        return True

    @staticmethod
    def _unless_refused(what: str, send: Callable[[], R]) -> R | None:
        """`send()`, or None (logged as WHAT) when the coordinator refuses the upload for this
        round only (400, 409): a refusal is not fatal, the next order is fresh."""
        try:
            return send()
        except ApiError as exc:
            if exc.status not in (400, 409):
                raise
            log.warning("%s: %s", what, exc.detail)
            return None

    def _utilization_since_last_upload(self) -> dict[str, float]:
        """The compute and wall seconds since the previous upload (informational only)."""
        now, compute = time.monotonic(), self.stats.compute_s
        wall_s = round(min(1e7, max(0.0, now - self._mark[0])), 3)
        compute_s = round(min(wall_s, max(0.0, compute - self._mark[1])), 3)
        self._mark = (now, compute)
        return {"compute_s": compute_s, "wall_s": wall_s}

    def _heartbeats(self, stop: threading.Event) -> None:
        """Tell the coordinator we are alive while a long round trains (see peer_timeout_s)."""
        interval = heartbeat_interval(self.config)
        while not stop.wait(interval) and not self._halt.is_set():
            try:
                self.api.heartbeat()
            except PeerBanned:
                return  # the main loop stops on its next call
            except ClientError as exc:
                log.debug("heartbeat failed: %s", exc)


class _BackgroundTraining:
    """Overlapped training in a background thread: started, paused, resumed and stopped by the
    machine's decisions. A pause takes effect after the step under way."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.running = threading.Event()  # cleared while paused
        self.running.set()
        self.thread: threading.Thread | None = None
        self.result: Contribution | None = None
        self.error: BaseException | None = None
        self.paused_s = 0.0  # seconds spent paused, not computing
        self._paused_at: float | None = None

    def start(self, target: Callable[[_BackgroundTraining], Contribution]) -> None:
        def run() -> None:
            try:
                self.result = target(self)
            except BaseException as exc:  # surfaced in finish()
                self.error = exc

        self.thread = threading.Thread(target=run, name="speculative-training", daemon=True)
        self.thread.start()

    def pause(self) -> None:
        self._paused_at = time.monotonic()
        self.running.clear()

    def resume(self) -> None:
        if self._paused_at is not None:
            self.paused_s += time.monotonic() - self._paused_at
            self._paused_at = None
        self.running.set()

    def gate(self) -> None:
        """Called between steps: block while paused (a stop releases it)."""
        while not self.running.wait(0.1):
            if self.stop.is_set():
                return

    def finish(self) -> Contribution | None:
        self.stop.set()
        self.resume()
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            log.warning("overlapped training failed: %s", self.error)
            return None
        return self.result


def write_summary(path: Path, stats: VolunteerStats) -> None:
    """Write the volunteer's summary JSON (used by the demo)."""
    path.write_text(json.dumps(stats.to_json(), indent=2) + "\n")
