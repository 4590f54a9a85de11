"""Browser tests of the dashboard page (src/crowdtrain/server/static) against a fake backend.

A small FastAPI app serves the real static files, a canned GET /v1/dashboard document and the
admin routes with a fixed token, recording every admin call. It runs on uvicorn on 127.0.0.1,
port 0, in a background thread; headless chromium (tests/server/browser.py) loads the page.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import chromium_browser, chromium_page, skip_unless_chromium

skip_unless_chromium()

import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import FileResponse, JSONResponse  # noqa: E402
from fastapi.staticfiles import StaticFiles  # noqa: E402
from playwright.sync_api import Browser, Page, expect  # noqa: E402

import crowdtrain.server  # noqa: E402

STATIC = Path(crowdtrain.server.__file__).parent / "static"
TOKEN = "organizer-token-123"
EVIL = "<img src=x onerror=alert(1)>"
DEFAULT_REASON = "banned by the organizer"


class FakeBackend:
    """The coordinator as the page sees it: one canned run whose admin state tests can change."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0 = time.time()
        self.deadline = self.t0 + 300.0
        self.paused = False
        self.down = False
        self.early = False  # before the first round closed: no rounds, volunteers or sample
        self.peer_samples = 0  # when > 0, a long peers-online series of this many points
        self.banned: dict[str, str] = {"p-dddd0004": "norm screening: three strikes"}
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.sinces: list[int | None] = []  # the `since` of every dashboard poll
        self.third_round = False
        self.token = TOKEN

    def volunteer(self, peer_id: str, name: str, samples: int, **extra: Any) -> dict[str, Any]:
        row: dict[str, Any] = {
            "peer_id": peer_id,
            "name": name,
            "device": "cpu · 2 threads",
            "online": True,
            "samples": samples,
            "accepted": samples // 1000,
            "rejected": 0,
            "flagged": 1,
            "reputation": 0.9,
            "strikes": 0,
            "banned": peer_id in self.banned,
            "ban_reason": self.banned.get(peer_id, ""),
            "last_seen": time.time() - 12.0,
        }
        row.update(extra)
        return row

    def dashboard(self) -> dict[str, Any]:
        t0, start, now = self.t0, self.t0 - 600.0, time.time()
        return {
            "run": "demo-run",
            "now": now,
            "started_at": start,
            "finished": False,
            "paused": self.paused,
            "version": 2,
            "round": {
                "number": 2,
                "total": 16,
                "opened_at": t0 - 20.0,
                "deadline": self.deadline,
                "quorum": 2,
                "round_seconds": 44.0,
                "assigned": ["volunteer-0", "volunteer-1", EVIL],
                "submitted": ["volunteer-1"],
            },
            "initial_eval_loss": 5.58,
            "rounds": [
                round_row(0, start + 240.0, train=4.9, eval_=4.6, utilization=0.83),
                round_row(1, start + 540.0, train=4.1, eval_=3.9, utilization=0.91),
            ],
            "peers_online": [[start, 0], [start + 5, 2], [start + 60, 4], [start + 400, 3]],
            "bandwidth": [
                [start + 10, 2_000.0, 150_000.0],
                [start + 250, 90_000.0, 10_000.0],
                [start + 550, 85_000.0, 2_500_000.0],
            ],
            "totals": {
                "bytes_in": 12_345_678,
                "bytes_out": 98_765_432,
                "samples": 20_800,
                "contributions_accepted": 6,
                "contributions_rejected": 2,
                "contributions_flagged": 3,
            },
            "volunteers": [
                self.volunteer("p-aaaa0001", "volunteer-0", 5000),
                self.volunteer("p-bbbb0002", "volunteer-1", 12000),
                self.volunteer("p-cccc0003", EVIL, 800, online=False, last_seen=now - 400.0),
                self.volunteer("p-dddd0004", "volunteer-3-noise", 3000, rejected=2, strikes=3),
            ],
            "rejections": [
                rejection(t0 - 300.0, 0, "norm", "rejected", "the update's norm is 40x the median"),
                rejection(t0 - 100.0, 1, "reputation", "banned", "three strikes"),
            ],
            "sample": {"version": 2, "prompt": "def ", "text": "fib(n):\n    return n"},
        }


