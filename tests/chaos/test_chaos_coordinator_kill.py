"""The coordinator SIGKILLed at each named point (`crowdtrain.faults`), then started again.

For every point a real `crowdtrain serve` runs with ``CROWDTRAIN_CRASH_AT=<point>:<n>`` while
the scripted volunteers of `chaos_helpers.Driver` work through a 3-round run; the process kills
itself there. What the dead process left on disk is checked (every receipt the volunteers were
given is a stored accepted contribution with the same id, every version's blobs hash to their
ids), then the coordinator is started again without the hook on the same state and port, and:

* it serves the last closed round's weights (the version it resumes at is the last one stored
  before the crash, the next work order starts from it, its blob hashes to its id);
* the volunteers finish the run with it, and no answer was a 5xx;
* every receipt given before or after the crash is in the store, once per (peer, round);
* every version's weights are bitwise those of the same run without a crash (the driver's
  contributions are deterministic, so each round closes with the same inputs).
"""

from __future__ import annotations

import hashlib
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from chaos_helpers import Coordinator as Serve
from chaos_helpers import (
    CoordinatorDied,
    Driver,
    blob_path,
    load,
    sha256_file,
    status,
    write_config,
)

pytestmark = pytest.mark.chaos

#: (point, n): the n-th time the point is reached. The driver's volunteers v0 and v1 go in turn
#: (v0 work, v0 upload, v1 work, v1 upload, which closes the round), so n = 3 of an upload point
#: is v0's upload in round 1 and n = 2 of a close point is the close of round 1.
POINTS: list[tuple[str, int]] = [
    ("start.before_version0", 1),  # θ₀ stored, its version row not yet committed (fresh state)
    ("register.in_transaction", 2),
    ("register.after_commit", 2),  # the peer is stored; the reply never left
    ("work.after_order", 3),
    ("blob.before_rename", 1),  # the payload fsynced in its temp file, not yet renamed
    ("blob.after_rename", 5),  # a blob of round 0's close renamed, its directory not fsynced
    ("upload.after_blob", 3),
    ("receipt.in_transaction", 3),  # contribution row and snapshot written, not committed
    ("receipt.after_commit", 3),  # the receipt is durable; the reply never left
    ("arrival.analysis", 2),  # on-arrival screening of an accepted contribution
    ("close.after_outer_step", 2),
    # the close's blobs (written concurrently): each group once, θ on both sides
    ("close.before_blob.weights", 2),
    ("close.after_blob.weights", 2),
    ("close.before_blob.outer", 2),
    ("close.after_blob.aggregate", 2),
    ("close.after_blob.moments", 2),
    ("close.before_blob.residual", 2),  # the compressed broadcast's residual and update
    ("close.before_blob.update", 2),
    ("close.in_transaction", 2),  # the version row and snapshot written, not committed
    ("close.after_commit", 2),
    ("eval.before_commit", 1),  # the new version's held-out loss computed, not stored
    ("sqlite.before_commit", 4),  # the COMMIT of round 0's first receipt
]


@dataclass
class Reference:
    """A state directory with no peer yet, and the weights of every version of a run from it
    without any crash."""

    config: Path
    template: Path
    weights: list[str]


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Iterator[Reference]:
    tmp = tmp_path_factory.mktemp("chaos-reference")
    config = write_config(tmp / "run.toml", corpus_file, tmp / "data")
    serve = Serve(tmp, config, tmp / "state")
    driver = Driver(load(config))
    try:
        serve.start()
        serve.stop()  # a fresh state, as any start leaves it: the template of every test
        shutil.copytree(tmp / "state", tmp / "template")
        driver.connect(serve.start())
        driver.run()
        assert not driver.errors, driver.errors
        weights = [v.weights_sha for v in serve.versions()]
        assert len(weights) == 4
        yield Reference(config, tmp / "template", weights)
    finally:
        driver.close()
        serve.stop()


@pytest.fixture
def crash_run(tmp_path: Path, reference: Reference) -> Iterator[tuple[Serve, Driver]]:
    serve = Serve(tmp_path, reference.config, tmp_path / "state")
    driver = Driver(load(reference.config))
    try:
        yield serve, driver
    finally:
        driver.close()
        serve.stop()


def check_durable(serve: Serve, driver: Driver) -> None:
    """Every receipt given is an accepted contribution in the store, with the same id; every
    stored version's blobs are whole (they hash to their ids)."""
    store = serve.store()
    try:
        for (name, rnd), (peer_id, receipt) in driver.receipts.items():
            row = store.get_contribution(peer_id, rnd)
            assert row is not None, f"{name}'s receipt for round {rnd} is lost"
            assert (row.status, row.receipt) == ("accepted", receipt)
        for v in store.list_versions():
            for sha in (v.weights_sha, v.optimizer_sha, v.aggregate_sha):
                if sha is not None:
                    assert sha256_file(blob_path(serve.state, sha)) == sha
            contributors = v.metrics.get("contributors", [])
            assert len(contributors) == len(set(contributors))
    finally:
        store.close()


@pytest.mark.parametrize(("point", "nth"), POINTS, ids=[f"{p}:{n}" for p, n in POINTS])
def test_coordinator_killed_at(
    point: str, nth: int, crash_run: tuple[Serve, Driver], reference: Reference
) -> None:
    serve, driver = crash_run
    if point.startswith("start."):
        serve.start(crash_at=f"{point}:{nth}", wait=False)
    else:
        shutil.copytree(reference.template, serve.state)
        driver.connect(serve.start(crash_at=f"{point}:{nth}"))
        with pytest.raises(CoordinatorDied):
            driver.run()  # finishing means the point was never reached
    assert serve.wait_dead() == -signal.SIGKILL
    assert f"CROWDTRAIN_CRASH_AT={point}:{nth}" in serve.log()
    assert not driver.errors, driver.errors

    before = serve.versions()
    check_durable(serve, driver)
    for v in before:
        assert v.weights_sha == reference.weights[v.version]

    url = serve.start()  # no hook, same state, same port
    driver.connect(url)
    if before:
        last = before[-1]
        assert status(url)["version"] == last.version  # resumes at the last closed round
        assert driver.client is not None
        blob = driver.client.get(f"/v1/blobs/{last.weights_sha}")
        assert blob.status_code == 200
        assert hashlib.sha256(blob.content).hexdigest() == last.weights_sha
        seen, resent = len(driver.bases), bool(driver.pending)
    driver.run()
    assert not driver.errors, driver.errors
    if before and not resent:
        # the first order after the restart starts from the last version stored before it
        # (unless an upload the crash left unanswered, sent again first, closed that round)
        assert driver.bases[seen] == (last.version, last.weights_sha)

    after = serve.versions()
    assert [v.weights_sha for v in after] == reference.weights
    for v in before:
        assert after[v.version].weights_sha == v.weights_sha
    check_durable(serve, driver)
    assert len(driver.receipts) == 6  # 2 volunteers × 3 rounds, each counted once
    store = serve.store()
    try:
        for rnd in range(3):
            accepted = [c for c in store.contributions_for_round(rnd) if c.status == "accepted"]
            assert len(accepted) == 2
    finally:
        store.close()
    assert "Traceback" not in serve.log()
