"""Crash safety in-process: a second coordinator on the same state directory picks up exactly.

Coordinator A is dropped without any shutdown (its SQLite connection simply stays open, as a
killed process's would have committed nothing more); coordinator B then opens the same
directory, as a restarted `crowdtrain serve` would.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from server_helpers import (
    FakeClock,
    assert_error,
    make_payload,
    register,
    server_config,
    upload,
    work,
)

from crowdtrain.config import ConfigError, RunConfig
from crowdtrain.protocol.broadcast import apply_update, weights_bytes
from crowdtrain.server.app import create_app
from crowdtrain.server.coordinator import Coordinator, put_tensors
from crowdtrain.train import evaluate

WRITE = "crowdtrain.server.coordinator.put_tensors"  # patched to fail a round's close


def start(config: RunConfig, state: Path, clock: FakeClock) -> Coordinator:
    return Coordinator(config, state, clock=clock, eval_batch_count=1)


def test_restart_keeps_receipts_and_the_open_round(
    config: RunConfig, tmp_path: Path, clock: FakeClock
) -> None:
    state = tmp_path / "state"
    a_coord = start(config, state, clock)
    with TestClient(create_app(a_coord), raise_server_exceptions=False) as a_client:
        p1, p2 = register(a_client, "one"), register(a_client, "two")
        order1, order2 = work(a_client, p1), work(a_client, p2)
        first = upload(a_client, p1, 0, make_payload(config, 1))
        assert first.status_code == 200
        manifest = a_client.get("/v1/manifest").json()
    # A is dropped here: no shutdown, no close.

    b_coord = start(config, state, clock)
    assert b_coord.protocol.submitted() == (p1.peer_id,)
    assert set(b_coord.protocol.assigned()) == {p1.peer_id, p2.peer_id}
    with TestClient(create_app(b_coord), raise_server_exceptions=False) as b_client:
        assert b_client.get("/v1/manifest").json() == manifest
        # Tokens survive; the same order is handed out again.
        again = work(b_client, p2)
        assert {**again, "deadline_in": 0} == {**order2, "deadline_in": 0}
        assert work(b_client, p1)["kind"] == "wait"
        assert upload(b_client, p1, 0, make_payload(config, 1)).json() == first.json()
        second = upload(b_client, p2, 0, make_payload(config, 2))
        assert second.status_code == 200, second.text
        status = b_client.get("/v1/status").json()
        assert status["version"] == 1 and status["round"] == 1
        assert status["rounds"][0]["contributors"] == 2
        version = b_coord.store.get_version(1)
        assert version is not None
        assert set(version.metrics["contributors"]) == {p1.peer_id, p2.peer_id}
        nxt = work(b_client, p1)
        assert (nxt["round"], nxt["base_version"]) == (1, 1)
        assert nxt["weights"] != order1["weights"]

    c_coord = start(config, state, clock)
    assert (c_coord.protocol.version, c_coord.protocol.round) == (1, 1)
    assert c_coord.store.get_version(1) is not None


def test_crash_while_closing_a_round_loses_no_receipt(
    config: RunConfig, tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between accepting the quorum's last upload and writing the new version leaves
    the store as it was before that upload (no receipt was given for it)."""
    state = tmp_path / "state"
    a_coord = start(config, state, clock)
    with TestClient(create_app(a_coord), raise_server_exceptions=False) as a_client:
        p1, p2 = register(a_client, "one"), register(a_client, "two")
        work(a_client, p1), work(a_client, p2)
        first = upload(a_client, p1, 0, make_payload(config, 1)).json()

        def crash(*args: object, **kwargs: object) -> str:
            raise RuntimeError("simulated crash while writing the new weights")

        monkeypatch.setattr(WRITE, crash)
        r = upload(a_client, p2, 0, make_payload(config, 2))
        assert_error(r, 500)
        assert "simulated" not in r.text
    monkeypatch.undo()

    b_coord = start(config, state, clock)
    assert b_coord.protocol.version == 0
    assert b_coord.protocol.submitted() == (p1.peer_id,)
    with TestClient(create_app(b_coord), raise_server_exceptions=False) as b_client:
        assert upload(b_client, p1, 0, make_payload(config, 1)).json() == first
        assert upload(b_client, p2, 0, make_payload(config, 2)).status_code == 200
        assert b_coord.protocol.version == 1
        assert b_client.get("/v1/status").json()["rounds"][0]["contributors"] == 2


def test_a_different_config_on_the_same_state_is_refused(
    config: RunConfig,
    tmp_path: Path,
    clock: FakeClock,
    server_corpus: Path,
    server_data_dir: Path,
) -> None:
    state = tmp_path / "state"
    start(config, state, clock)
    other = server_config(server_corpus, server_data_dir, total=5)
    with pytest.raises(ConfigError) as info:
        start(other, state, clock)
    message = str(info.value)
    assert str(state) in message and "config" in message
    assert "\n" not in message and "Traceback" not in message
    # The original config still opens it.
    assert start(config, state, clock).protocol.version == 0