def round_row(
    number: int, at: float, *, train: float, eval_: float, utilization: float
) -> dict[str, Any]:
    """One closed round of the dashboard document."""
    return {
        "round": number,
        "version": number + 1,
        "time": at,
        "elapsed_s": 240.0,
        "contributors": 3,
        "samples": 9000,
        "train_loss": train,
        "eval_loss": eval_,
        "bytes_up": 123456,
        "aggregation_s": 0.05,
        "compute_utilization": utilization,
    }


def rejection(at: float, number: int, stage: str, outcome: str, reason: str) -> dict[str, Any]:
    """One verdict against volunteer-3-noise."""
    peer = {"peer": "volunteer-3-noise", "peer_id": "p-dddd0004"}
    return {
        "time": at,
        **peer,
        "round": number,
        "stage": stage,
        "outcome": outcome,
        "reason": reason,
    }


def fake_app(fake: FakeBackend) -> FastAPI:
    app = FastAPI()
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def unauthorized(request: Request) -> JSONResponse | None:
        if request.headers.get("authorization") == f"Bearer {fake.token}":
            return None
        detail = "The admin token is missing or wrong."
        return JSONResponse({"error": "unauthorized", "detail": detail}, status_code=401)

    async def admin_call(request: Request, name: str, peer: str = "") -> JSONResponse | None:
        refused = unauthorized(request)
        if refused is not None:
            return refused
        raw = await request.body()
        fake.calls.append((name, peer, await request.json() if raw else {}))
        return None

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/v1/dashboard")
    async def dashboard(since: int | None = None) -> JSONResponse:
        if fake.down:
            return JSONResponse({"error": "down", "detail": "Down."}, status_code=503)
        fake.sinces.append(since)
        doc = fake.dashboard()
        if fake.third_round:
            start = doc["started_at"]
            doc["rounds"].append(round_row(2, start + 580.0, train=3.6, eval_=3.5, utilization=0.9))
        if since is not None:  # as the coordinator does: only the rounds after `since`
            doc["since"] = since
            doc["rounds"] = [r for r in doc["rounds"] if r["version"] > since]
        if fake.early:
            empty: dict[str, Any] = {"rounds": [], "volunteers": [], "rejections": []}
            doc.update(empty, peers_online=[], bandwidth=[], sample=None, version=0)
            doc["round"].update(number=0, assigned=[], submitted=[])
        if fake.peer_samples:
            start, n = doc["started_at"], fake.peer_samples
            doc["peers_online"] = [[start + 2 * i, i % 7] for i in range(n)]
        return JSONResponse(doc)

    @app.get("/v1/admin/check")
    async def check(request: Request) -> JSONResponse:
        return unauthorized(request) or JSONResponse({"ok": True})

    @app.post("/v1/admin/pause")
    async def pause(request: Request) -> JSONResponse:
        if (refused := await admin_call(request, "pause")) is not None:
            return refused
        fake.paused = True
        return JSONResponse({"paused": True})

    @app.post("/v1/admin/resume")
    async def resume(request: Request) -> JSONResponse:
        if (refused := await admin_call(request, "resume")) is not None:
            return refused
        fake.paused = False
        return JSONResponse({"paused": False})

    @app.post("/v1/admin/peers/{peer_id}/ban")
    async def ban(request: Request, peer_id: str) -> JSONResponse:
        if (refused := await admin_call(request, "ban", peer_id)) is not None:
            return refused
        fake.banned[peer_id] = fake.calls[-1][2]["reason"]
        return JSONResponse({"peer_id": peer_id, "banned": True})

    @app.post("/v1/admin/peers/{peer_id}/unban")
    async def unban(request: Request, peer_id: str) -> JSONResponse:
        if (refused := await admin_call(request, "unban", peer_id)) is not None:
            return refused
        fake.banned.pop(peer_id, None)
        return JSONResponse({"peer_id": peer_id, "banned": False})

    @app.post("/v1/admin/deadline")
    async def deadline(request: Request) -> JSONResponse:
        if (refused := await admin_call(request, "deadline")) is not None:
            return refused
        fake.deadline = time.time() + float(fake.calls[-1][2]["deadline_in"])
        return JSONResponse({"deadline": fake.deadline})

    return app


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[FakeBackend, str]]:
    """The fake backend on uvicorn in a thread, bound to 127.0.0.1 on a free port."""
    fake = FakeBackend()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake_app(fake), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started or not thread.is_alive():
            break
        time.sleep(0.01)
    assert server.started, "the fake dashboard backend did not start"
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium_browser() as b:
        yield b


