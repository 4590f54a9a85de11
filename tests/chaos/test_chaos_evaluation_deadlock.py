"""Regression: a slow evaluation of a new version must not deadlock the coordinator.

Found by the chaos suite (the coordinator killed at ``eval.before_commit``, then restarted with
a version left to evaluate): evaluations ran on the on-arrival executor and take the
coordinator's lock to store their loss, while an event that may close a round (a tick, an
upload) waits under that lock for the on-arrival work, which was queued behind the evaluation.
Here the evaluation is made slow on purpose and a tick comes while it runs.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from chaos_helpers import Driver, load, write_config
from fastapi.testclient import TestClient

import crowdtrain.server.coordinator as coordinator_module
from crowdtrain.server.app import create_app
from crowdtrain.server.coordinator import Coordinator

pytestmark = pytest.mark.chaos


def test_a_tick_during_a_slow_evaluation_does_not_deadlock(
    tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load(write_config(tmp_path / "run.toml", corpus_file, tmp_path / "data"))
    coordinator = Coordinator(config, tmp_path / "state", eval_batch_count=1)
    evaluate = coordinator_module.evaluate
    evaluating = threading.Event()

    def slow(*args: object, **kwargs: object) -> float:
        evaluating.set()
        time.sleep(1.0)
        return float(evaluate(*args, **kwargs))  # type: ignore[arg-type]

    monkeypatch.setattr(coordinator_module, "evaluate", slow)
    driver = Driver(config)
    with TestClient(
        create_app(coordinator, tick_interval=3600), raise_server_exceptions=False
    ) as c:
        driver.client = c
        v0, v1 = driver.register("v0"), driver.register("v1")
        assert driver.step(v0) and driver.step(v1)  # round 0 closes: version 1 is evaluated
        assert evaluating.wait(30)
        assert driver.step(v0)  # its on-arrival work is queued while the evaluation runs
        tick = threading.Thread(target=coordinator.tick, daemon=True)
        tick.start()
        tick.join(timeout=60)
        assert not tick.is_alive(), "the tick deadlocked with the evaluation"
        coordinator.settle()
        version = coordinator.store.get_version(1)
        assert version is not None and version.metrics["eval_loss"] is not None
    coordinator.shutdown()
