"""Unit tests of `crowdtrain.server.metrics`: values read back from the text exposition, and
the byte-counting ASGI middleware on a tiny Starlette app (plain and streamed bodies)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message

from crowdtrain.server.metrics import MAX_REASONS, ByteCounter, RunMetrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(metrics: RunMetrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: RunMetrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, tuple(sorted(labels.items())))]


def test_fresh_metrics_are_zero_and_registries_are_separate() -> None:
    a, b = RunMetrics(), RunMetrics()  # a second one must not clash on metric names
    a.bytes_received(10)
    assert value(a, "crowdtrain_bytes_received_total") == 10
    assert value(b, "crowdtrain_bytes_received_total") == 0
    for name in ("crowdtrain_rounds_total", "crowdtrain_round", "crowdtrain_peers_online"):
        assert value(b, name) == 0


def test_every_metric_has_a_help_text() -> None:
    body, _ = RunMetrics().render()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    expected = {
        "crowdtrain_rounds",
        "crowdtrain_round",
        "crowdtrain_model_version",
        "crowdtrain_contributions",
        "crowdtrain_contribution_samples",
        "crowdtrain_bytes_received",
        "crowdtrain_bytes_sent",
        "crowdtrain_peers_online",
        "crowdtrain_peers_banned",
        "crowdtrain_peers_registered",
        "crowdtrain_eval_loss",
        "crowdtrain_train_loss",
        "crowdtrain_aggregation_seconds",
        "crowdtrain_round_duration_seconds",
        "crowdtrain_run_paused",
        "crowdtrain_run_finished",
    }
    assert expected <= set(families)
    for name in expected:
        assert families[name].documentation


def test_contributions_by_outcome_and_reason() -> None:
    m = RunMetrics()
    m.contribution(True, samples=64)
    m.contribution(True, samples=32)
    m.contribution(False, "norm")
    m.contribution(False, "norm")
    m.contribution(False, "Spot-Check failed!")
    c = "crowdtrain_contributions_total"
    assert value(m, c, outcome="accepted", reason="") == 2
    assert value(m, c, outcome="rejected", reason="norm") == 2
    assert value(m, c, outcome="rejected", reason="spot_check_failed") == 1
    assert value(m, "crowdtrain_contribution_samples_total") == 96
    snap = m.snapshot()
    assert snap["contributions_accepted_total"] == 2
    assert snap["contributions_rejected_total"] == 3
    assert snap["contribution_samples_total"] == 96


def test_rejection_reasons_are_bounded() -> None:
    m = RunMetrics()
    for i in range(MAX_REASONS + 5):
        m.contribution(False, f"r{i}")
    m.contribution(False, "r0")  # a known reason keeps its label
    m.contribution(False, "")
    rejected = {
        labels: v
        for (name, labels), v in samples(m).items()
        if name == "crowdtrain_contributions_total" and ("outcome", "rejected") in labels
    }
    assert len(rejected) == MAX_REASONS + 1  # the first MAX_REASONS, then "other"
    assert rejected[(("outcome", "rejected"), ("reason", "r0"))] == 2
    assert rejected[(("outcome", "rejected"), ("reason", "other"))] == 6


def test_round_closed_sets_gauges_and_histograms() -> None:
    m = RunMetrics()
    m.round_closed(
        round=0, version=1, eval_loss=2.5, train_loss=2.75, aggregation_s=0.02, duration_s=45.0
    )
    m.round_closed(
        round=1,
        version=2,
        eval_loss=2.25,
        train_loss=math.nan,  # no loss reported: keeps the last one
        aggregation_s=3.0,
        duration_s=90.0,
    )
    assert value(m, "crowdtrain_rounds_total") == 2
    assert value(m, "crowdtrain_round") == 2
    assert value(m, "crowdtrain_model_version") == 2
    assert value(m, "crowdtrain_eval_loss") == 2.25
    assert value(m, "crowdtrain_train_loss") == 2.75
    agg = "crowdtrain_aggregation_seconds"
    assert value(m, agg + "_count") == 2
    assert value(m, agg + "_sum") == pytest.approx(3.02)
    assert value(m, agg + "_bucket", le="0.025") == 1
    assert value(m, agg + "_bucket", le="5.0") == 2
    dur = "crowdtrain_round_duration_seconds"
    assert value(m, dur + "_bucket", le="60.0") == 1
    assert value(m, dur + "_bucket", le="120.0") == 2
    assert value(m, dur + "_bucket", le="+Inf") == 2


def test_nan_eval_loss_and_durations_do_not_crash() -> None:
    m = RunMetrics()
    m.round_closed(
        round=0,
        version=1,
        eval_loss=math.nan,
        train_loss=math.inf,
        aggregation_s=math.nan,
        duration_s=-1.0,
    )
    assert value(m, "crowdtrain_rounds_total") == 1
    assert value(m, "crowdtrain_aggregation_seconds_count") == 0
    assert value(m, "crowdtrain_round_duration_seconds_count") == 1
    assert value(m, "crowdtrain_round_duration_seconds_sum") == 0


def test_peers_state_and_snapshot() -> None:
    m = RunMetrics()
    m.peers(online=3, registered=7, banned=1)
    m.state(round=5, paused=True, finished=False)
    m.bytes_received(100)
    m.bytes_sent(250)
    m.bytes_sent(0)
    assert value(m, "crowdtrain_peers_online") == 3
    assert value(m, "crowdtrain_peers_registered") == 7
    assert value(m, "crowdtrain_peers_banned") == 1
    assert value(m, "crowdtrain_round") == 5
    assert value(m, "crowdtrain_run_paused") == 1
    assert value(m, "crowdtrain_run_finished") == 0
    m.state(round=6, paused=False, finished=True)
    snap = m.snapshot()
    assert snap["round"] == 6
    assert snap["run_paused"] == 0
    assert snap["run_finished"] == 1
    assert snap["bytes_received_total"] == 100
    assert snap["bytes_sent_total"] == 250
    assert snap["peers_online"] == 3
    assert all(isinstance(v, float) for v in snap.values())


# -- ByteCounter -----------------------------------------------------------------------------

CHUNK = b"x" * 1000
CHUNKS = 5


async def echo(request: Request) -> Response:
    body = await request.body()
    return PlainTextResponse(str(len(body)))


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(CHUNKS):
            yield CHUNK

    return StreamingResponse(chunks(), media_type="application/octet-stream")


def app_with_counter() -> tuple[TestClient, RunMetrics]:
    metrics = RunMetrics()
    app = Starlette(
        routes=[Route("/echo", echo, methods=["POST"]), Route("/stream", stream)],
    )
    return TestClient(ByteCounter(app, metrics)), metrics


def test_byte_counter_counts_request_and_response_bodies() -> None:
    client, metrics = app_with_counter()
    with client:  # runs the lifespan scope through the middleware too
        r = client.post("/echo", content=b"a" * 1234)
    assert r.text == "1234"
    snap = metrics.snapshot()
    assert snap["bytes_received_total"] == 1234
    assert snap["bytes_sent_total"] == len(b"1234")


def test_byte_counter_counts_streamed_request_and_response() -> None:
    client, metrics = app_with_counter()

    def upload() -> Iterator[bytes]:
        yield from (b"b" * 300 for _ in range(4))

    r = client.post("/echo", content=upload())  # chunked: several http.request messages
    assert r.text == "1200"
    r = client.get("/stream")
    assert len(r.content) == len(CHUNK) * CHUNKS
    snap = metrics.snapshot()
    assert snap["bytes_received_total"] == 1200
    assert snap["bytes_sent_total"] == len(b"1200") + len(CHUNK) * CHUNKS
    assert value(metrics, "crowdtrain_bytes_sent_total") == snap["bytes_sent_total"]


def test_byte_counter_passes_streamed_chunks_through_unbuffered() -> None:
    """Each chunk reaches the server as its own message: nothing is joined or held back."""
    metrics = RunMetrics()
    app = ByteCounter(Starlette(routes=[Route("/stream", stream)]), metrics)
    sent: list[Message] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/stream",
        "raw_path": b"/stream",
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1234),
    }

    async def serve() -> None:
        requested = False
        finished = asyncio.Event()

        async def receive() -> Message:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await finished.wait()  # the client stays connected until the response ends
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finished.set()

        await asyncio.wait_for(app(scope, receive, send), timeout=30)

    asyncio.run(serve())
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body" and m.get("body")]
    assert bodies == [CHUNK] * CHUNKS
    assert metrics.snapshot()["bytes_sent_total"] == len(CHUNK) * CHUNKS
