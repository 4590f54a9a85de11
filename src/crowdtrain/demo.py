"""`crowdtrain demo`: a coordinator and N volunteer processes on loopback, behind emulated WAN.

Starts `crowdtrain serve` on 127.0.0.1 (port 0), one WAN-emulating proxy per volunteer (its own
bandwidth and latency; see wanproxy.py), and N `crowdtrain join` processes that reach the
coordinator only through their proxy. One volunteer is 3× slower, as a laptop next to gaming PCs.
Rounds are time-budgeted, so the slow volunteer contributes fewer samples instead of stalling a
round. The demo shows live progress and ends with a summary and, optionally, a JSON document.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import tomli_w
from rich.console import Console
from rich.live import Live
from rich.table import Table

from crowdtrain.config import ConfigError, RunConfig, parse_config
from crowdtrain.data import ensure_packed
from crowdtrain.wan import WanProxy


@dataclass(frozen=True)
class Link:
    """One volunteer's emulated internet connection."""

    up_mbps: float
    down_mbps: float
    latency_ms: float


LINKS = (
    Link(20.0, 100.0, 40.0),
    Link(50.0, 200.0, 25.0),
    Link(10.0, 50.0, 80.0),
    Link(100.0, 300.0, 15.0),
)


def demo_config(rounds: int, round_seconds: float) -> RunConfig:
    """The demo's run: a small byte-level GPT on the stdlib, time-budgeted DiLoCo rounds."""
    return parse_config(
        {
            "name": "demo",
            "model": {"arch": "gpt", "width": 96, "depth": 3, "heads": 4, "context": 64},
            "data": {"source": "stdlib", "dir": "data/stdlib", "batch_size": 16},
            "inner": {
                "budget": "seconds",
                "seconds": round_seconds,
                "steps": 1000,
                "lr": 3e-3,
                "warmup_steps": 20,
                "total_steps": 2000,
                "threads": 1,
            },
            "codec": {"name": "int8"},
            "rounds": {
                "total": rounds,
                "quorum": 2,
                "deadline_s": round_seconds * 4 + 20,
                "late": "accept",
            },
        }
    )


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            return dict(json.loads(path.read_text()))
        if proc.poll() is not None:
            raise ConfigError(f"the coordinator exited with status {proc.returncode}; see its log")
        time.sleep(0.1)
    raise ConfigError(f"the coordinator did not start within {timeout:.0f} s")


@contextlib.contextmanager
def _processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _status_table(status: dict[str, Any], elapsed: float) -> Table:
    rounds = status.get("rounds", [])
    last = rounds[-1] if rounds else {}
    table = Table(title=f"crowdtrain demo: round {status['round']}  ({elapsed:.0f} s)")
    for col in ("volunteer", "online", "samples", "accepted", "rejected"):
        table.add_column(col, justify="right")
    for p in status.get("peers", []):
        table.add_row(
            p["name"],
            "yes" if p["online"] else "no",
            f"{p['samples']:,}",
            str(p["accepted"]),
            str(p["rejected"]),
        )
    if last:
        table.caption = (
            f"last closed round {last['round']}: eval loss {last['eval_loss']:.4f}, "
            f"{last['contributors']} contributions, {last['bytes_up']:,} bytes up"
        )
    return table


