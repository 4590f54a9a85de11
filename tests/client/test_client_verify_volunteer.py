"""The volunteer's loop against a fake coordinator that serves a real tiny run: spot-check
replays (bit-equal to the honest run they check), refused replays, the clean stop of a banned
peer (also through `crowdtrain join`), `overlap_steps`, and `--attack` forgeries."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from crowdtrain import codec
from crowdtrain.adversary import INFLATE_FACTOR
from crowdtrain.cli import app
from crowdtrain.client import run as client_run
from crowdtrain.client.api import CoordinatorApi, PeerBanned, ScoreOrderMsg, VerifyOrderMsg
from crowdtrain.client.probe import DeviceInfo
from crowdtrain.client.signing import sign_manifest
from crowdtrain.client.transfer import ClientError, RetryPolicy
from crowdtrain.client.volunteer import JoinOptions, Volunteer
from crowdtrain.client.work import score_contribution
from crowdtrain.config import RunConfig
from crowdtrain.data import ShardStore, ensure_packed_for
from crowdtrain.models import initial_state
from crowdtrain.protocol.broadcast import Broadcast, weights_bytes
from crowdtrain.robust.usefulness import Scorers
from crowdtrain.server.manifest import build_manifest
from crowdtrain.train.moments import EXP_AVG_SQ, factor, first_moments
from crowdtrain_testing import tiny_config

STEPS = 3
CHECK = "c0ffee" * 4


@dataclass
class Run:
    """The tiny run a fake coordinator serves: config, signed manifest and blobs."""

    config: RunConfig
    doc: dict[str, Any]
    blobs: dict[str, bytes]
    weights: str
    shards: list[str]
    shapes: dict[str, tuple[int, ...]]
    val_ids: list[str]


@pytest.fixture(scope="module")
def tiny_run(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return make_run(corpus_file, tmp_path_factory.mktemp("data"))


def make_run(corpus_file: Path, data: Path, **overrides: dict[str, object]) -> Run:
    config = tiny_config(
        corpus_file,
        data,
        inner={"steps": STEPS, "threads": 1, "overlap": True},
        codec={"name": "fp32"},
        **overrides,
    )
    manifest = ensure_packed_for(config.data)
    store = ShardStore(data)
    blobs = {sha: store.path(sha).read_bytes() for sha in manifest.train_ids + manifest.val_ids}
    state = initial_state(config.model)
    raw = weights_bytes(state)
    weights = hashlib.sha256(raw).hexdigest()
    blobs[weights] = raw
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    doc = sign_manifest(
        build_manifest(config, manifest, weights, shapes),
        Ed25519PrivateKey.from_private_bytes(bytes(32)),
    )
    return Run(
        config, doc, blobs, weights, list(manifest.train_ids[:2]), shapes, list(manifest.val_ids)
    )


def work(run: Run, round: int = 0) -> dict[str, Any]:
    return {
        "kind": "work",
        "round": round,
        "base_version": 0,
        "weights": run.weights,
        "shard_ids": run.shards,
        "seed": 5,
        "step_offset": round * STEPS,
        "budget": "steps",
        "max_steps": STEPS,
        "max_seconds": 60.0,
        "deadline_in": 60.0,
        "max_payload_bytes": 1 << 24,
    }


def verify(run: Run, target: str) -> dict[str, Any]:
    order = work(run)
    return {
        "kind": "verify",
        "check_id": CHECK,
        "target": target,
        **{k: order[k] for k in ("round", "base_version", "weights", "shard_ids", "seed")},
        "step_offset": order["step_offset"],
        "steps": STEPS,
        "max_payload_bytes": 1 << 24,
    }


Reply = dict[str, Any] | httpx.Response
FINISHED = {"kind": "finished", "version": 1, "weights": "0" * 64}


@dataclass
class Coordinator:
    """A fake coordinator: `POST /v1/work` answers from `script` (then "finished"); uploads
    are recorded as (path, meta, payload) and answered by `on_verify` / a receipt."""

    run: Run
    peer_id: str
    script: list[Reply]
    on_verify: httpx.Response | None = None
    uploads: list[tuple[str, dict[str, Any], bytes]] = field(default_factory=list)
    fetched: list[str] = field(default_factory=list)  # the blobs downloaded, in order

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        path = request.url.path
        if path == "/v1/register":
            return httpx.Response(200, json={"peer_id": self.peer_id, "token": "tok"})
        if path == "/v1/manifest":
            return httpx.Response(200, json=self.run.doc)
        if path.startswith("/v1/blobs/"):
            self.fetched.append(path.rsplit("/", 1)[1])
            return httpx.Response(200, content=self.run.blobs[path.rsplit("/", 1)[1]])
        if path == "/v1/heartbeat":
            return httpx.Response(200, json={"round": 0, "version": 0, "deadline_in": 1.0})
        if path == "/v1/work":
            reply = self.script.pop(0) if self.script else FINISHED
            return reply if isinstance(reply, httpx.Response) else httpx.Response(200, json=reply)
        if path.startswith("/v1/scores/"):
            self.uploads.append((path, json.loads(request.content), b""))
            return httpx.Response(200, json={"check_id": path.rsplit("/", 1)[1], "received": True})
        meta = json.loads(request.headers["x-crowdtrain-meta"])
        self.uploads.append((path, meta, request.content))
        if path.startswith("/v1/verifications/"):
            check = path.rsplit("/", 1)[1]
            return self.on_verify or httpx.Response(200, json={"check_id": check, "received": True})
        return httpx.Response(200, json={"receipt": f"r{len(self.uploads)}", "weight": 1.0})

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


def volunteer(fake: Coordinator, tmp: Path, attack: str | None = None) -> Volunteer:
    options = JoinOptions(
        url="http://coordinator",
        name=fake.peer_id,
        device=DeviceInfo("cpu", "test", 1, None, torch.__version__),
        cache_dir=tmp / fake.peer_id / "cache",
        config_dir=tmp / fake.peer_id / "config",
        attack=attack,
    )
    api = CoordinatorApi(
        options.url,
        transport=fake.transport(),
        policy=RetryPolicy(base=0.01, max_delay=0.02, max_tries=2, seed=0),
        sleep=lambda s: None,
        insecure=True,
    )
    v = Volunteer(options, api)
    v.join()
    return v


def run_until_done(v: Volunteer) -> None:
    stop = threading.Event()
    try:
        v.run(stop)
    finally:
        stop.set()  # releases the heartbeat thread


def decode(run: Run, payload: bytes) -> dict[str, torch.Tensor]:
    return codec.decode(payload, run.shapes)


def test_a_replay_is_bit_equal_to_the_honest_run_it_checks(tiny_run: Run, tmp_path: Path) -> None:
    honest = Coordinator(tiny_run, "peer-a", [work(tiny_run)])
    run_until_done(volunteer(honest, tmp_path))
    ((path, meta, payload),) = honest.uploads
    assert path == "/v1/contributions/0"
    assert meta["steps"] == STEPS and meta["overlap_steps"] == 0

    # Another volunteer does its own round first (so its overlapped training is running when
    # the spot-check comes), then replays peer-a's order, then asks for work again.
    checker = Coordinator(
        tiny_run, "peer-b", [work(tiny_run), verify(tiny_run, "peer-a"), work(tiny_run, 1)]
    )
    v = volunteer(checker, tmp_path)
    run_until_done(v)
    paths = [u[0] for u in checker.uploads]
    assert paths == ["/v1/contributions/0", f"/v1/verifications/{CHECK}", "/v1/contributions/1"]
    _, replay_meta, replay = checker.uploads[1]
    assert replay_meta == {"steps": STEPS}
    assert replay == payload  # the same Δ, encoded the same way
    checked, own = decode(tiny_run, payload), decode(tiny_run, checker.uploads[0][2])
    for name, t in decode(tiny_run, replay).items():
        assert torch.equal(t, checked[name])
    assert not all(torch.equal(own[k], checked[k]) for k in own)  # peer-b's batches differ
    assert (v.stats.verified, v.stats.verify_steps, v.stats.rounds) == (1, STEPS, 2)
    doc = v.stats.to_json()
    assert doc["verified"] == 1 and doc["verify_steps"] == STEPS
    assert v.stats.status == "done"


def test_a_score_order_is_scored_on_the_named_batches_and_submitted(
    tiny_run: Run, tmp_path: Path
) -> None:
    """The volunteer downloads the scored payload and the validation shards, and submits the
    losses the coordinator's own stage (f) would compute on the same batches."""
    g = torch.Generator().manual_seed(3)
    delta = {k: 0.01 * torch.randn(shape, generator=g) for k, shape in tiny_run.shapes.items()}
    payload = codec.encode(delta, tiny_run.config.codec)
    sha = hashlib.sha256(payload).hexdigest()
    tiny_run.blobs[sha] = payload
    order = {
        **{k: work(tiny_run)[k] for k in ("round", "base_version", "weights", "shard_ids")},
        **{k: work(tiny_run)[k] for k in ("seed", "step_offset", "max_payload_bytes")},
        "kind": "score",
        "check_id": CHECK,
        "target": "peer-a",
        "assigned_batch": 1,
        "heldout_batch": 12345,
        "payload": sha,
    }
    fake = Coordinator(tiny_run, "peer-s", [order])
    v = volunteer(fake, tmp_path)
    run_until_done(v)
    ((path, body, _),) = fake.uploads
    assert path == f"/v1/scores/{CHECK}"
    assert sha in fake.fetched and set(tiny_run.val_ids) <= set(fake.fetched)
    msg = ScoreOrderMsg.model_validate(order)
    shards = {k: np.frombuffer(b, dtype=np.uint8) for k, b in tiny_run.blobs.items()}
    theta = initial_state(tiny_run.config.model)
    expected = score_contribution(
        Scorers(tiny_run.config.model), msg, theta, delta, shards, tiny_run.val_ids, tiny_run.config
    )
    assert body == {
        "assigned_before": expected.assigned_before,
        "assigned_after": expected.assigned_after,
        "heldout_before": expected.heldout_before,
        "heldout_after": expected.heldout_after,
        "assigned_se": expected.assigned_se,
    }
    assert expected.assigned_before != expected.heldout_before  # two different batches
    assert v.stats.verified == 1


