"""The dashboard in headless chromium against a real run: a coordinator process (`crowdtrain
serve`) and three volunteer processes (`crowdtrain join`) on loopback.

The page loads with no console errors; after two rounds the loss chart has points; the
volunteer table lists the running volunteers; the admin view's ban control bans a peer, and
that volunteer stops. Then the export and sample commands take the model home.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
from test_e2e_networked import Run, status, wait_until, write_config

sys.path.insert(0, str(Path(__file__).parent.parent / "server"))
from browser import chromium_page, skip_unless_chromium

skip_unless_chromium()

from playwright.sync_api import expect  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from crowdtrain.cli import app  # noqa: E402

pytestmark = pytest.mark.slow
NAMES = ("alice", "bob", "carol")


def rounds_closed(url: str) -> int:
    return len(status(url).get("rounds", []))


def test_dashboard_shows_a_live_run_and_bans_a_peer(
    tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Many rounds, so that the run is still going while the browser looks at it.
    config = write_config(tmp_path / "run.toml", corpus_file, tmp_path / "data", total=40)
    run = Run(tmp_path, config)
    try:
        url = run.start_server()
        token = (run.state / "admin.token").read_text().strip()
        procs = {name: run.volunteer(url, name) for name in NAMES}
        wait_until("two closed rounds", lambda: rounds_closed(url) >= 2, timeout=180)
        wait_until(
            "all three volunteers online",
            lambda: sum(p["online"] for p in status(url).get("peers", [])) == 3,
        )
        with chromium_page() as (page, errors):
            page.goto(f"{url}/#admin={token}")
            page.wait_for_function("Number(document.body.dataset.polls || 0) >= 3")
            # The initial loss and every closed round, once each (later polls fetch only the
            # new rounds and the page merges them).
            shown = page.locator("#loss-chart g.series.eval circle.point").count()
            closed = rounds_closed(url)
            assert 3 <= shown <= 1 + closed, (shown, closed)
            rows = page.locator("#volunteers tbody tr")
            expect(rows).to_have_count(3)
            shown = sorted(rows.locator("td.name").all_inner_texts())
            assert shown == sorted(NAMES)
            assert page.locator("#sample-caption").inner_text().startswith("model v")

            # Ban carol from the admin view.
            carol = next(
                p
                for p in httpx.get(f"{url}/v1/dashboard").json()["volunteers"]
                if p["name"] == "carol"
            )
            row = page.locator(f'#volunteers tbody tr[data-peer="{carol["peer_id"]}"]')
            row.locator("input.ban-reason").fill("testing the ban control")
            row.locator("button.ban").click()
            expect(row.locator("button.unban")).to_be_visible(timeout=20_000)
            expect(row).to_have_class("is-banned", timeout=20_000)
            assert errors == [], errors

        peer = next(p for p in status(url)["peers"] if p["name"] == "carol")
        assert peer["banned"] and peer["ban_reason"] == "testing the ban control"
        # The banned volunteer is refused and leaves; the others go on.
        procs["carol"].wait(timeout=120)
        assert procs["alice"].poll() is None and procs["bob"].poll() is None

        metrics = httpx.get(f"{url}/metrics").text
        assert "crowdtrain_rounds_total" in metrics and "crowdtrain_peers_banned 1.0" in metrics
    finally:
        run.stop()

    # The model goes home: export from the state directory, then sample from the export.
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "model"
    runner = CliRunner()
    done = runner.invoke(app, ["export", "--state", str(run.state), "--out", str(out)])
    assert done.exit_code == 0, done.output
    card = (out / "README.md").read_text()
    assert all(name in card for name in ("alice", "bob")) and token not in card
    text = runner.invoke(app, ["sample", "--model", str(out), "--prompt", "def ", "--tokens", "40"])
    assert text.exit_code == 0, text.output
    assert text.output.startswith("def ") and len(text.output) > 10
