"""Spot-checks of overlapped contributions through the coordinator: the overlap claims of
`X-Crowdtrain-Meta`, the verify message's `prior` (weights and payload of the previous round),
and the coordinator's own replay of an honest overlapped contribution."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors
from server_helpers import (
    FakeClock,
    Peer,
    assert_error,
    make_payload,
    meta,
    register,
    sha256,
    upload,
    work,
)

from crowdtrain import codec
from crowdtrain.config import RunConfig
from crowdtrain.data import BatchSampler
from crowdtrain.server.app import create_app
from crowdtrain.server.coordinator import ContributionMeta, Coordinator
from crowdtrain.train import Contribution, LocalTrainer


def defended(config: RunConfig, **defence: Any) -> RunConfig:
    doc = config.model_dump()
    doc["defence"] = {**doc["defence"], "enabled": True, "score_per_round": 0, **defence}
    return RunConfig.model_validate(doc)


@pytest.fixture
def checking(config: RunConfig, tmp_path: Path, clock: FakeClock) -> Iterator[TestClient]:
    """Every contribution is spot-checked (passed checks do not lower the rate) and every
    peer may verify at once."""
    cfg = defended(
        config,
        check_p_new=1.0,
        check_p_min=1.0,
        probation_rounds=0,
        reputation_initial=1.0,
        trust_threshold=0.0,
    )
    coord = Coordinator(cfg, tmp_path / "state", clock=clock, eval_batch_count=1)
    with TestClient(create_app(coord), raise_server_exceptions=False) as c:
        yield c


def verify_back(client: TestClient, peer: Peer, payloads: dict[str, bytes]) -> dict[str, Any]:
    """Ask for work; answer a verify order with the target's own payload (a passing replay)."""
    order = work(client, peer)
    if order["kind"] == "verify":
        headers = {**peer.auth, "X-Crowdtrain-Meta": json.dumps({"steps": order["steps"]})}
        body = payloads[order["target"]]
        r = client.put(f"/v1/verifications/{order['check_id']}", content=body, headers=headers)
        assert r.status_code == 200, r.text
    return order


def test_the_verify_message_names_the_prior_round_weights_and_payload(
    checking: TestClient, config: RunConfig
) -> None:
    a, b = register(checking, "a"), register(checking, "b")
    order0 = {p.peer_id: work(checking, p) for p in (a, b)}
    round0 = {a.peer_id: make_payload(config, seed=1), b.peer_id: make_payload(config, seed=2)}
    for p in (a, b):
        assert upload(checking, p, 0, round0[p.peer_id]).status_code == 200
    order1 = {p.peer_id: work(checking, p) for p in (a, b)}  # their own work comes first
    assert all(o["kind"] == "work" and o["round"] == 1 for o in order1.values())
    bad = meta(1, overlap_steps=1, overlap_round=-2)
    doc = assert_error(upload(checking, a, 1, make_payload(config, 3), bad), 400)
    assert "overlap_round" in doc["detail"]
    # the overlap continues a's round-0 contribution after its 2 steps: batch 2, nothing else
    claim = meta(1, overlap_steps=1, overlap_round=0, overlap_first_batch=1)
    doc = assert_error(upload(checking, a, 1, make_payload(config, 3), claim), 400)
    assert doc["error"] == "bad_claim" and "from batch 2" in doc["detail"]
    claim = meta(1, overlap_steps=1, overlap_round=0, overlap_first_batch=2)
    assert upload(checking, a, 1, make_payload(config, 3), claim).status_code == 200
    # a's contribution is in and b still owes its own: a replays b's round 0 meanwhile
    assert verify_back(checking, a, round0)["kind"] == "verify"
    assert upload(checking, b, 1, make_payload(config, 4), meta(1)).status_code == 200
    # round 2 stays open on c's order while a and b, their contributions in, take checks
    c = register(checking, "c")
    assert work(checking, c)["kind"] == "work"
    for p, seed in ((a, 5), (b, 6)):
        assert work(checking, p)["round"] == 2
        assert upload(checking, p, 2, make_payload(config, seed), meta(2)).status_code == 200
    assert verify_back(checking, b, round0)["target"] == a.peer_id  # the oldest check first

    checks = {o["target"]: o for o in (work(checking, b), work(checking, a))}
    assert {o["kind"] for o in checks.values()} == {"verify"}
    assert checks[b.peer_id]["prior"] is None
    check = checks[a.peer_id]
    versions = {0: order0[a.peer_id]["weights"], 1: order1[a.peer_id]["weights"]}
    assert versions[0] != versions[1]
    assert (check["round"], check["base_version"], check["weights"]) == (1, 1, versions[1])
    assert check["shard_ids"] == order1[a.peer_id]["shard_ids"]
    first = order0[a.peer_id]
    assert check["prior"] == {
        "round": 0,
        "base_version": 0,
        "weights": versions[0],
        "update": first["update"],  # how θ_prior is rebuilt from its predecessor (none at 0)
        "moments": first["moments"],  # the moments published with θ_prior (none at version 0)
        "payload": sha256(round0[a.peer_id]),
        "shard_ids": first["shard_ids"],
        "seed": first["seed"],
        "step_offset": first["step_offset"],
        "first_batch": 2,
        "steps": 1,
    }
    blob = checking.get(f"/v1/blobs/{check['prior']['payload']}", headers=b.auth)  # its verifier
    assert blob.status_code == 200 and blob.content == round0[a.peer_id]


