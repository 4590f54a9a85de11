"""End to end over loopback: a real coordinator process and real volunteer processes.

Covers the networked-system issue's tests: training through HTTP makes the loss fall; a
coordinator killed with SIGKILL mid-round and restarted loses nothing it acknowledged and the
volunteers reconnect by themselves; a volunteer killed mid-round does not stop the round from
closing at its deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from crowdtrain.store import SqliteStateStore
from crowdtrain_testing import join_command, write_e2e_config

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "crowdtrain.cli"]


def write_config(path: Path, corpus: Path, data: Path, **rounds: Any) -> Path:
    return write_e2e_config(path, corpus, data, "e2e", rounds=rounds)


class Run:
    """A coordinator process and its volunteers, cleaned up at the end of the test."""

    def __init__(self, tmp: Path, config: Path) -> None:
        self.tmp, self.config = tmp, config
        self.state = tmp / "state"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.server: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start_server(self) -> str:
        (self.state / "server.json").unlink(missing_ok=True)
        log = (self.tmp / f"server-{len(self.procs)}.log").open("wb")
        self.server = subprocess.Popen(
            [
                *CLI,
                "serve",
                "--config",
                str(self.config),
                "--state",
                str(self.state),
                "--port",
                str(self.port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(self.server)
        deadline = time.monotonic() + 60
        while not (self.state / "server.json").exists():
            assert self.server.poll() is None, "the coordinator exited during start-up"
            assert time.monotonic() < deadline, "the coordinator did not start"
            time.sleep(0.1)
        url = str(json.loads((self.state / "server.json").read_text())["url"])
        self.port = int(url.rsplit(":", 1)[1])
        return url

    def volunteer(self, url: str, name: str) -> subprocess.Popen[bytes]:
        home = self.tmp / name
        home.mkdir(exist_ok=True)
        env = {**os.environ, "CROWDTRAIN_CONFIG_DIR": str(home / "config")}
        proc = subprocess.Popen(
            join_command(url, name, home),
            stdout=(home / "log").open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.procs.append(proc)
        return proc

    def summary(self, name: str) -> dict[str, Any]:
        return dict(json.loads((self.tmp / name / "summary.json").read_text()))

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.fixture
def run(tmp_path: Path, corpus_file: Path) -> Iterator[Run]:
    r = Run(tmp_path, write_config(tmp_path / "run.toml", corpus_file, tmp_path / "data"))
    yield r
    r.stop()


def wait_until(what: str, check: Any, timeout: float = 120.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value is not None and value is not False:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def status(url: str) -> dict[str, Any]:
    try:
        return dict(httpx.get(f"{url}/v1/status", timeout=5).json())
    except httpx.HTTPError:
        return {}


def test_three_volunteers_three_rounds_loss_falls(run: Run) -> None:
    url = run.start_server()
    vols = [run.volunteer(url, f"v{i}") for i in range(3)]
    for v in vols:
        assert v.wait(timeout=180) == 0
    final = status(url)
    assert final["finished"] and len(final["rounds"]) == 3
    assert final["rounds"][-1]["eval_loss"] < final["initial_eval_loss"] - 0.5
    assert sum(run.summary(f"v{i}")["rounds"] for i in range(3)) >= 6


def test_a_compressed_broadcast_is_rebuilt_by_the_volunteers(run: Run) -> None:
    """With `broadcast.codec = "int8"` a volunteer that trained the last round rebuilds θ and
    the published moments from the update (checked by their hashes) instead of downloading
    them, and training still works."""
    text = run.config.read_text()
    run.config.write_text(text + '\n[broadcast]\ncodec = "int8"\n')
    url = run.start_server()
    vols = [run.volunteer(url, f"v{i}") for i in range(2)]
    for v in vols:
        assert v.wait(timeout=180) == 0
    final = status(url)
    assert final["finished"] and final["rounds"][-1]["eval_loss"] < final["initial_eval_loss"]
    summaries = [run.summary(f"v{i}") for i in range(2)]
    assert all(s["rounds"] >= 2 for s in summaries)
    assert all(s["rebuilt"] >= 2 for s in summaries)  # θ and moments of at least one version
    for i in range(2):
        assert "do not match" not in (run.tmp / f"v{i}" / "log").read_text()


def test_volunteers_score_each_others_contributions_over_http(run: Run) -> None:
    """With `defence.scoring = "peer"` trusted volunteers get score orders, download the
    scored payload and the validation shards, and submit the losses; the honest run passes."""
    text = run.config.read_text().replace("total = 3", "total = 4")
    run.config.write_text(
        text
        + '\n[defence]\nscoring = "peer"\nspot_check = "off"\nscore_per_round = 4\n'
        + "score_min_steps = 1\nprobation_rounds = 1\nreputation_initial = 0.5\n"
        + "trust_threshold = 0.5\n"
    )
    url = run.start_server()
    vols = [run.volunteer(url, f"v{i}") for i in range(3)]
    for v in vols:
        assert v.wait(timeout=180) == 0
    final = status(url)
    assert final["finished"] and final["rounds"][-1]["eval_loss"] < final["initial_eval_loss"]
    outcomes = [v["outcome"] for v in final["verdicts"] if v["stage"] == "usefulness"]
    assert "score_passed" in outcomes and "flagged" not in outcomes, final["verdicts"]
    assert sum(run.summary(f"v{i}")["verified"] for i in range(3)) >= 1


def test_coordinator_sigkill_mid_round_loses_nothing_acknowledged(run: Run) -> None:
    run.config.write_text(run.config.read_text().replace("total = 3", "total = 4"))
    url = run.start_server()
    vols = [run.volunteer(url, f"v{i}") for i in range(2)]
    db = run.state / "state.sqlite"

    def mid_round() -> bool:
        s = status(url)
        if not s or s["version"] < 1:
            return False
        store = SqliteStateStore(db)
        try:
            return len(store.contributions_for_round(s["round"])) >= 1
        finally:
            store.close()

    wait_until("a contribution in a round after the first", mid_round)
    assert run.server is not None
    run.server.send_signal(signal.SIGKILL)
    run.server.wait()
    run.start_server()  # same state dir, same port: the volunteers reconnect on their own
    for v in vols:
        assert v.wait(timeout=180) == 0
    store = SqliteStateStore(db)
    try:
        receipts = 0
        for name in ("v0", "v1"):
            summary = run.summary(name)
            for r in summary["receipts"]:
                row = store.get_contribution(summary["peer_id"], r["round"])
                assert row is not None and row.status == "accepted"
                assert row.receipt == r["receipt"]
                receipts += 1
        assert receipts >= 6
        assert store.latest_version().version == 4  # type: ignore[union-attr]
    finally:
        store.close()


def test_volunteer_killed_mid_round_round_closes_at_deadline(run: Run) -> None:
    run.config.write_text(run.config.read_text().replace("deadline_s = 20.0", "deadline_s = 8.0"))
    url = run.start_server()
    # The victim starts alone: with the others already running, a tiny run can finish its three
    # rounds before the victim's first request (it waits up to 5 s past a join window).
    victim = run.volunteer(url, "victim")

    def victim_round() -> int | None:
        store = SqliteStateStore(run.state / "state.sqlite")
        try:
            snapshot = store.get_json("protocol")
        finally:
            store.close()
        if not snapshot:
            return None
        ids = {p["peer_id"] for p in snapshot["peers"] if p["name"] == "victim"}
        orders = {o["peer_id"] for o in snapshot["round"]["orders"]}
        return int(snapshot["round"]["number"]) if ids & orders else None

    held = wait_until("the victim to hold a work order", victim_round)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    keep = [run.volunteer(url, f"v{i}") for i in range(2)]
    for v in keep:
        assert v.wait(timeout=180) == 0
    final = status(url)
    assert final["finished"] and len(final["rounds"]) == 3
    assert all(r["contributors"] >= 2 for r in final["rounds"])
    assert any(r["round"] == held for r in final["rounds"])  # its round closed without it


def test_ctrl_c_stops_a_volunteer_cleanly(run: Run) -> None:
    text = run.config.read_text().replace("total = 3", "total = 1000")
    run.config.write_text(text.replace("quorum = 2", "quorum = 1"))
    url = run.start_server()
    vol = run.volunteer(url, "v0")
    wait_until("the volunteer to contribute", lambda: status(url).get("version", 0) >= 1 or None)
    vol.send_signal(signal.SIGINT)
    assert vol.wait(timeout=60) == 0
    log = (run.tmp / "v0" / "log").read_text()
    assert "Traceback" not in log and "done:" in log
    assert run.summary("v0")["rounds"] >= 1