def test_a_refused_replay_is_logged_and_the_volunteer_goes_on(
    tiny_run: Run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    refusal = {"error": "not_assigned", "detail": "this spot-check is not assigned to you"}
    fake = Coordinator(
        tiny_run,
        "peer-b",
        [verify(tiny_run, "peer-a"), work(tiny_run)],
        on_verify=httpx.Response(409, json=refusal),
    )
    v = volunteer(fake, tmp_path)
    with caplog.at_level(logging.WARNING, logger="crowdtrain.client.volunteer"):
        run_until_done(v)
    assert [u[0] for u in fake.uploads] == [f"/v1/verifications/{CHECK}", "/v1/contributions/0"]
    assert "refused the replay: this spot-check is not assigned to you" in caplog.text
    assert (v.stats.verified, v.stats.verify_steps, v.stats.rounds) == (0, STEPS, 1)


def test_overlapped_steps_are_declared(tiny_run: Run, tmp_path: Path) -> None:
    fake = Coordinator(tiny_run, "peer-a", [work(tiny_run), work(tiny_run, 1)])
    run_until_done(volunteer(fake, tmp_path))
    first, second = (u[1] for u in fake.uploads)
    assert first["overlap_steps"] == 0
    assert 1 <= second["overlap_steps"] <= STEPS == second["steps"]  # at least one step ran
    assert (first["overlap_round"], second["overlap_round"]) == (-1, 0)
    assert second["overlap_first_batch"] == STEPS  # round 0 trained batches 0..STEPS-1 itself


BANNED = {"error": "banned", "detail": "this peer is banned: its updates were 1000x the median"}


def test_a_banned_volunteer_stops_at_once(tiny_run: Run, tmp_path: Path) -> None:
    fake = Coordinator(tiny_run, "peer-a", [work(tiny_run), httpx.Response(403, json=BANNED)])
    v = volunteer(fake, tmp_path)
    with pytest.raises(PeerBanned, match=r"^this peer is banned: its updates"):
        run_until_done(v)
    assert v.stats.status == "banned" and v.stats.rounds == 1
    assert fake.script == []  # asked once after the ban, never again


def test_crowdtrain_join_stops_a_banned_volunteer_with_one_sentence(
    tiny_run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = Coordinator(tiny_run, "peer-a", [httpx.Response(403, json=BANNED)])

    def api(url: str, **kw: Any) -> CoordinatorApi:
        return CoordinatorApi(url, transport=fake.transport(), **kw)

    monkeypatch.setattr(client_run, "CoordinatorApi", api)
    monkeypatch.setenv("CROWDTRAIN_CONFIG_DIR", str(tmp_path / "config"))
    summary = tmp_path / "summary.json"
    args = ["join", "http://coordinator", "--insecure", "--name", "a", "--device", "cpu"]
    args += ["--threads", "1"]
    args += ["--quiet", "--cache-dir", str(tmp_path / "cache"), "--summary", str(summary)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "stopped: this peer is banned: its updates were 1000x the median" in result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert json.loads(summary.read_text())["rounds"] == 0


def test_an_unknown_attack_is_refused(tiny_run: Run, tmp_path: Path) -> None:
    with pytest.raises(ClientError, match="unknown attack 'nope'; the attacks are sign_flip"):
        volunteer(Coordinator(tiny_run, "peer-a", []), tmp_path, attack="nope")
    result = CliRunner().invoke(app, ["join", "http://127.0.0.1:9", "--attack", "nope"])
    assert result.exit_code == 2 and "unknown attack 'nope'" in result.output


def _honest(v: Volunteer, run: Run) -> dict[str, torch.Tensor]:
    """The attacker's own honest Δ of `work(run)`: its replay (which never attacks)."""
    order = VerifyOrderMsg.model_validate(verify(run, v.stats.peer_id))
    return v.replay(order, v._prefetch(order)).delta


@pytest.mark.parametrize("attack", ["sign_flip", "inflate", "scale1000", "free_rider"])
def test_an_attacker_uploads_its_forgery(tiny_run: Run, tmp_path: Path, attack: str) -> None:
    fake = Coordinator(tiny_run, "peer-x", [work(tiny_run)])
    v = volunteer(fake, tmp_path, attack=attack)
    run_until_done(v)
    ((_, meta, payload),) = fake.uploads
    sent = decode(tiny_run, payload)
    samples = STEPS * tiny_run.config.data.batch_size
    tokens = samples * tiny_run.config.model.context
    assert meta["steps"] == STEPS and meta["overlap_steps"] == 0
    if attack == "free_rider":  # claims the whole budget without training; sends 0 in round 0
        assert v.stats.compute_s == 0.0
        assert (meta["samples"], meta["tokens"]) == (samples, tokens)
        assert all(not t.any() for t in sent.values())
        return
    honest = _honest(v, tiny_run)
    factor = {"sign_flip": -1.0, "inflate": 1.0, "scale1000": 1000.0}[attack]
    for name, t in sent.items():
        assert torch.equal(t, honest[name] * factor)
    claimed = INFLATE_FACTOR if attack == "inflate" else 1
    assert (meta["samples"], meta["tokens"]) == (samples * claimed, tokens * claimed)


def test_a_poisoner_trains_on_relabelled_batches(tiny_run: Run, tmp_path: Path) -> None:
    fake = Coordinator(tiny_run, "peer-x", [work(tiny_run)])
    v = volunteer(fake, tmp_path, attack="poison")
    run_until_done(v)
    sent = decode(tiny_run, fake.uploads[0][2])
    honest = _honest(v, tiny_run)
    assert not all(torch.equal(sent[k], honest[k]) for k in sent)


@pytest.fixture(scope="module")
def int8_run(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return make_run(corpus_file, tmp_path_factory.mktemp("data8"), broadcast={"codec": "int8"})


def next_version(run: Run, scale: float) -> tuple[str, str, dict[str, str]]:
    """θ_1 after an outer step of `scale` from θ_0, broadcast int8, with published moments:
    (θ_1's sha, the update's, {"moments": ..., "second_moments": ...}), all added to the
    run's blobs."""
    theta0 = {k: t.clone() for k, t in initial_state(run.config.model).items()}
    theta1 = {k: t + scale * torch.ones_like(t) for k, t in theta0.items()}
    b = Broadcast(run.config.broadcast, run.shapes)
    b.publish(theta0, theta1)
    assert b.update is not None
    second = factor({EXP_AVG_SQ + k: t.abs() + 1e-6 for k, t in theta0.items()})
    first = first_moments(run.config.inner, theta0, theta1, second, round_steps=range(STEPS))
    blobs = {
        "weights": weights_bytes(theta1),
        "update": b.update,
        "moments": weights_bytes({**second, **first}),
        "second_moments": weights_bytes(second),
    }
    shas = {k: hashlib.sha256(v).hexdigest() for k, v in blobs.items()}
    run.blobs.update({shas[k]: v for k, v in blobs.items()})
    return shas["weights"], shas["update"], {k: shas[k] for k in ("moments", "second_moments")}


def test_a_volunteer_holding_the_last_weights_rebuilds_the_next_from_the_update(
    int8_run: Run, tmp_path: Path
) -> None:
    """θ_1 from θ_0 and the int8 update, the moments from the second moments and the two θs:
    neither θ_1 (4 bytes per parameter) nor the first moments (2) are downloaded."""
    theta1, update, moments = next_version(int8_run, 1e-3)
    second = {
        **work(int8_run, 1),
        "base_version": 1,
        "weights": theta1,
        "moments": moments["moments"],
        "update": {
            "base": int8_run.weights,
            "payload": update,
            "round": 0,
            "second_moments": moments["second_moments"],
        },
    }
    fake = Coordinator(int8_run, "peer-a", [work(int8_run), second])
    v = volunteer(fake, tmp_path)
    run_until_done(v)
    assert [u[0] for u in fake.uploads] == ["/v1/contributions/0", "/v1/contributions/1"]
    assert {update, moments["second_moments"]} <= set(fake.fetched)
    assert theta1 not in fake.fetched and moments["moments"] not in fake.fetched
    for sha in (theta1, moments["moments"]):
        assert hashlib.sha256((tmp_path / "peer-a" / "cache" / sha).read_bytes()).hexdigest() == sha


def test_an_update_that_does_not_rebuild_the_weights_falls_back_to_a_download(
    int8_run: Run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    theta1, _, _ = next_version(int8_run, 2e-3)
    _, other, _ = next_version(int8_run, 5e-3)  # an update that leads elsewhere
    second = {
        **work(int8_run, 1),
        "base_version": 1,
        "weights": theta1,
        "update": {"base": int8_run.weights, "payload": other, "round": 0},
    }
    fake = Coordinator(int8_run, "peer-b", [work(int8_run), second])
    with caplog.at_level(logging.WARNING, logger="crowdtrain.client.volunteer"):
        run_until_done(volunteer(fake, tmp_path))
    assert len(fake.uploads) == 2 and theta1 in fake.fetched
    assert "do not match" in caplog.text
