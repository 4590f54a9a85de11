"""The dashboard's server side: the page, /v1/dashboard, /metrics, the admin API, trackers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import (
    FakeClock,
    Peer,
    assert_error,
    make_payload,
    meta,
    register,
    upload,
    work,
)
from test_server_tracking import Recorder

from crowdtrain.config import RunConfig
from crowdtrain.server.app import create_app
from crowdtrain.server.coordinator import Coordinator
from crowdtrain.server.dashboard import Timeline

ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture
def tracker() -> Recorder:
    return Recorder()


@pytest.fixture
def admin_coordinator(
    config: RunConfig, tmp_path: Path, clock: FakeClock, tracker: Recorder
) -> Coordinator:
    return Coordinator(
        config,
        tmp_path / "state",
        clock=clock,
        eval_batch_count=1,
        admin_token="admin-secret",
        trackers=[tracker],
    )


@pytest.fixture
def admin_client(admin_coordinator: Coordinator) -> Iterator[TestClient]:
    with TestClient(create_app(admin_coordinator), raise_server_exceptions=False) as c:
        yield c


def close_round(client: TestClient, config: RunConfig, peers: list[Peer], rnd: int = 0) -> None:
    for peer in peers:
        assert work(client, peer)["kind"] == "work"
    for i, peer in enumerate(peers):
        header = meta(rnd, compute_s=3.0, wall_s=4.0)
        r = upload(client, peer, rnd, make_payload(config, seed=10 * rnd + i), header)
        assert r.status_code == 200, r.text


def metric(client: TestClient, name: str, **labels: str) -> float:
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels} in /metrics")


def test_the_page_and_its_assets_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/dashboard.js" in page.text
    script = client.get("/static/dashboard.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert client.get("/static/dashboard.css").status_code == 200
    assert_error(client.get("/static/nothing.js"), 404)


def test_dashboard_document_after_a_round(
    admin_client: TestClient, admin_coordinator: Coordinator, config: RunConfig
) -> None:
    empty = admin_client.get("/v1/dashboard").json()
    assert empty["rounds"] == [] and empty["volunteers"] == [] and empty["version"] == 0
    assert empty["round"]["number"] == 0 and empty["round"]["total"] == config.rounds.total
    assert empty["sample"]["version"] == 0 and empty["sample"]["prompt"] == "def "
    peers = [register(admin_client, "alice"), register(admin_client, "bob")]
    assert work(admin_client, peers[0])["kind"] == "work"
    mid = admin_client.get("/v1/dashboard").json()
    assert mid["round"]["assigned"] == ["alice"] and mid["round"]["submitted"] == []
    close_round(admin_client, config, peers)
    admin_coordinator.tick()
    admin_coordinator.settle()  # the new version's evaluation runs after its commit
    doc = admin_client.get("/v1/dashboard").json()
    assert doc["version"] == 1 and doc["round"]["number"] == 1
    (row,) = doc["rounds"]
    assert row["round"] == 0 and row["contributors"] == 2 and row["samples"] == 16
    assert row["eval_loss"] is not None and row["aggregation_s"] >= 0
    assert row["compute_utilization"] == pytest.approx(0.75)
    assert doc["initial_eval_loss"] > 0
    names = [v["name"] for v in doc["volunteers"]]
    assert sorted(names) == ["alice", "bob"]
    alice = next(v for v in doc["volunteers"] if v["name"] == "alice")
    assert alice["device"] == "cpu · 1 thread · t" and alice["accepted"] == 1
    assert alice["samples"] == 8 and alice["peer_id"] == peers[0].peer_id
    assert doc["totals"]["bytes_in"] > 2 * len(make_payload(config))
    assert doc["totals"]["contributions_accepted"] == 2
    assert doc["sample"]["version"] == 1 and isinstance(doc["sample"]["text"], str)
    assert doc["peers_online"][-1][1] == 2
    assert "token" not in json.dumps(doc)


def test_rejections_show_stage_and_reason(
    admin_client: TestClient, admin_coordinator: Coordinator
) -> None:
    peer = register(admin_client, "mallory")
    r = admin_client.post(
        f"/v1/admin/peers/{peer.peer_id}/ban", json={"reason": "spam"}, headers=ADMIN
    )
    assert r.status_code == 200
    (row,) = admin_client.get("/v1/dashboard").json()["rejections"]
    assert (row["peer"], row["stage"], row["outcome"], row["reason"]) == (
        "mallory",
        "admin",
        "banned",
        "spam",
    )


def test_metrics_count_rounds_contributions_and_bytes(
    admin_client: TestClient, admin_coordinator: Coordinator, config: RunConfig
) -> None:
    peers = [register(admin_client, "a"), register(admin_client, "b")]
    bad = upload(admin_client, peers[0], 0, b"not a payload")
    assert bad.status_code == 400
    close_round(admin_client, config, peers)
    admin_coordinator.tick()
    admin_coordinator.settle()  # the new version's evaluation runs after its commit
    assert metric(admin_client, "crowdtrain_rounds_total") == 1
    assert metric(admin_client, "crowdtrain_round") == 1
    assert metric(admin_client, "crowdtrain_contributions_total", outcome="accepted") == 2
    rejected = metric(admin_client, "crowdtrain_contributions_total", outcome="rejected")
    assert rejected == 1
    assert metric(admin_client, "crowdtrain_bytes_received_total") > 2 * len(make_payload(config))
    assert metric(admin_client, "crowdtrain_bytes_sent_total") > 0
    assert metric(admin_client, "crowdtrain_peers_online") == 2
    assert metric(admin_client, "crowdtrain_eval_loss") > 0
    assert metric(admin_client, "crowdtrain_aggregation_seconds_count") == 1


def test_trackers_get_each_closed_round(
    admin_client: TestClient, config: RunConfig, tracker: Recorder
) -> None:
    peers = [register(admin_client, "a"), register(admin_client, "b")]
    close_round(admin_client, config, peers)
    admin_client.app.state.coordinator.settle()  # type: ignore[attr-defined]
    ((numbers, step),) = tracker.logged
    assert step == 0 and numbers["contributors"] == 2 and numbers["samples"] == 16
    assert numbers["eval_loss"] > 0 and numbers["compute_utilization"] == pytest.approx(0.75)


def test_admin_calls_need_the_admin_token(admin_client: TestClient, client: TestClient) -> None:
    assert_error(admin_client.post("/v1/admin/pause"), 401)
    bad = {"Authorization": "Bearer nope"}
    assert_error(admin_client.post("/v1/admin/pause", headers=bad), 401)
    peer = register(admin_client, "vol")
    assert_error(admin_client.post("/v1/admin/pause", headers=peer.auth), 401)
    assert admin_client.get("/v1/admin/check", headers=ADMIN).json() == {"ok": True}
    # A coordinator started without an admin token has no admin view at all.
    assert assert_error(client.post("/v1/admin/pause", headers=ADMIN), 403)["error"] == "no_admin"


def test_pause_holds_work_until_resume(
    admin_client: TestClient, admin_coordinator: Coordinator, config: RunConfig
) -> None:
    peers = [register(admin_client, "a"), register(admin_client, "b")]
    assert admin_client.post("/v1/admin/pause", headers=ADMIN).json() == {"paused": True}
    reply = work(admin_client, peers[0])
    assert reply["kind"] == "wait" and "paused" in reply["reason"]
    assert admin_client.get("/v1/dashboard").json()["paused"] is True
    assert metric(admin_client, "crowdtrain_run_paused") in (0, 1)  # set at the next tick
    admin_coordinator.tick()
    assert metric(admin_client, "crowdtrain_run_paused") == 1
    assert admin_client.post("/v1/admin/resume", headers=ADMIN).json() == {"paused": False}
    close_round(admin_client, config, peers)
    assert admin_client.get("/v1/dashboard").json()["version"] == 1


def test_ban_and_unban_through_the_admin_api(admin_client: TestClient) -> None:
    peer = register(admin_client, "eve")
    url = f"/v1/admin/peers/{peer.peer_id}"
    assert admin_client.post(f"{url}/ban", json={"reason": "spam"}, headers=ADMIN).json() == {
        "peer_id": peer.peer_id,
        "banned": True,
    }
    refused = assert_error(admin_client.post("/v1/work", headers=peer.auth), 403)
    assert "spam" in refused["detail"]
    row = next(v for v in admin_client.get("/v1/dashboard").json()["volunteers"])
    assert row["banned"] and row["ban_reason"] == "spam"
    assert admin_client.post(f"{url}/unban", headers=ADMIN).json()["banned"] is False
    assert work(admin_client, peer)["kind"] == "work"
    # The default reason, an unknown peer and a bad body.
    assert admin_client.post(f"{url}/ban", headers=ADMIN).status_code == 200
    assert "organizer" in admin_client.get("/v1/status").json()["peers"][0]["ban_reason"]
    assert_error(admin_client.post("/v1/admin/peers/p-nobody/ban", headers=ADMIN), 404)
    assert_error(admin_client.post(f"{url}/ban", json={"reason": ""}, headers=ADMIN), 400)


def test_deadline_change(
    admin_client: TestClient, admin_coordinator: Coordinator, clock: FakeClock
) -> None:
    r = admin_client.post(
        "/v1/admin/deadline", json={"deadline_in": 5, "round_seconds": 12}, headers=ADMIN
    )
    assert r.status_code == 200 and r.json()["deadline"] == pytest.approx(clock.now + 5)
    doc = admin_client.get("/v1/dashboard").json()
    assert doc["round"]["deadline"] == pytest.approx(clock.now + 5)
    assert doc["round"]["round_seconds"] == 12
    for body in ({"deadline_in": 0}, {"deadline_in": -3}, {"deadline_in": 5, "round_seconds": 0}):
        assert_error(admin_client.post("/v1/admin/deadline", json=body, headers=ADMIN), 400)
    assert_error(admin_client.post("/v1/admin/deadline", content=b"{", headers=ADMIN), 400)


def test_admin_state_survives_a_restart(
    admin_client: TestClient, admin_coordinator: Coordinator, config: RunConfig, clock: FakeClock
) -> None:
    peer = register(admin_client, "eve")
    admin_client.post("/v1/admin/pause", headers=ADMIN)
    admin_client.post(f"/v1/admin/peers/{peer.peer_id}/ban", json={"reason": "x"}, headers=ADMIN)
    admin_client.post(f"/v1/admin/peers/{peer.peer_id}/unban", headers=ADMIN)
    again = Coordinator(config, admin_coordinator.state_dir, clock=clock, eval_batch_count=1)
    assert again.protocol.paused
    assert not again.protocol.peers[peer.peer_id].standing.banned
    assert again.authenticate(peer.token) == peer.peer_id


def test_since_returns_only_the_newer_rounds(
    admin_client: TestClient, admin_coordinator: Coordinator, config: RunConfig
) -> None:
    peers = [register(admin_client, "a"), register(admin_client, "b")]
    close_round(admin_client, config, peers, 0)
    close_round(admin_client, config, peers, 1)
    full = admin_client.get("/v1/dashboard").json()
    assert full["since"] is None and [r["version"] for r in full["rounds"]] == [1, 2]
    newer = admin_client.get("/v1/dashboard?since=1").json()
    assert newer["since"] == 1 and [r["version"] for r in newer["rounds"]] == [2]
    assert newer["started_at"] == full["started_at"]
    assert newer["initial_eval_loss"] == full["initial_eval_loss"]
    assert admin_client.get("/v1/dashboard?since=2").json()["rounds"] == []
    assert_error(admin_client.get("/v1/dashboard?since=-1"), 400)
    assert_error(admin_client.get("/v1/dashboard?since=x"), 400)


def test_timeline_keeps_changes_and_thins_itself_in_bounded_memory() -> None:
    line = Timeline(every_s=5.0, max_points=8)
    line.sample(0.0, 0, 0.0, 0.0)
    line.sample(1.0, 2, 1000.0, 500.0)  # a change is kept at once
    line.sample(2.0, 2, 2000.0, 1000.0)  # no change, too soon
    assert line.peers == [(0.0, 0), (1.0, 2)]
    line.sample(5.0, 2, 5000.0, 2500.0)
    assert line.bandwidth == [(5.0, 1000.0, 500.0)]  # rates over the 5 s since the start
    for i in range(2, 200):
        line.sample(5.0 * i, 2, 5000.0 * i, 2500.0 * i)
    assert len(line.peers) < 8 and len(line.bandwidth) < 8
    assert line.peers[0] == (0.0, 0) and line.peers[-1][0] > 900  # still the whole run
    assert all(b[1] == 1000.0 and b[2] == 500.0 for b in line.bandwidth)
    assert line.peers_every > 5.0 and line.bandwidth_every > 5.0
