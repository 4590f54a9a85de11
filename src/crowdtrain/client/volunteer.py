"""The volunteer's main loop: join, pin the manifest, then work orders until the run ends.

Each round: fetch θ_base and the assigned shards (verified by sha256, cached, resumable), train
with `LocalTrainer` on exactly the batches the work order names, compress Δ with the run's codec
(keeping the error-feedback residual locally), and upload it with retries.

With overlap on (DiLoCo run config `inner.overlap`), the volunteer does not sit idle while its
upload travels and the round closes: it keeps training on the same work order's batch stream,
and when θ_{r+1} arrives it rebases that extra progress onto θ_{r+1} and counts it towards round
r+1 — the one-step-delayed outer update of Streaming DiLoCo (Douillard et al. 2025,
arXiv:2501.18512) and of DeMo's delayed application (Peng et al. 2024, arXiv:2411.19870).
The speculative steps start from θ_r − decode(payload_r), the Δ exactly as uploaded, not from
the private fp32 end point, so they depend only on public data. Such a contribution declares
`overlap_steps` (k), `overlap_round` (r) and `overlap_first_batch` in its metadata, and a
verifier can replay it (`replay_work`).

A trusted volunteer may instead be asked to verify another peer's contribution: replay that
peer's work order exactly (same θ_base, shards, seed, step offset and step count, batches keyed
by the target peer; first the previous round's overlapped steps when there were any) and upload
Δ' for the coordinator to compare — the recomputation spot-check of BOINC-style adaptive
replication (Anderson, "BOINC: A Platform for Volunteer Computing", J. Grid Computing 2020).
With AdamW fresh for every training call the replay is bit-exact on the same hardware and
thread count.

For testing defences, `JoinOptions.attack` makes the volunteer behave as an attack of
`crowdtrain.adversary`. A networked attacker is not omniscient: it sees only its own honest Δ,
so ALIE and IPM work from that one Δ and copycat, having nobody to copy, sends its own.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from crowdtrain import codec
from crowdtrain.adversary import ATTACKS, Attacker, Claim, RoundView, encode_forgery, idle_start
from crowdtrain.client.api import (
    CoordinatorApi,
    FinishedMsg,
    PeerBanned,
    PriorMsg,
    VerifyOrderMsg,
    WaitMsg,
    WorkOrderMsg,
)
from crowdtrain.client.identity import ClientState, load_state, save_state, verify_manifest
from crowdtrain.client.probe import DeviceInfo
from crowdtrain.client.transfer import ApiError, ClientError
from crowdtrain.config import RunConfig
from crowdtrain.data import BatchSampler
from crowdtrain.train import Contribution, LocalTrainer

log = logging.getLogger(__name__)

Order = WorkOrderMsg | VerifyOrderMsg
Batch = tuple[torch.Tensor, torch.Tensor]
#: `LocalTrainer.train` or a wrapper of it: (base, batches, *, step_offset, max_steps, start=).
TrainFn = Callable[..., Contribution]


@dataclass(frozen=True)
class CarriedWork:
    """The overlapped start of a contribution, as a replay needs it: `steps` steps from
    `start` (θ_prior − decode(payload_prior)) on `batches`, the first at `step_offset`."""

    start: Mapping[str, torch.Tensor]
    batches: Iterator[Batch]
    step_offset: int
    steps: int

    @classmethod
    def after(
        cls,
        theta: Mapping[str, torch.Tensor],
        sent: Mapping[str, torch.Tensor],
        sampler: BatchSampler,
        *,
        first_batch: int,
        step_offset: int,
        steps: int,
    ) -> CarriedWork:
        """The steps a peer trained ahead from θ_prior − Δ_sent, from batch `first_batch` of
        its prior work order's stream (`step_offset` is that order's)."""
        return cls(
            start={k: theta[k] - sent[k] for k in theta},
            batches=(sampler.batch(i) for i in range(first_batch, 1 << 62)),
            step_offset=step_offset + first_batch,
            steps=steps,
        )


def replay_work(
    train: TrainFn,
    base: Mapping[str, torch.Tensor],
    batches: Iterator[Batch],
    *,
    step_offset: int,
    steps: int,
    carried: CarriedWork | None = None,
) -> Contribution:
    """Recompute a contribution of `steps` steps from `base`, the way its volunteer made it.

    Without `carried`: `steps` steps on `batches` from `base`. With it, first the overlapped
    part, Δ_c = θ_s − θ_end after `carried.steps` steps from θ_s = `carried.start`; if that is
    the whole budget, Δ_c is the contribution, else training goes on from θ_base − Δ_c for the
    remaining steps on `batches` from their start, and Δ is measured from θ_base. Every `train`
    call has a fresh optimizer, as in `Volunteer._round`.
    """
    if carried is None:
        return train(base, batches, step_offset=step_offset, max_steps=steps)
    done = train(
        carried.start, carried.batches, step_offset=carried.step_offset, max_steps=carried.steps
    )
    if done.steps >= steps:
        return done
    start = {k: base[k] - done.delta[k] for k in base}
    rest = train(base, batches, step_offset=step_offset, max_steps=steps - done.steps, start=start)
    return _merge(done, rest)


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
    max_upload_mbps: float | None = None
    slowdown: float = 1.0  # >1 emulates a slower machine (sleeps (slowdown-1)× each step)
    attack: str | None = None  # for testing defences: an attack from crowdtrain.adversary

    def __post_init__(self) -> None:
        if self.attack is not None and self.attack not in ATTACKS:
            raise ClientError(
                f"unknown attack {self.attack!r}; the attacks are {', '.join(ATTACKS)}"
            )


@dataclass(frozen=True)
class _Overlap:
    """What a contribution declares about its overlapped start: `steps` steps that continued
    the order of round `round` from its batch `first_batch`."""

    steps: int
    round: int
    first_batch: int


class _Speculation:
    """Training that continues in a thread while the upload and the round close happen."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.result: Contribution | None = None
        self.error: BaseException | None = None

    def start(self, target: Callable[[threading.Event], Contribution]) -> None:
        def run() -> None:
            try:
                self.result = target(self.stop)
            except BaseException as exc:  # surfaced in finish()
                self.error = exc

        self.thread = threading.Thread(target=run, name="speculative-training", daemon=True)
        self.thread.start()

    def finish(self) -> Contribution | None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            log.warning("overlapped training failed: %s", self.error)
            return None
        return self.result