def test_a_failed_close_leaves_the_live_coordinator_consistent(
    client: TestClient, coordinator: Coordinator, config: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If writing a closed round fails (disk full, ...), the coordinator goes back to its durable
    state instead of running ahead of it; the retried upload then closes the round."""
    p1, p2 = register(client, "one"), register(client, "two")
    work(client, p1), work(client, p2)
    first = upload(client, p1, 0, make_payload(config, 1)).json()
    calls = 0

    def fail_once(*args: object, **kwargs: object) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("no space left on device")
        return put_tensors(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(WRITE, fail_once)
    assert_error(upload(client, p2, 0, make_payload(config, 2)), 500)
    assert coordinator.protocol.version == 0
    assert coordinator.protocol.submitted() == (p1.peer_id,)
    assert work(client, p2)["round"] == 0
    second = upload(client, p2, 0, make_payload(config, 2))
    assert second.status_code == 200, second.text
    assert upload(client, p1, 0, make_payload(config, 1)).json() == first
    assert coordinator.protocol.version == 1
    nxt = work(client, p1)
    assert (nxt["kind"], nxt["round"], nxt["base_version"]) == ("work", 1, 1)
    assert client.get(f"/v1/blobs/{nxt['weights']}").status_code == 200


def test_a_version_stored_without_its_evaluation_is_evaluated_at_restart(
    config: RunConfig, tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new version's held-out loss is computed after the version is stored (off the round's
    critical path); if the coordinator stops before it is, the next start computes it."""
    state = tmp_path / "state"
    a_coord = start(config, state, clock)

    def stop(*args: object, **kwargs: object) -> float:
        raise RuntimeError("simulated stop while evaluating the new weights")

    with TestClient(create_app(a_coord), raise_server_exceptions=False) as a_client:
        p1, p2 = register(a_client, "one"), register(a_client, "two")
        work(a_client, p1), work(a_client, p2)
        upload(a_client, p1, 0, make_payload(config, 1))
        monkeypatch.setattr("crowdtrain.server.coordinator.evaluate", stop)
        assert upload(a_client, p2, 0, make_payload(config, 2)).status_code == 200
        a_coord.settle()  # the evaluation failed, the version and the receipts stand
        monkeypatch.undo()
        assert a_coord.store.get_version(1).metrics["eval_loss"] is None  # type: ignore[union-attr]
        assert a_client.get("/v1/status").json()["rounds"][0]["eval_loss"] is None
    b_coord = start(config, state, clock)
    b_coord.settle()
    loss = b_coord.store.get_version(1).metrics["eval_loss"]  # type: ignore[union-attr]
    assert loss == evaluate(config.model, b_coord.protocol.params, b_coord.evals)


def test_a_restart_keeps_the_compressed_broadcast_exact(
    config: RunConfig, tmp_path: Path, clock: FakeClock
) -> None:
    """With an int8 broadcast the published θ_1 is θ_0 plus the stored update, bit for bit,
    and a restarted coordinator carries on with the same error-feedback residual."""

    cfg = config.model_copy(
        update={"broadcast": config.broadcast.model_copy(update={"codec": "int8"})}
    )
    state = tmp_path / "state"
    a_coord = start(cfg, state, clock)
    with TestClient(create_app(a_coord), raise_server_exceptions=False) as a_client:
        p1, p2 = register(a_client, "one"), register(a_client, "two")
        order = work(a_client, p1)
        work(a_client, p2)
        assert upload(a_client, p1, 0, make_payload(cfg, 1)).status_code == 200
        assert upload(a_client, p2, 0, make_payload(cfg, 2)).status_code == 200
    residual = {k: t.clone() for k, t in a_coord.protocol.broadcast.residual.items()}
    assert residual and any(bool(t.abs().max() > 0) for t in residual.values())
    version = a_coord.store.get_version(1)
    assert version is not None and version.metrics["update_sha"]
    theta0 = a_coord._tensors(order["weights"])
    update = a_coord.blobs.read(version.metrics["update_sha"])
    rebuilt = apply_update(theta0, bytes(update), a_coord.shapes)
    assert a_coord.blobs.put_bytes(weights_bytes(rebuilt)) == version.weights_sha

    b_coord = start(cfg, state, clock)
    assert b_coord.protocol.version == 1
    got = b_coord.protocol.broadcast.residual
    assert set(got) == set(residual) and all(torch.equal(got[k], residual[k]) for k in residual)


def test_a_wait_rewrites_no_snapshot_and_a_restart_loses_nothing(
    config: RunConfig, tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting volunteers poll POST /v1/work every 0.25 s; a wait changes nothing durable, so
    it must not rewrite the protocol snapshot (O(peers) under the lock: 40 ms a poll at 1,000
    peers, bench/load_volunteers.py). New orders are still persisted."""
    state = tmp_path / "state"
    a_coord = start(config, state, clock)
    writes: list[str] = []
    put_json = a_coord.store.put_json

    def counting(key: str, value: object) -> None:
        writes.append(key)
        put_json(key, value)

    monkeypatch.setattr(a_coord.store, "put_json", counting)
    with TestClient(create_app(a_coord), raise_server_exceptions=False) as a_client:
        p1, p2 = register(a_client, "one"), register(a_client, "two")
        assert work(a_client, p1)["kind"] == "work"
        assert upload(a_client, p1, 0, make_payload(config, 1)).status_code == 200
        writes.clear()
        for _ in range(3):  # its contribution is in; the quorum (2) is not
            assert work(a_client, p1)["kind"] == "wait"
        assert writes == []
        order2 = work(a_client, p2)
        assert order2["kind"] == "work"
        assert writes == ["protocol"]
    b_coord = start(config, state, clock)
    assert b_coord.protocol.submitted() == (p1.peer_id,)
    assert set(b_coord.protocol.assigned()) == {p1.peer_id, p2.peer_id}
