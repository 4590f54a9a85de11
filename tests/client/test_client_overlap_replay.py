"""Overlapped contributions are replayable: a verifier given the verify message's `prior`
recomputes, bit for bit, what an honest overlapped volunteer uploaded (int8 codec, 1 thread),
both when the overlapped steps are part of the round and when they fill it."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from crowdtrain import codec
from crowdtrain.client.api import CoordinatorApi, VerifyOrderMsg
from crowdtrain.client.probe import DeviceInfo
from crowdtrain.client.signing import sign_manifest
from crowdtrain.client.transfer import RetryPolicy
from crowdtrain.client.volunteer import JoinOptions, Volunteer, VolunteerStats
from crowdtrain.config import RunConfig
from crowdtrain.data import ShardStore, ensure_packed_for
from crowdtrain.models import initial_state
from crowdtrain.protocol.broadcast import weights_bytes
from crowdtrain.server.manifest import build_manifest
from crowdtrain_testing import tiny_config

CHECK = "0ff1ce" * 4
SPECULATIVE = "speculative-training"  # the name of the volunteer's overlap thread


@dataclass
class Run:
    """A tiny int8 run with two versions of the weights (θ_0 and a stand-in for θ_1)."""

    config: RunConfig
    doc: dict[str, Any]
    blobs: dict[str, bytes]
    weights: list[str]
    shards: list[str]
    shapes: dict[str, tuple[int, ...]]


@pytest.fixture(scope="module")
def run(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    data = tmp_path_factory.mktemp("overlap-data")
    config = tiny_config(
        corpus_file, data, inner={"steps": 3, "threads": 1, "overlap": True}, codec={"name": "int8"}
    )
    manifest = ensure_packed_for(config.data)
    store = ShardStore(data)
    blobs = {sha: store.path(sha).read_bytes() for sha in manifest.train_ids}
    theta0 = initial_state(config.model)
    gen = torch.Generator().manual_seed(7)
    theta1 = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in theta0.items()}
    weights = []
    for theta in (theta0, theta1):
        raw = weights_bytes(theta)
        weights.append(hashlib.sha256(raw).hexdigest())
        blobs[weights[-1]] = raw
    shapes = {k: tuple(v.shape) for k, v in theta0.items()}
    doc = sign_manifest(
        build_manifest(config, manifest, weights[0], shapes),
        Ed25519PrivateKey.from_private_bytes(bytes(32)),
    )
    return Run(config, doc, blobs, weights, list(manifest.train_ids[:2]), shapes)


def work(run: Run, round: int, max_steps: int, step_offset: int) -> dict[str, Any]:
    """Round `round`'s order on θ_round (the fake's versions are the round numbers)."""
    return {
        "kind": "work",
        "round": round,
        "base_version": round,
        "weights": run.weights[round],
        "shard_ids": run.shards,
        "seed": 5,
        "step_offset": step_offset,
        "budget": "steps",
        "max_steps": max_steps,
        "max_seconds": 60.0,
        "deadline_in": 60.0,
        "max_payload_bytes": 1 << 24,
    }


Reply = dict[str, Any] | Callable[[], dict[str, Any]]


@dataclass
class Fake:
    """A fake coordinator serving `run`: `/v1/work` answers from `script` (a callable entry is
    called first: it may wait), then "finished"; uploads are kept as (path, meta, payload)."""

    run: Run
    peer_id: str
    script: list[Reply]
    uploads: list[tuple[str, dict[str, Any], bytes]] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        path = request.url.path
        if path == "/v1/register":
            return httpx.Response(200, json={"peer_id": self.peer_id, "token": "tok"})
        if path == "/v1/manifest":
            return httpx.Response(200, json=self.run.doc)
        if path.startswith("/v1/blobs/"):
            return httpx.Response(200, content=self.run.blobs[path.rsplit("/", 1)[1]])
        if path == "/v1/heartbeat":
            return httpx.Response(200, json={"round": 0, "version": 0, "deadline_in": 1.0})
        if path == "/v1/work":
            reply = self.script.pop(0) if self.script else None
            if callable(reply):
                reply = reply()
            if reply is None:
                reply = {"kind": "finished", "version": 2, "weights": self.run.weights[1]}
            return httpx.Response(200, json=reply)
        meta = json.loads(request.headers["x-crowdtrain-meta"])
        self.uploads.append((path, meta, request.content))
        if path.startswith("/v1/verifications/"):
            return httpx.Response(200, json={"check_id": CHECK, "received": True})
        return httpx.Response(200, json={"receipt": f"r{len(self.uploads)}", "weight": 1.0})


def volunteer(
    fake: Fake, tmp: Path, on_update: Callable[[VolunteerStats], None] | None = None
) -> Volunteer:
    options = JoinOptions(
        url="http://coordinator",
        name=fake.peer_id,
        device=DeviceInfo("cpu", "test", 1, None, torch.__version__),
        cache_dir=tmp / fake.peer_id / "cache",
        config_dir=tmp / fake.peer_id / "config",
    )
    api = CoordinatorApi(
        options.url,
        transport=httpx.MockTransport(fake),
        policy=RetryPolicy(base=0.01, max_delay=0.02, max_tries=2, seed=0),
        sleep=lambda s: None,
        insecure=True,
    )
    v = Volunteer(options, api, on_update=on_update)
    v.join()
    return v


def run_until_done(v: Volunteer) -> None:
    stop = threading.Event()
    try:
        v.run(stop)
    finally:
        stop.set()


def verify_message(
    run: Run, target: str, order: dict[str, Any], meta: dict[str, Any], prior: dict[str, Any]
) -> dict[str, Any]:
    """The verify message for `target`'s contribution to `order` (with its upload's meta)."""
    return {
        "kind": "verify",
        "check_id": CHECK,
        "target": target,
        **{k: order[k] for k in ("round", "base_version", "weights", "shard_ids", "seed")},
        "step_offset": order["step_offset"],
        "steps": meta["steps"],
        "max_payload_bytes": 1 << 24,
        "prior": prior,
    }


def prior_of(run: Run, order: dict[str, Any], meta: dict[str, Any], payload: bytes) -> Any:
    """The `prior` the coordinator sends: the target's previous order and its payload."""
    sha = hashlib.sha256(payload).hexdigest()
    run.blobs[sha] = payload
    return {
        **{k: order[k] for k in ("round", "base_version", "weights", "shard_ids", "seed")},
        "step_offset": order["step_offset"],
        "payload": sha,
        "first_batch": meta["overlap_first_batch"],
        "steps": meta["overlap_steps"],
    }