def run_demo(
    *,
    volunteers: int = 4,
    rounds: int = 8,
    round_seconds: float = 6.0,
    state_root: Path = Path("runs"),
    console: Console,
) -> dict[str, Any]:
    """Run the demo; return its summary document."""
    if volunteers < 1:
        raise ConfigError("the demo needs at least one volunteer")
    config = demo_config(rounds, round_seconds)
    state = (state_root / time.strftime("demo-%Y%m%d-%H%M%S")).resolve()
    state.mkdir(parents=True, exist_ok=True)
    config_path = state / "run.toml"
    config_path.write_text(tomli_w.dumps(config.model_dump(mode="json", exclude_none=True)))
    console.print("packing the Python standard library into shards (once)…")
    ensure_packed(config.data.source, Path(config.data.dir))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "crowdtrain.cli"]
    with _processes() as procs, contextlib.ExitStack() as stack:
        server_log = (state / "coordinator.log").open("wb")
        stack.callback(server_log.close)
        server = subprocess.Popen(
            [*cli, "serve", "--config", str(config_path), "--state", str(state), "--port", "0"],
            stdout=server_log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        procs.append(server)
        url = _wait_for(state / "server.json", server, timeout=120)["url"]
        port = int(url.rsplit(":", 1)[1])
        console.print(f"coordinator at {url} (state in {state})")
        proxies = []
        for i in range(volunteers):
            link = LINKS[i % len(LINKS)]
            proxy = WanProxy(
                "127.0.0.1",
                port,
                up_mbps=link.up_mbps,
                down_mbps=link.down_mbps,
                latency_ms=link.latency_ms,
            )
            stack.enter_context(proxy)
            proxies.append((proxy, link))
        names = []
        for i, (proxy, link) in enumerate(proxies):
            name = f"volunteer-{i}" + ("-slow" if i == volunteers - 1 and volunteers > 1 else "")
            names.append(name)
            home = state / "volunteers" / name
            home.mkdir(parents=True, exist_ok=True)
            venv = {**env, "CROWDTRAIN_CONFIG_DIR": str(home / "config")}
            args = [
                *cli,
                "join",
                f"http://127.0.0.1:{proxy.port}",
                "--name",
                name,
                "--threads",
                "1",
                "--quiet",
                "--summary",
                str(home / "summary.json"),
                "--cache-dir",
                str(home / "cache"),
            ]
            if name.endswith("-slow"):
                args += ["--slowdown", "3"]
            log = (home / "volunteer.log").open("wb")
            stack.callback(log.close)
            procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=venv))
            console.print(
                f"{name}: {link.up_mbps:g}/{link.down_mbps:g} Mbit/s up/down, "
                f"{link.latency_ms:g} ms latency" + (", 3× slower" if "slow" in name else "")
            )
        started = time.monotonic()
        status: dict[str, Any] = {"round": 0, "peers": [], "rounds": [], "finished": False}
        with (
            httpx.Client(base_url=url, timeout=10.0) as http,
            Live(_status_table(status, 0.0), console=console, refresh_per_second=2) as live,
        ):
            while not status.get("finished"):
                if server.poll() is not None:
                    raise ConfigError("the coordinator stopped unexpectedly; see coordinator.log")
                with contextlib.suppress(httpx.HTTPError):
                    status = http.get("/v1/status").json()
                live.update(_status_table(status, time.monotonic() - started))
                time.sleep(1.0)
            final = http.get("/v1/status").json()
        deadline = time.monotonic() + 60
        for p in procs[1:]:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    return _summary(state, final, names, [p for p, _ in proxies], time.monotonic() - started)


def _summary(
    state: Path, status: dict[str, Any], names: list[str], proxies: list[WanProxy], wall: float
) -> dict[str, Any]:
    rounds = status["rounds"]
    volunteers = []
    for name, proxy in zip(names, proxies, strict=True):
        path = state / "volunteers" / name / "summary.json"
        doc = json.loads(path.read_text()) if path.exists() else {}
        volunteers.append(
            {
                "name": name,
                "samples": doc.get("samples", 0),
                "bytes_up": proxy.bytes_up,
                "bytes_down": proxy.bytes_down,
                "utilization": doc.get("utilization", 0.0),
            }
        )
    return {
        "eval_loss_start": status["initial_eval_loss"],
        "eval_loss_end": rounds[-1]["eval_loss"] if rounds else status["initial_eval_loss"],
        "rounds_completed": len(rounds),
        "state_dir": str(state),
        "wall_s": round(wall, 1),
        "volunteers": volunteers,
    }
