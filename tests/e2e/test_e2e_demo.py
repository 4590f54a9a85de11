"""The demo's orchestration: coordinator + volunteers behind WAN proxies, summary JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crowdtrain.cli import app

pytestmark = pytest.mark.slow


def test_demo_runs_two_volunteers_and_writes_its_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # data/ and runs/ go under the test's directory
    out = tmp_path / "demo.json"
    result = CliRunner().invoke(
        app,
        ["demo", "--volunteers", "2", "--rounds", "2", "--round-seconds", "1", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["rounds_completed"] == 2
    assert doc["eval_loss_end"] < doc["eval_loss_start"]
    assert Path(doc["state_dir"]).is_dir()
    names = [v["name"] for v in doc["volunteers"]]
    assert names == ["volunteer-0", "volunteer-1-slow"]
    for v in doc["volunteers"]:
        assert v["bytes_up"] > 0 and v["bytes_down"] > 0 and 0 < v["utilization"] <= 1
    assert "Traceback" not in result.output


def test_keep_serving_keeps_the_dashboard_up_after_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import signal

    import httpx
    from rich.console import Console

    from crowdtrain.demo import run_demo

    monkeypatch.chdir(tmp_path)
    console = Console(file=io.StringIO(), width=200)
    seen: dict[str, object] = {}

    def after_the_run(doc: dict[str, object]) -> None:
        (server,) = Path("runs").glob("demo-*/server.json")
        info = json.loads(server.read_text())
        page = httpx.get(f"{info['url']}/", timeout=10)
        dash = httpx.get(f"{info['url']}/v1/dashboard", timeout=10).json()
        seen.update(doc=doc, page=page.status_code, finished=dash["finished"])
        os.kill(info["pid"], signal.SIGTERM)  # what Ctrl-C does to the coordinator

    doc = run_demo(
        volunteers=2,
        rounds=2,
        round_seconds=1.0,
        state_root=Path("runs"),
        console=console,
        keep_serving=after_the_run,
    )
    assert seen["doc"] is doc and doc["finished"]
    assert seen["page"] == 200 and seen["finished"] is True
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "dashboard: http://127.0.0.1:" in out and "#admin=" in out
    assert "stays up" in out