def check_replay(
    run: Run, tmp: Path, order1: dict[str, Any], uploads: list[Any], order0: Any
) -> None:
    """A verifier replays the second upload (given the first as `prior`): bit-equal."""
    (_, _, payload0), (_, meta1, payload1) = uploads
    msg = verify_message(run, "peer-a", order1, meta1, prior_of(run, order0, meta1, payload0))
    fake = Fake(run, "peer-b", [msg])
    v = volunteer(fake, tmp)
    run_until_done(v)
    ((path, replay_meta, replay),) = fake.uploads
    assert path == f"/v1/verifications/{CHECK}" and replay_meta == {"steps": meta1["steps"]}
    assert replay == payload1  # the same Δ, bit for bit, encoded the same way
    sent, again = codec.decode(payload1, run.shapes), codec.decode(replay, run.shapes)
    assert all(torch.equal(sent[k], again[k]) for k in sent)
    assert (v.stats.verified, v.stats.verify_steps) == (1, meta1["steps"])
    # without the prior the replay is a different contribution
    plain = VerifyOrderMsg.model_validate({**msg, "prior": None})
    delta = v.replay(plain, v._prefetch(plain)).delta
    assert codec.encode(delta, run.config.codec) != payload1


def test_an_overlapped_contribution_is_replayed_bit_for_bit(run: Run, tmp_path: Path) -> None:
    # Round 0 has 2 steps, round 1 has 4: at most 2 overlapped steps, the rest on round 1.
    order0, order1 = work(run, 0, 2, 0), work(run, 1, 4, 2)
    fake = Fake(run, "peer-a", [order0, order1])
    run_until_done(volunteer(fake, tmp_path))
    (_, meta0, _), (_, meta1, _) = fake.uploads
    assert (meta0["overlap_steps"], meta0["overlap_round"], meta0["overlap_first_batch"]) == (
        0,
        -1,
        0,
    )
    assert 1 <= meta1["overlap_steps"] <= 2 and meta1["steps"] == 4
    assert (meta1["overlap_round"], meta1["overlap_first_batch"]) == (0, 2)
    check_replay(run, tmp_path, order1, fake.uploads, order0)


def test_overlapped_steps_that_fill_the_round_are_replayed_bit_for_bit(
    run: Run, tmp_path: Path
) -> None:
    order0, order1 = work(run, 0, 3, 0), work(run, 1, 3, 3)
    speculated = [0]
    full = threading.Event()

    def count(stats: VolunteerStats) -> None:
        if threading.current_thread().name == SPECULATIVE:  # called once per overlapped step
            speculated[0] += 1
            if speculated[0] >= 3:
                full.set()

    def order1_once_speculation_is_done() -> dict[str, Any]:
        assert full.wait(timeout=300)  # round 0's budget of overlapped steps is spent
        return order1

    fake = Fake(run, "peer-a", [order0, order1_once_speculation_is_done])
    run_until_done(volunteer(fake, tmp_path, on_update=count))
    (_, meta1, _) = fake.uploads[1]
    assert (meta1["overlap_steps"], meta1["steps"]) == (3, 3)  # θ_1 only rebases them
    assert (meta1["overlap_round"], meta1["overlap_first_batch"]) == (0, 3)
    check_replay(run, tmp_path, order1, fake.uploads, order0)