class Volunteer:
    """One volunteer process: its identity, trainer, caches and error-feedback residual."""

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
        self.residual: dict[str, torch.Tensor] | None = None
        self.shards: dict[str, np.ndarray] = {}
        self.cache = options.cache_dir
        self.cache.mkdir(parents=True, exist_ok=True)
        self.attacker: Attacker | None = None
        self._replayer: LocalTrainer | None = None
        self._halt = threading.Event()
        # (wall clock, compute seconds) at the last upload: each upload reports the compute
        # and wall seconds since, for the coordinator's utilization view.
        self._mark = (time.monotonic(), 0.0)

    # --- set-up --------------------------------------------------------------------------

    def join(self) -> RunConfig:
        """Register (once), verify and pin the manifest; return the run config."""
        state = load_state(self.options.url, self.options.config_dir)
        if state is None:
            peer_id, token = self.api.register(
                self.options.name, self.options.invite, self.options.device.to_json()
            )
            state = ClientState(url=self.options.url, peer_id=peer_id, token=token)
            save_state(state, self.options.config_dir)
        self.api.token = state.token
        verified = verify_manifest(self.api.manifest(), state)
        save_state(state.pin(verified), self.options.config_dir)
        self.stats.peer_id = state.peer_id
        self.config = verified.config
        self.shapes = verified.param_shapes
        torch.set_num_threads(self.options.device.threads)
        self.trainer = LocalTrainer(
            self.config.model, self.config.inner, device=self.options.device.kind
        )
        if self.config.codec.name == "topk2bit" or self.config.outer.optimizer == "error_feedback":
            self.residual = {}
        if self.options.attack is not None:
            self.attacker = Attacker(self.options.attack, state.peer_id, seed=self.config.seed)
        return self.config

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

    def _weights(self, sha: str) -> dict[str, torch.Tensor]:
        limit = sum(4 * int(np.prod(s)) for s in self.shapes.values()) + (1 << 20)
        tensors = load_safetensors(self._fetch(sha, limit))
        if {k: tuple(v.shape) for k, v in tensors.items()} != self.shapes:
            raise ClientError(f"the weights blob {sha[:12]} does not match the run's model shapes")
        return {k: v.to(torch.float32) for k, v in tensors.items()}

    def _shards(self, ids: list[str]) -> dict[str, np.ndarray]:
        limit = self.config.data.shard_bytes
        for sha in ids:
            if sha not in self.shards:
                self.shards[sha] = np.frombuffer(self._fetch(sha, limit), dtype=np.uint8)
        return {sha: self.shards[sha] for sha in ids}

    # --- rounds --------------------------------------------------------------------------

    def _sampler(self, order: Order) -> BatchSampler:
        """The order's batch stream; a spot-check draws the batches of the peer it replays."""
        return BatchSampler(
            self._shards(order.shard_ids),
            order.shard_ids,
            seed=order.seed,
            round=order.round,
            peer=order.target if isinstance(order, VerifyOrderMsg) else self.stats.peer_id,
            batch_size=self.config.data.batch_size,
            context=self.config.model.context,
        )

    def _on_step(self, step: int, loss: float) -> None:
        self.stats.step, self.stats.loss = step, loss
        if self.options.slowdown > 1.0:
            time.sleep(self._last_step_s * (self.options.slowdown - 1.0))
        self.on_update(self.stats)

    def _train(
        self,
        order: WorkOrderMsg,
        base: Mapping[str, torch.Tensor],
        *,
        start: Mapping[str, torch.Tensor] | None = None,
        first_batch: int = 0,
        steps_done: int = 0,
        seconds_done: float = 0.0,
        stop: threading.Event | None = None,
    ) -> Contribution:
        sampler = self._sampler(order)
        batches: Iterator[Batch] = (sampler.batch(i) for i in range(first_batch, 1 << 62))
        if self.attacker is not None:
            batches = self.attacker.poison(batches, self.config.model.vocab_size)
        # Overlapped (speculative) training runs until stopped, but never past one round's
        # budget: it can hide communication, not replace the next round's work.
        if order.budget == "steps":
            max_steps, max_seconds = max(1, order.max_steps - steps_done), None
        else:
            max_steps, max_seconds = None, max(0.001, order.max_seconds - seconds_done)
        return self._timed(
            self.trainer,
            base,
            batches,
            step_offset=order.step_offset + first_batch,
            max_steps=max_steps,
            max_seconds=max_seconds,
            start=start,
            stop=stop,
        )

    def _timed(
        self,
        trainer: LocalTrainer,
        base: Mapping[str, torch.Tensor],
        batches: Iterator[Batch],
        **kwargs: Any,
    ) -> Contribution:
        """`trainer.train(base, batches, **kwargs)`, counted as compute and shown step by step."""
        t0 = time.monotonic()
        self._last_step_s = 0.0
        last = [t0]

        def on_step(step: int, loss: float) -> None:
            now = time.monotonic()
            self._last_step_s = now - last[0]
            self._on_step(step, loss)
            last[0] = time.monotonic()

        result = trainer.train(base, batches, on_step=on_step, **kwargs)
        self.stats.compute_s += time.monotonic() - t0
        return result

    def replay(self, order: VerifyOrderMsg, base: Mapping[str, torch.Tensor]) -> Contribution:
        """Train exactly the spot-checked work order: `order.steps` steps on the target's
        batches from `base`, with a fresh optimizer and no attack; with `order.prior`, the
        first of them are the target's overlapped steps of the previous round (`replay_work`),
        whose start θ_prior − decode(payload) is downloaded and verified here."""
        if self.config.inner.keep_optimizer_state:  # the replay must not touch our own moments
            if self._replayer is None:
                self._replayer = LocalTrainer(
                    self.config.model, self.config.inner, device=self.options.device.kind
                )
            trainer = self._replayer
        else:
            trainer = self.trainer
        carried = None if order.prior is None else self._carried(order, order.prior)
        return replay_work(
            functools.partial(self._timed, trainer),
            base,
            iter(self._sampler(order)),
            step_offset=order.step_offset,
            steps=order.steps,
            carried=carried,
        )

    def _carried(self, order: VerifyOrderMsg, prior: PriorMsg) -> CarriedWork:
        """The overlapped start of the contribution `order` checks: θ_prior − decode(payload)
        and the target's batches of the prior round from `prior.first_batch`."""
        theta = self._weights(prior.weights)
        try:
            sent = codec.decode(
                self._fetch(prior.payload, order.max_payload_bytes),
                self.shapes,
                max_bytes=order.max_payload_bytes,
            )
        except codec.PayloadError as exc:
            raise ClientError(f"the prior payload {prior.payload[:12]} is bad: {exc}") from None
        sampler = BatchSampler(
            self._shards(prior.shard_ids),
            prior.shard_ids,
            seed=prior.seed,
            round=prior.round,
            peer=order.target,
            batch_size=self.config.data.batch_size,
            context=self.config.model.context,
        )
        return CarriedWork.after(
            theta,
            sent,
            sampler,
            first_batch=prior.first_batch,
            step_offset=prior.step_offset,
            steps=prior.steps,
        )

    def _verify(self, order: VerifyOrderMsg) -> None:
        """Replay a spot-check and upload Δ' (a refusal is logged, not fatal)."""
        self.stats.status = f"verifying round {order.round} of {order.target}"
        self.on_update(self.stats)
        base = self._prefetch(order)
        result = self.replay(order, base)
        self.stats.verify_steps += result.steps
        payload = codec.encode(result.delta, self.config.codec)
        self.stats.status = f"uploading the replay of round {order.round} of {order.target}"
        self.on_update(self.stats)
        try:
            self.api.upload_verification(
                order.check_id,
                payload,
                result.steps,
                max_payload_bytes=order.max_payload_bytes,
                max_mbps=self.options.max_upload_mbps,
            )
        except ApiError as exc:
            if exc.status in (400, 409):  # no longer ours, or already decided: go on
                log.warning(
                    "spot-check %s: the coordinator refused the replay: %s",
                    order.check_id,
                    exc.detail,
                )
                return
            raise
        self.stats.bytes_up += len(payload)
        self.stats.verified += 1

    def _speculate(
        self, order: WorkOrderMsg, local: dict[str, torch.Tensor], done: int, stop: threading.Event
    ) -> Contribution:
        return self._train(order, local, first_batch=done, stop=stop)

    def _forge(
        self, order: WorkOrderMsg, result: Contribution | None, base: Mapping[str, torch.Tensor]
    ) -> tuple[bytes, Claim]:
        """What an attacker uploads: its forgery of its own honest result (none if it does
        not train), seeing only that one Δ (networked attackers are not omniscient)."""
        assert self.attacker is not None
        if result is not None:
            honest = result.delta
            claim = Claim(result.samples, result.tokens, result.steps, result.loss_mean)
        else:
            honest, claim = idle_start(
                base,
                max_steps=order.max_steps,
                batch_size=self.config.data.batch_size,
                context=self.config.model.context,
            )
        view = RoundView(round=order.round, peers=1, attackers=1, honest=[honest], others=[])
        forgery = self.attacker.forge(honest, claim, view)
        return encode_forgery(forgery, self.config.codec, self.residual), forgery.claim

    def _encode(
        self, order: WorkOrderMsg, result: Contribution | None, base: Mapping[str, torch.Tensor]
    ) -> tuple[bytes, Claim]:
        """One round's payload (or forgery) and what it claims."""
        if self.attacker is not None:
            return self._forge(order, result, base)
        assert result is not None
        payload = codec.encode(result.delta, self.config.codec, residual=self.residual)
        return payload, Claim(result.samples, result.tokens, result.steps, result.loss_mean)

    def _upload(
        self, order: WorkOrderMsg, payload: bytes, claim: Claim, overlap: _Overlap | None
    ) -> None:
        """Upload one round's payload with its claim; a refusal is not fatal."""
        meta = {
            "base_version": order.base_version,
            "samples": claim.samples,
            "tokens": claim.tokens,
            "steps": claim.steps,
            "train_loss": claim.train_loss,
            "overlap_steps": 0 if overlap is None else overlap.steps,
            "overlap_round": -1 if overlap is None else overlap.round,
            "overlap_first_batch": 0 if overlap is None else overlap.first_batch,
            **self._utilization_since_last_upload(),
        }
        self.stats.status = f"uploading round {order.round}"
        self.on_update(self.stats)
        t0 = time.monotonic()
        try:
            receipt = self.api.upload(
                order.round,
                payload,
                meta,
                max_payload_bytes=order.max_payload_bytes,
                max_mbps=self.options.max_upload_mbps,
            )
        except ApiError as exc:
            if exc.status in (400, 409):  # refused for this round only; the next one is fresh
                log.warning(
                    "round %d: the coordinator refused the contribution: %s",
                    order.round,
                    exc.detail,
                )
                self.stats.refused += 1
                return
            raise
        self.stats.bytes_up += len(payload)
        self.stats.up_mbps = len(payload) * 8 / 1e6 / max(1e-6, time.monotonic() - t0)
        self.stats.samples += claim.samples
        self.stats.rounds += 1
        self.stats.receipts.append({"round": order.round, "receipt": receipt.receipt})

    def _utilization_since_last_upload(self) -> dict[str, float]:
        """The compute and wall seconds since the previous upload (informational only)."""
        now, compute = time.monotonic(), self.stats.compute_s
        wall_s = round(min(1e7, max(0.0, now - self._mark[0])), 3)
        compute_s = round(min(wall_s, max(0.0, compute - self._mark[1])), 3)
        self._mark = (now, compute)
        return {"compute_s": compute_s, "wall_s": wall_s}

    def _next_order(
        self, stop: threading.Event, spec: _Speculation | None = None
    ) -> WorkOrderMsg | None:
        """Ask for work until a work order comes (None: the run is over or STOP is set).

        Spot-checks that come instead are replayed and uploaded on the way; overlapped training
        SPEC is ended first, since a replay needs the trainer and the cores to itself.
        """
        while not stop.is_set():
            msg = self.api.work()
            if isinstance(msg, WorkOrderMsg):
                return msg
            if isinstance(msg, FinishedMsg):
                return None
            if isinstance(msg, VerifyOrderMsg):
                if spec is not None:
                    spec.finish()
                self._verify(msg)
                continue
            assert isinstance(msg, WaitMsg)
            self.stats.status = f"waiting: {msg.reason}"
            self.on_update(self.stats)
            stop.wait(min(msg.retry_after, 5.0))
        return None

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
            self._halt.set()
            self.on_update(self.stats)
        return self.stats

    def _loop(self, stop: threading.Event, max_rounds: int | None) -> None:
        order = self._next_order(stop)
        base = None if order is None else self._prefetch(order)
        carried: Contribution | None = None
        spec_from: tuple[int, int] = (-1, 0)  # (round, first batch) the speculation continued
        overlap = self.config.inner.overlap and self.attacker is None
        while order is not None and base is not None and not stop.is_set():
            if self.stats.first_train is None:
                self.stats.first_train = time.monotonic()
            self.stats.round, self.stats.status = order.round, f"training round {order.round}"
            trains = self.attacker is None or self.attacker.trains
            result = self._round(order, base, carried) if trains else None
            payload, claim = self._encode(order, result, base)
            done = None if carried is None else _Overlap(carried.steps, *spec_from)
            spec = _Speculation()
            if overlap and result is not None:
                fresh = result.steps - (carried.steps if carried is not None else 0)
                spec_from = (order.round, fresh)
                local_end = self._speculation_start(base, result, payload)
                spec.start(functools.partial(self._speculate, order, local_end, fresh))
            try:
                self._upload(order, payload, claim, done)
                if max_rounds is not None and self.stats.rounds >= max_rounds:
                    break
                # While these transfers run, the overlapped training goes on.
                order = self._next_order(stop, spec)
                base = None if order is None else self._prefetch(order)
            finally:
                carried = spec.finish() if overlap else None

    def _speculation_start(
        self, base: Mapping[str, torch.Tensor], result: Contribution, payload: bytes
    ) -> dict[str, torch.Tensor]:
        """Where overlapped training starts: θ_base − decode(payload), the end point anyone
        can compute from public data, so that a verifier can replay it. With an error-feedback
        residual (never spot-checked) the payload is not Δ, so it is the local end point."""
        if self.residual is not None:
            return {k: base[k] - result.delta[k] for k in base}
        sent = codec.decode(payload, self.shapes)
        return {k: base[k] - sent[k] for k in base}

    def _heartbeats(self, stop: threading.Event) -> None:
        """Tell the coordinator we are alive while a long round trains (see peer_timeout_s)."""
        interval = max(1.0, min(15.0, self.config.rounds.peer_timeout_s / 4))
        while not stop.wait(interval) and not self._halt.is_set():
            try:
                self.api.heartbeat()
            except PeerBanned:
                return  # the main loop stops on its next call
            except ClientError as exc:
                log.debug("heartbeat failed: %s", exc)

    def _prefetch(self, order: Order) -> dict[str, torch.Tensor]:
        """Download (or find cached) everything the work order needs; return θ_base."""
        self._shards(order.shard_ids)
        return self._weights(order.weights)

    def _round(
        self, order: WorkOrderMsg, base: dict[str, torch.Tensor], carried: Contribution | None
    ) -> Contribution:
        """Train one work order, counting overlapped progress `carried` (rebased onto base)."""
        if carried is None:
            return self._train(order, base)
        if _fills_budget(order, carried):
            return carried  # Δ from the new θ is exactly the rebased progress
        start = {k: base[k] - carried.delta[k] for k in base}
        rest = self._train(
            order, base, start=start, steps_done=carried.steps, seconds_done=carried.seconds
        )
        return _merge(carried, rest)


def _fills_budget(order: WorkOrderMsg, done: Contribution) -> bool:
    """Whether overlapped work already used the whole budget of `order`."""
    if order.budget == "steps":
        return done.steps >= order.max_steps
    return done.seconds >= order.max_seconds


def _merge(first: Contribution, second: Contribution) -> Contribution:
    """One round's result from the overlapped part and the rest (Δ is already from base)."""
    steps = first.steps + second.steps
    return Contribution(
        delta=second.delta,
        samples=first.samples + second.samples,
        tokens=first.tokens + second.tokens,
        steps=steps,
        loss_first=first.loss_first,
        loss_last=second.loss_last,
        loss_mean=(first.loss_mean * first.steps + second.loss_mean * second.steps) / steps,
        seconds=first.seconds + second.seconds,
    )


def write_summary(path: Path, stats: VolunteerStats) -> None:
    """Write the volunteer's summary JSON (used by the demo)."""
    path.write_text(json.dumps(stats.to_json(), indent=2) + "\n")