@pytest.fixture
def backend(served: tuple[FakeBackend, str]) -> tuple[FakeBackend, str]:
    served[0].reset()
    return served


@pytest.fixture
def page_errors(browser: Browser) -> Iterator[tuple[Page, list[str]]]:
    with chromium_page(browser) as pair:
        yield pair


def open_dashboard(page: Page, url: str, fragment: str = "") -> None:
    page.goto(f"{url}/{fragment}")
    expect(page.locator("#run-name")).to_have_text("demo-run")


def wait_polls(page: Page, count: int) -> None:
    """Wait until the page has rendered `count` more dashboard documents."""
    done = int(page.evaluate("Number(document.body.dataset.polls || 0)"))
    page.wait_for_function(f"Number(document.body.dataset.polls || 0) >= {done + count}")


def login(page: Page, token: str = TOKEN) -> None:
    page.fill("#admin-token", token)
    page.click("#admin-login")


def test_page_loads_and_polls_without_console_errors(
    backend: tuple[FakeBackend, str], page_errors: tuple[Page, list[str]]
) -> None:
    page, errors = page_errors
    open_dashboard(page, backend[1])
    wait_polls(page, 1)
    expect(page.locator("#status")).to_have_text("running")
    expect(page.locator("#version")).to_have_text("v2")
    expect(page.locator("#round")).to_have_text("3 of 16")
    expect(page.locator("#quorum")).to_have_text("1 of 2 needed")
    expect(page.locator("#participants .chip")).to_have_count(3)
    expect(page.locator("#participants .chip.submitted")).to_have_text(["volunteer-1"])
    expect(page.locator("#total-samples")).to_have_text("20,800")
    expect(page.locator("#total-bytes-in")).to_have_text("12.3 MB")
    expect(page.locator("#total-accepted")).to_have_text("6")
    expect(page.locator("#total-rejected")).to_have_text("2 / 3")
    expect(page.locator("#sample-caption")).to_have_text("model v2 says:")
    expect(page.locator("#sample .prompt")).to_have_text("def ")
    expect(page.locator("#sample")).to_have_text("def fib(n):\n    return n")
    expect(page.locator("#offline")).to_be_hidden()
    expect(page.locator("#admin-controls")).to_be_hidden()
    assert errors == []


