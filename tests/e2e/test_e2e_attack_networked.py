"""End to end over loopback: a `crowdtrain join --attack scale1000` volunteer next to two honest
ones. The coordinator's verification pipeline must ban the attacker or refuse its uploads, and
must leave the honest volunteers alone. Also: `crowdtrain demo` refuses a bad attack request
before it starts anything."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from crowdtrain.cli import app
from crowdtrain_testing import write_e2e_config

CLI = [sys.executable, "-m", "crowdtrain.cli"]


def _config(path: Path, corpus: Path, data: Path) -> Path:
    return write_e2e_config(path, corpus, data, "e2e-attack", rounds={"total": 5})


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--attack", "nope"], "unknown attack 'nope'; the attacks are sign_flip"),
        (["--attack", "noise", "--attackers", "4"], "between 1 and 3 (the volunteers less one)"),
        (["--attackers", "1"], "--attackers needs --attack"),
        (["--volunteers", "1", "--attack", "noise"], "at least 2 volunteers"),
    ],
)
def test_the_demo_refuses_a_bad_attack_request(
    args: list[str], error: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["demo", *args])
    assert result.exit_code == 2 and error in " ".join(result.output.split())
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_scale1000_attacker_is_stopped_and_honest_peers_are_not(
    tmp_path: Path, corpus_file: Path
) -> None:
    config = _config(tmp_path / "run.toml", corpus_file, tmp_path / "data")
    state = tmp_path / "state"
    procs: list[subprocess.Popen[bytes]] = []
    files = contextlib.ExitStack()
    try:
        procs.append(
            subprocess.Popen(
                [*CLI, "serve", "--config", str(config), "--state", str(state), "--port", "0"],
                stdout=files.enter_context((tmp_path / "server.log").open("wb")),
                stderr=subprocess.STDOUT,
            )
        )
        deadline = time.monotonic() + 60
        while not (state / "server.json").exists():
            assert procs[0].poll() is None, "the coordinator exited during start-up"
            assert time.monotonic() < deadline, "the coordinator did not start"
            time.sleep(0.1)
        url = str(json.loads((state / "server.json").read_text())["url"])
        names = {"honest-0": None, "honest-1": None, "attacker": "scale1000"}
        for name, attack in names.items():
            home = tmp_path / name
            home.mkdir()
            args = [*CLI, "join", url, "--name", name, "--threads", "1", "--quiet"]
            args += ["--summary", str(home / "summary.json"), "--cache-dir", str(home / "cache")]
            args += ["--attack", attack] if attack else []
            env = {**os.environ, "CROWDTRAIN_CONFIG_DIR": str(home / "config")}
            log = files.enter_context((home / "log").open("wb"))
            procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env))
        codes = {name: p.wait(timeout=240) for name, p in zip(names, procs[1:], strict=True)}
        final: dict[str, Any] = httpx.get(f"{url}/v1/status", timeout=10).json()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        files.close()

    assert final["finished"] and len(final["rounds"]) == 5
    peers = {p["name"]: p for p in final["peers"]}
    summaries = {n: json.loads((tmp_path / n / "summary.json").read_text()) for n in names}
    for name in ("honest-0", "honest-1"):
        assert codes[name] == 0
        assert not peers[name]["banned"], peers[name]
        assert peers[name]["accepted"] >= 4 and summaries[name]["refused"] == 0
    attacker, text = peers["attacker"], (tmp_path / "attacker" / "log").read_text()
    assert "Traceback" not in text
    if attacker["banned"]:
        assert codes["attacker"] == 1 and "this peer is banned" in text
    assert attacker["banned"] or attacker["accepted"] == 0, attacker
    assert final["rounds"][-1]["eval_loss"] < final["initial_eval_loss"]
