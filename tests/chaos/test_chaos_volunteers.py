"""Volunteers killed and restarted, and volunteers behind a link that drops and stalls.

Real `crowdtrain join` processes against a real `crowdtrain serve`. One volunteer reaches the
coordinator through the project's WAN proxy (`crowdtrain.wan.WanProxy`) with a slow uplink, so
that its uploads take long enough to be caught in the middle.

* Killed: the volunteer is SIGKILLed while it holds a work order (training) and again while its
  upload body is arriving, and started again each time with the same identity (its home
  directory). The run finishes; its peer id never changed; no contribution is counted twice;
  every contribution acknowledged before a kill is still stored with the same receipt.
* Dropped and stalled: the proxy stalls every byte for a while (the coordinator answers other
  requests meanwhile), then resets every connection and refuses new ones for a while, once of
  them in the middle of an upload. The volunteer retries on its own and the run finishes with
  it in every round.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from chaos_helpers import Coordinator as Serve
from chaos_helpers import (
    Volunteers,
    accepted,
    holds_order,
    slow_upload,
    status,
    wait_until,
    write_config,
)

from crowdtrain.wan import WanProxy

pytestmark = pytest.mark.chaos
ROUNDS = 3


@pytest.fixture
def fleet(tmp_path: Path, corpus_file: Path) -> Iterator[tuple[Serve, Volunteers, WanProxy]]:
    config = write_config(tmp_path / "run.toml", corpus_file, tmp_path / "data")
    serve = Serve(tmp_path, config, tmp_path / "state")
    vols = Volunteers(tmp_path)
    serve.start()
    # ~40 kB payloads at 0.25 Mbit/s: an upload takes about a second and a half
    proxy = WanProxy("127.0.0.1", serve.port, up_mbps=0.25, down_mbps=None, latency_ms=5)
    proxy.start()
    try:
        yield serve, vols, proxy
    finally:
        vols.stop()
        proxy.stop()
        serve.stop()


def check_finished(serve: Serve, vols: Volunteers, names: list[str]) -> dict[str, str]:
    """The run finished with both volunteers in every round, each contribution counted once,
    and every receipt in a summary stored; returns name -> peer id."""
    final = status(serve.url)
    assert final["finished"] and len(final["rounds"]) == ROUNDS
    rows = accepted(serve.state)  # asserts no (peer, round) twice
    ids = {}
    for name in names:
        summary = vols.summary(name)
        ids[name] = summary["peer_id"]
        for r in summary["receipts"]:
            assert rows[(summary["peer_id"], r["round"])] == r["receipt"]
    for v in serve.versions()[1:]:
        contributors = v.metrics["contributors"]
        assert sorted(contributors) == sorted(ids.values())  # both, once each
    assert not list((serve.state / "blobs" / "tmp").glob("put-*"))  # no upload left half-way
    assert "Traceback" not in serve.log()
    return ids


def test_a_volunteer_killed_mid_training_and_mid_upload_comes_back(
    fleet: tuple[Serve, Volunteers, WanProxy],
) -> None:
    serve, vols, proxy = fleet
    slow_url = f"http://127.0.0.1:{proxy.port}"
    vols.start(serve.url, "steady")
    vols.start(slow_url, "victim")

    victim, held = wait_until(
        "the victim to hold a work order", lambda: holds_order(serve.state, "victim")
    )
    vols.kill("victim")  # mid-training (or fetching what it trains from)
    before = accepted(serve.state)
    assert (victim, held) not in before
    vols.start(slow_url, "victim")

    seen: dict[str, int] = {}
    wait_until("the victim's upload to be arriving", lambda: slow_upload(serve.state, seen))
    vols.kill("victim")  # mid-upload: the coordinator has part of its body
    before = accepted(serve.state)
    vols.start(slow_url, "victim")

    assert vols.wait("steady") == 0
    assert vols.wait("victim") == 0
    ids = check_finished(serve, vols, ["steady", "victim"])
    assert ids["victim"] == victim  # the same identity after each restart
    after = accepted(serve.state)
    for key, receipt in before.items():
        assert after[key] == receipt  # nothing acknowledged before a kill was lost or redone
    assert "Traceback" not in vols.logs("victim").split("killed")[-1]


def test_a_volunteer_behind_a_dropping_and_stalling_link_finishes(
    fleet: tuple[Serve, Volunteers, WanProxy],
) -> None:
    serve, vols, proxy = fleet
    vols.start(serve.url, "steady")
    vols.start(f"http://127.0.0.1:{proxy.port}", "remote")
    wait_until(
        "the remote volunteer to hold a work order", lambda: holds_order(serve.state, "remote")
    )

    proxy.stall(4.0)  # the link goes silent; the coordinator must go on answering others
    with httpx.Client(base_url=serve.url, timeout=10.0) as direct:
        for _ in range(8):  # about two seconds of the stall
            assert direct.get("/v1/status").status_code == 200
            assert direct.get("/v1/dashboard").status_code == 200
            time.sleep(0.25)

    seen: dict[str, int] = {}
    wait_until(
        "the remote volunteer's upload to be arriving", lambda: slow_upload(serve.state, seen)
    )
    proxy.drop(2.0)  # reset mid-upload, and no connection for two seconds
    assert status(serve.url)["finished"] is False
    wait_until("round 1", lambda: status(serve.url)["round"] >= 1)
    proxy.drop(2.0)  # and once more, later in the run
    proxy.stall(2.0)

    assert vols.wait("steady") == 0
    assert vols.wait("remote") == 0
    check_finished(serve, vols, ["steady", "remote"])