def test_charts_draw_one_marker_per_point(
    backend: tuple[FakeBackend, str], page_errors: tuple[Page, list[str]]
) -> None:
    page, errors = page_errors
    open_dashboard(page, backend[1])
    loss = page.locator("#loss-chart circle.point")
    # initial eval loss + 2 eval + 2 train
    expect(loss).to_have_count(5)
    expect(page.locator("#loss-chart .eval circle.point")).to_have_count(3)
    expect(page.locator("#peers-chart circle.point")).to_have_count(4)
    expect(page.locator("#bandwidth-chart circle.point")).to_have_count(6)
    expect(page.locator("#utilization-chart circle.point")).to_have_count(2)
    titles = page.locator("#loss-chart .eval circle.point title").all_text_contents()
    assert titles[0] == "round 0: eval loss 5.580 (v0)"
    assert titles[-1] == "round 2: eval loss 3.900 (v2)"
    utilization = page.locator("#utilization-chart circle.point title").last.text_content()
    assert utilization is not None and utilization.startswith("round 2: 91%")

    page.click("#loss-vs-time")
    expect(page.locator("#loss-vs-time")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#loss-chart .label")).to_have_text("minutes since start")
    expect(loss).to_have_count(5)
    assert page.locator("#loss-chart .eval circle.point title").last.text_content() == (
        "9.0 min: eval loss 3.900 (v2)"
    )
    assert errors == []


def test_volunteers_table_and_leaderboard(
    backend: tuple[FakeBackend, str], page_errors: tuple[Page, list[str]]
) -> None:
    page, errors = page_errors
    open_dashboard(page, backend[1])
    rows = page.locator("#volunteers tbody tr[data-peer]")
    expect(rows).to_have_count(4)
    peers = [rows.nth(i).get_attribute("data-peer") for i in range(4)]
    assert peers == ["p-aaaa0001", "p-bbbb0002", "p-cccc0003", "p-dddd0004"]
    first = page.locator('#volunteers tr[data-peer="p-bbbb0002"]')
    expect(first.locator("td.name")).to_have_text("volunteer-1")
    expect(first.locator("td.samples")).to_have_text("12,000")
    expect(first.locator("td.flagged")).to_have_text("1")
    expect(first.locator("td.reputation")).to_have_text("0.90")
    expect(first.locator("td.online")).to_have_text("online")
    expect(first.locator("td.last-seen")).to_have_text(re.compile(r"^1\d s ago$"))
    expect(first.locator("td.banned")).to_have_text("")
    noisy = page.locator('#volunteers tr[data-peer="p-dddd0004"]')
    expect(noisy.locator("td.strikes")).to_have_text("3")
    expect(noisy.locator("td.banned")).to_contain_text("norm screening: three strikes")
    offline = page.locator('#volunteers tr[data-peer="p-cccc0003"]')
    expect(offline.locator("td.online")).to_have_text("offline")
    expect(offline.locator("td.last-seen")).to_have_text(re.compile(r"^[67] min ago$"))
    # no admin controls for the public
    expect(page.locator("#volunteers button")).to_have_count(0)

    names = page.locator("#leaderboard li .lb-name")
    expect(names).to_have_text(["volunteer-1", "volunteer-0", "volunteer-3-noise", EVIL])
    widths = page.locator("#leaderboard .lb-bar").evaluate_all(
        "bars => bars.map(b => b.getBoundingClientRect().width)"
    )
    assert widths == sorted(widths, reverse=True) and widths[0] > 2 * widths[1]
    assert errors == []


def test_rejections_newest_first(
    backend: tuple[FakeBackend, str], page_errors: tuple[Page, list[str]]
) -> None:
    page, errors = page_errors
    open_dashboard(page, backend[1])
    rows = page.locator("#rejections tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0).locator("td.outcome")).to_have_text("banned")
    expect(rows.nth(0).locator("td.reason")).to_have_text("three strikes")
    expect(rows.nth(0).locator("td.stage")).to_have_text("reputation")
    expect(rows.nth(1).locator("td.outcome")).to_have_text("rejected")
    expect(rows.nth(1)).to_contain_text("volunteer-3-noise")
    expect(page.locator("#rejections-empty")).to_be_hidden()
    assert errors == []


def test_untrusted_names_are_text(
    backend: tuple[FakeBackend, str], page_errors: tuple[Page, list[str]]
) -> None:
    page, errors = page_errors
    open_dashboard(page, backend[1])
    wait_polls(page, 1)
    row = page.locator('#volunteers tr[data-peer="p-cccc0003"]')
    expect(row.locator("td.name")).to_have_text(EVIL)
    expect(page.locator("#participants .chip").nth(2)).to_have_text(EVIL)
    expect(page.locator("#leaderboard li .lb-name").last).to_have_text(EVIL)
    assert page.locator("img").count() == 0
    assert errors == []  # an injected <img onerror=alert(1)> would have opened a dialog


def test_admin_login_with_a_bad_token_shows_an_error(
    backend: tuple[FakeBackend, str], page_errors: tuple[Page, list[str]]
) -> None:
    page, errors = page_errors
    open_dashboard(page, backend[1])
    login(page, "not-the-token")
    expect(page.locator("#admin-message")).to_have_text("That admin token was not accepted.")
    expect(page.locator("#admin-message")).to_have_class("error")
    expect(page.locator("#admin-controls")).to_be_hidden()
    expect(page.locator("#volunteers button.ban")).to_have_count(0)
    assert page.evaluate("sessionStorage.getItem('crowdtrain.adminToken')") is None
    # chromium logs the refused request itself; nothing else may appear
    assert all("status of 401" in e for e in errors), errors


def test_admin_ban_posts_the_reason_and_the_row_updates(
    backend: tuple[FakeBackend, str], page_errors: tuple[Page, list[str]]
) -> None:
    fake, url = backend
    page, errors = page_errors
    open_dashboard(page, url)
    login(page)
    expect(page.locator("#admin-controls")).to_be_visible()
    expect(page.locator("#admin-message")).to_have_text("Signed in as the organizer.")
    assert page.evaluate("sessionStorage.getItem('crowdtrain.adminToken')") == TOKEN
    expect(page.locator("#volunteers button.ban")).to_have_count(3)
    row = page.locator('#volunteers tr[data-peer="p-aaaa0001"]')
    reason = row.locator("input.ban-reason")
    expect(reason).to_have_value(DEFAULT_REASON)
    reason.fill("uploads random noise")
    wait_polls(page, 1)  # what was typed survives a refresh
    expect(reason).to_have_value("uploads random noise")
    row.locator("button.ban").click()
    expect(row.locator("td.banned")).to_contain_text("uploads random noise")
    expect(row.locator("button.unban")).to_be_visible()
    expect(row).to_have_class("is-banned")
    assert ("ban", "p-aaaa0001", {"reason": "uploads random noise"}) in fake.calls
    expect(page.locator("#admin-message")).to_have_text("Banned volunteer-0.")

    other = page.locator('#volunteers tr[data-peer="p-bbbb0002"]')
    other.locator("button.ban").click()
    expect(other.locator("button.unban")).to_be_visible()
    assert ("ban", "p-bbbb0002", {"reason": DEFAULT_REASON}) in fake.calls

    noisy = page.locator('#volunteers tr[data-peer="p-dddd0004"]')
    noisy.locator("button.unban").click()
    expect(noisy.locator("button.ban")).to_be_visible()
    expect(noisy.locator("td.banned")).to_have_text("")
    assert fake.calls[-1][:2] == ("unban", "p-dddd0004")
    assert errors == []


def test_admin_pause_and_resume(
    backend: tuple[FakeBackend, str], page_errors: tuple[Page, list[str]]
) -> None:
    fake, url = backend
    page, errors = page_errors
    open_dashboard(page, url)
    login(page)
    expect(page.locator("#resume-btn")).to_be_disabled()
    page.click("#pause-btn")
    expect(page.locator("#status")).to_have_text("paused")
    assert [c[0] for c in fake.calls] == ["pause"]
    expect(page.locator("#countdown")).to_contain_text("(paused)")
    expect(page.locator("#pause-btn")).to_be_disabled()
    page.click("#resume-btn")
    expect(page.locator("#status")).to_have_text("running")
    assert [c[0] for c in fake.calls] == ["pause", "resume"]
    assert errors == []


def test_admin_token_from_the_url_fragment(
    backend: tuple[FakeBackend, str], page_errors: tuple[Page, list[str]]
) -> None:
    page, errors = page_errors
    open_dashboard(page, backend[1], f"#admin={TOKEN}")
    expect(page.locator("#admin-controls")).to_be_visible()
    assert "#" not in page.url
    assert page.evaluate("sessionStorage.getItem('crowdtrain.adminToken')") == TOKEN
    page.reload()  # the session keeps the token
    expect(page.locator("#admin-controls")).to_be_visible()
    expect(page.locator("#volunteers button.ban")).to_have_count(3)
    page.click("#admin-logout")
    expect(page.locator("#admin-controls")).to_be_hidden()
    expect(page.locator("#volunteers button.ban")).to_have_count(0)
    assert page.evaluate("sessionStorage.getItem('crowdtrain.adminToken')") is None
    page.evaluate(f"window.location.hash = 'admin={TOKEN}'")  # pasted into the open page
    expect(page.locator("#admin-controls")).to_be_visible()
    assert "#" not in page.url
    assert errors == []


def test_a_revoked_token_signs_the_organizer_out(
    backend: tuple[FakeBackend, str], page_errors: tuple[Page, list[str]]
) -> None:
    fake, url = backend
    page, errors = page_errors
    open_dashboard(page, url, f"#admin={TOKEN}")
    expect(page.locator("#admin-controls")).to_be_visible()
    fake.token = "rotated"
    page.click("#pause-btn")
    expect(page.locator("#admin-message")).to_have_text(
        "The admin token is no longer accepted; sign in again."
    )
    expect(page.locator("#admin-controls")).to_be_hidden()
    expect(page.locator("#admin-login-form")).to_be_visible()
    assert fake.calls == [] and not fake.paused
    assert all("status of 401" in e for e in errors), errors


def test_admin_deadline_form(
    backend: tuple[FakeBackend, str], page_errors: tuple[Page, list[str]]
) -> None:
    fake, url = backend
    page, errors = page_errors
    open_dashboard(page, url, f"#admin={TOKEN}")
    expect(page.locator("#admin-controls")).to_be_visible()
    page.fill("#deadline-in", "90")
    page.fill("#round-seconds", "60")
    page.click("#deadline-btn")
    expect(page.locator("#admin-message")).to_contain_text("Deadline moved")
    assert fake.calls == [("deadline", "", {"deadline_in": 90, "round_seconds": 60})]
    page.wait_for_function("parseInt(document.getElementById('countdown').textContent) <= 90")
    page.fill("#deadline-in", "0")
    page.click("#deadline-btn")
    expect(page.locator("#admin-message")).to_have_class("error")
    assert len(fake.calls) == 1
    assert errors == []


def test_countdown_ticks_down(
    backend: tuple[FakeBackend, str], page_errors: tuple[Page, list[str]]
) -> None:
    page, errors = page_errors
    open_dashboard(page, backend[1])
    expect(page.locator("#countdown")).to_contain_text("s left")
    start = int((page.locator("#countdown").text_content() or "").split()[0])
    assert 250 < start <= 300
    page.wait_for_function(
        f"parseInt(document.getElementById('countdown').textContent) < {start}", timeout=5000
    )
    assert errors == []


def test_offline_banner_while_the_backend_fails(
    backend: tuple[FakeBackend, str], page_errors: tuple[Page, list[str]]
) -> None:
    fake, url = backend
    page, _errors = page_errors  # chromium logs the failed requests; that is expected here
    open_dashboard(page, url)
    expect(page.locator("#offline")).to_be_hidden()
    fake.down = True
    expect(page.locator("#offline")).to_be_visible()
    expect(page.locator("#run-name")).to_have_text("demo-run")  # last data stays up
    fake.down = False
    expect(page.locator("#offline")).to_be_hidden()


def test_before_the_first_round(
    backend: tuple[FakeBackend, str], page_errors: tuple[Page, list[str]]
) -> None:
    fake, url = backend
    page, errors = page_errors
    fake.early = True
    open_dashboard(page, url)
    expect(page.locator("#round")).to_have_text("1 of 16")
    expect(page.locator("#loss-chart circle.point")).to_have_count(1)  # the initial eval loss
    for chart in ("peers-chart", "bandwidth-chart", "utilization-chart"):
        expect(page.locator(f"#{chart} .empty")).to_have_text("no data yet")
    expect(page.locator("#volunteers tbody tr")).to_have_count(0)
    expect(page.locator("#volunteers-empty")).to_be_visible()
    expect(page.locator("#rejections-empty")).to_be_visible()
    expect(page.locator("#sample-caption")).to_have_text("No sample yet.")
    fake.early = False  # the first round closes: everything appears on the next poll
    expect(page.locator("#volunteers tbody tr")).to_have_count(4)
    expect(page.locator("#loss-chart circle.point")).to_have_count(5)
    assert errors == []


def test_long_series_draw_a_bounded_number_of_markers(
    backend: tuple[FakeBackend, str], page_errors: tuple[Page, list[str]]
) -> None:
    fake, url = backend
    page, errors = page_errors
    fake.peer_samples = 5000
    open_dashboard(page, url)
    expect(page.locator("#peers-chart circle.point")).to_have_count(150)
    path = page.locator("#peers-chart path.line").get_attribute("d") or ""
    assert path.count("V") == 4999  # the line itself keeps every step
    assert errors == []


def test_later_polls_fetch_only_new_rounds(
    backend: tuple[FakeBackend, str], page_errors: tuple[Page, list[str]]
) -> None:
    fake, url = backend
    page, errors = page_errors
    open_dashboard(page, url)
    wait_polls(page, 2)
    points = page.locator("#loss-chart g.series.eval circle.point")
    expect(points).to_have_count(3)  # the initial loss and two rounds, none twice
    assert fake.sinces[0] is None and fake.sinces[-1] == 2
    fake.third_round = True
    expect(points).to_have_count(4)
    wait_polls(page, 2)
    assert fake.sinces[-1] == 3
    expect(points).to_have_count(4)
    # Another run behind the same address: the page starts over with a full poll.
    fake.third_round = False
    fake.t0 -= 1000.0
    calls = len(fake.sinces)
    wait_polls(page, 2)
    assert None in fake.sinces[calls:]
    expect(points).to_have_count(3)
    assert errors == [], errors
