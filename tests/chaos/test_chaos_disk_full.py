"""The coordinator's state disk full: 503 `disk_full`, the last good state kept, then onwards.

The real test puts a `crowdtrain serve` state directory on a 4 MiB tmpfs (root only: skipped
with the reason otherwise), closes a round, fills the file system to the last byte and checks
that an upload gets 503 `disk_full` with Retry-After (not a 500, a crash or a hang), that the
other routes answer 200 or that same 503, that no temp file is left holding space, and that the
last closed round and every receipt survive a SIGKILL on the full disk; once space is freed the
restarted coordinator finishes the run. The in-process test checks the mapping itself on any
machine: a blob write failing with ENOSPC and an SQLite write failing with SQLITE_FULL.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from chaos_helpers import Coordinator as Serve
from chaos_helpers import Driver, blob_path, load, sha256_file, status, write_config
from fastapi.testclient import TestClient

from crowdtrain.server.app import create_app
from crowdtrain.server.coordinator import Coordinator
from crowdtrain.store import DirBlobStore, SqliteStateStore

pytestmark = pytest.mark.chaos


def assert_disk_full(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    doc = r.json()
    assert doc["error"] == "disk_full" and "disk is full" in doc["detail"], doc
    assert int(r.headers["Retry-After"]) > 0


def test_enospc_and_sqlite_full_answer_503_disk_full(
    tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load(write_config(tmp_path / "run.toml", corpus_file, tmp_path / "data"))
    coordinator = Coordinator(config, tmp_path / "state", eval_batch_count=1)
    driver = Driver(config)
    with TestClient(create_app(coordinator), raise_server_exceptions=False) as client:
        driver.client = client
        v0 = driver.register("v0")
        order = client.post("/v1/work", headers=v0.auth).json()

        async def no_space(*args: object, **kwargs: object) -> tuple[str, int]:
            raise OSError(errno.ENOSPC, "No space left on device")

        with monkeypatch.context() as m:
            m.setattr(DirBlobStore, "put_async_stream", no_space)
            assert_disk_full(
                client.put(
                    f"/v1/contributions/{order['round']}",
                    content=driver.payload("v0", order["round"]),
                    headers={**v0.auth, "X-Crowdtrain-Meta": json.dumps(driver.meta(0))},
                )
            )

        def full(*args: object, **kwargs: object) -> None:
            exc = sqlite3.OperationalError("database or disk is full")
            exc.sqlite_errorname = "SQLITE_FULL"  # type: ignore[attr-defined]
            raise exc

        with monkeypatch.context() as m:
            m.setattr(SqliteStateStore, "add_peer", full)
            body = {"name": "v9", "device": {"kind": "cpu", "threads": 1, "name": "x"}}
            assert_disk_full(client.post("/v1/register", json=body))
        assert driver.upload(v0, order["round"], 0)  # space again: the same upload is taken
    coordinator.shutdown()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted at tmp_path/state, unmounted at the end whatever happened."""
    state = tmp_path / "state"
    state.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the state needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(state)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield state
    finally:
        if subprocess.run(["umount", str(state)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(state)], capture_output=True)


def fill(directory: Path) -> Path:
    """Write a file in DIRECTORY until the file system has no byte left; return it."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


def test_a_full_state_disk_answers_503_and_keeps_the_last_good_state(
    tmp_path: Path, corpus_file: Path, small_disk: Path
) -> None:
    config_path = write_config(tmp_path / "run.toml", corpus_file, tmp_path / "data")
    serve = Serve(tmp_path, config_path, small_disk)
    driver = Driver(load(config_path))
    try:
        url = serve.start()
        driver.connect(url)
        v0, v1 = driver.register("v0"), driver.register("v1")
        assert driver.step(v0) and driver.step(v1)  # round 0 closes: version 1
        client = driver.client
        assert client is not None
        order = client.post("/v1/work", headers=v0.auth).json()
        assert (order["kind"], order["round"]) == ("work", 1)
        filler = fill(small_disk)

        up = client.put(
            "/v1/contributions/1",
            content=driver.payload("v0", 1),
            headers={**v0.auth, "X-Crowdtrain-Meta": json.dumps(driver.meta(1))},
        )
        assert_disk_full(up)
        # every other route answers, and a write answers 200 (SQLite found room in its
        # write-ahead log) or the same 503: never a 500, never a hang
        body = {"name": "v2", "device": {"kind": "cpu", "threads": 1, "name": "x"}}
        for r in (
            client.post("/v1/register", json=body),
            client.post("/v1/heartbeat", headers=v1.auth),
            client.post("/v1/work", headers=v1.auth),
        ):
            assert r.status_code in (200, 503), r.text
            if r.status_code == 503:
                assert_disk_full(r)
        assert status(url)["version"] == 1
        assert serve.alive()
        assert not list((small_disk / "blobs" / "tmp").iterdir())  # no temp file holds space
        assert "Traceback" not in serve.log()

        # the last good state survives a crash on the full disk
        serve.stop()
        store = serve.store()
        try:
            latest = store.latest_version()
            assert latest is not None and latest.version == 1
            assert sha256_file(blob_path(small_disk, latest.weights_sha)) == latest.weights_sha
            for (_, rnd), (peer_id, receipt) in driver.receipts.items():
                row = store.get_contribution(peer_id, rnd)
                assert row is not None and row.receipt == receipt
        finally:
            store.close()

        filler.unlink()  # space again: the run goes on from there
        driver.connect(serve.start())
        driver.errors.clear()
        driver.run()
        assert not driver.errors, driver.errors
        assert [v.version for v in serve.versions()] == [0, 1, 2, 3]
        assert len(driver.receipts) == 6
    finally:
        driver.close()
        serve.stop()