def weights(coord: Coordinator, sha: str) -> dict[str, torch.Tensor]:
    return dict(load_safetensors(coord.blobs.read(sha)))


def base_of(coord: Coordinator, order: dict[str, Any]) -> dict[str, torch.Tensor]:
    """θ of an order with the AdamW moments published with it, as a volunteer starts from."""
    moments = weights(coord, order["moments"]) if order["moments"] else {}
    return {**weights(coord, order["weights"]), **moments}


def train(
    coord: Coordinator,
    order: dict[str, Any],
    peer_id: str,
    start: dict[str, torch.Tensor],
    first_batch: int,
    steps: int,
    *,
    base: dict[str, torch.Tensor] | None = None,
) -> Contribution:
    """STEPS steps of ORDER's batch stream from FIRST_BATCH from START, AdamW from the
    moments BASE (default START) carries; Δ is measured from BASE, as a volunteer trains."""
    cfg = coord.config
    sampler = BatchSampler(
        {sha: coord.shard_store.load(sha) for sha in order["shard_ids"]},
        order["shard_ids"],
        seed=order["seed"],
        round=order["round"],
        peer=peer_id,
        batch_size=cfg.data.batch_size,
        context=cfg.model.context,
    )
    return LocalTrainer(cfg.model, cfg.inner).train(
        start if base is None else base,
        (sampler.batch(i) for i in range(first_batch, 1 << 20)),
        step_offset=order["step_offset"] + first_batch,
        max_steps=steps,
        start=None if base is None else start,
    )


def submit(
    coord: Coordinator, peer_id: str, order: dict[str, Any], result: Contribution, **overlap: int
) -> bytes:
    payload = codec.encode(result.delta, coord.config.codec)
    sha = coord.blobs.put_bytes(payload)
    claim = ContributionMeta(
        order["base_version"],
        result.samples,
        result.tokens,
        result.steps,
        result.loss_mean,
        **overlap,
    )
    coord.submit(peer_id, order["round"], claim, sha, len(payload))
    return payload


def test_the_coordinator_replays_an_overlapped_contribution_and_it_passes(
    config: RunConfig, tmp_path: Path, clock: FakeClock
) -> None:
    """Round 0: a full budget each. Round 1: one step overlapped (round 0's stream from batch
    `steps`, from θ_0 − decode(payload_0)), rebased onto θ_1, then the rest; b flips its Δ."""
    cfg = defended(config, spot_check="coordinator", check_p_new=1.0, check_p_min=1.0)
    coord = Coordinator(cfg, tmp_path / "state", clock=clock, eval_batch_count=1)
    peers = [coord.register(name, {})["peer_id"] for name in ("a", "b")]
    torch.set_num_threads(1)
    steps = cfg.inner.steps
    first: dict[str, dict[str, Any]] = {}
    sent: dict[str, bytes] = {}
    for peer in peers:
        first[peer] = order = coord.work(peer)
        result = train(coord, order, peer, base_of(coord, order), 0, steps)
        sent[peer] = submit(coord, peer, order, result)
    assert coord.protocol.version == 1
    coord._replays.clear()  # round 0's checks are not the point here
    for peer in peers:
        order = coord.work(peer)
        assert order["kind"] == "work" and order["round"] == 1
        assert order["moments"] is not None  # published with θ_1 (the default state)
        theta0, theta1 = base_of(coord, first[peer]), base_of(coord, order)
        decoded = codec.decode(sent[peer], coord.shapes)
        # The overlapped steps start from θ_0's moments, the rest from θ_1's.
        theta_s = {**theta0, **{k: theta0[k] - decoded[k] for k in decoded}}
        carried = train(coord, first[peer], peer, theta_s, steps, 1)
        start = {k: theta1[k] - carried.delta[k] for k in carried.delta}
        rest = train(coord, order, peer, start, 0, steps - 1, base=theta1)
        sign = -1.0 if peer == peers[1] else 1.0
        result = Contribution(
            delta={k: sign * v for k, v in rest.delta.items()},
            samples=carried.samples + rest.samples,
            tokens=carried.tokens + rest.tokens,
            steps=steps,
            loss_first=carried.loss_first,
            loss_last=rest.loss_last,
            loss_mean=rest.loss_mean,
            seconds=0.0,
        )
        overlap = {"overlap_steps": 1, "overlap_round": 0, "overlap_first_batch": steps}
        submit(coord, peer, order, result, **overlap)
    assert coord.protocol.version == 2
    assert [o.prior is not None for o in coord._replays] == [True, True]
    for _ in range(2):  # one replay at a time, in a background thread
        coord.tick()
        assert coord._replaying is not None
        coord._replaying.join(timeout=120)
    outcomes = {(v["peer"], v["round"]): v["outcome"] for v in coord.status()["verdicts"]}
    assert outcomes[("a", 1)] == "check_passed"
    assert outcomes[("b", 1)] in ("check_failed", "banned")
