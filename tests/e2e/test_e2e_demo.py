"""The demo's orchestration: coordinator + volunteers behind WAN proxies, summary JSON."""

from __future__ import annotations

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
