"""`crowdtrain demo`: a coordinator and N volunteer processes on loopback, behind emulated WAN.

Starts `crowdtrain serve` on 127.0.0.1 (port 0), one WAN-emulating proxy per volunteer (its own
bandwidth and latency; see wanproxy.py), and N `crowdtrain join` processes that reach the
coordinator only through their proxy. One volunteer is 3× slower, as a laptop next to gaming PCs.
Rounds are time-budgeted, so the slow volunteer contributes fewer samples instead of stalling a
round. The demo shows live progress and ends with a summary and, optionally, a JSON document.

With `attack`, the last K volunteers run `crowdtrain join --attack NAME` (crowdtrain.adversary),
and the summary says which volunteers the coordinator's verification pipeline banned and why
(docs/SECURITY.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import tomli_w
from rich.console import Console
from rich.live import Live
from rich.table import Table

from crowdtrain.adversary import ATTACKS
from crowdtrain.config import ConfigError, RunConfig, parse_config
from crowdtrain.data import ensure_packed_for
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


def demo_config(rounds: int, round_seconds: float, quorum: int = 2) -> RunConfig:
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
                "quorum": quorum,
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
    for col in ("volunteer", "online", "samples", "accepted", "rejected", "banned"):
        table.add_column(col, justify="right")
    for p in status.get("peers", []):
        table.add_row(
            p["name"],
            "yes" if p["online"] else "no",
            f"{p['samples']:,}",
            str(p["accepted"]),
            str(p["rejected"]),
            "yes" if p.get("banned") else "",
        )
    if last:
        loss = last["eval_loss"]
        table.caption = (
            f"last closed round {last['round']}: eval loss "
            f"{'(evaluating)' if loss is None else f'{loss:.4f}'}, "
            f"{last['contributors']} contributions, {last['bytes_up']:,} bytes up"
        )
    return table


@dataclass(frozen=True)
class VolunteerSpec:
    """One volunteer process of a networked run: its name, link, speed and attack, if any."""

    name: str
    link: Link
    slowdown: float = 1.0
    attack: str | None = None


def check_attack(attack: str | None, attackers: int | None, volunteers: int) -> int:
    """How many volunteers attack (0 without an attack); ConfigError if the request is bad."""
    if attack is None:
        if attackers is not None:
            raise ConfigError("--attackers needs --attack to say what the attackers do")
        return 0
    if attack not in ATTACKS:
        raise ConfigError(f"unknown attack {attack!r}; the attacks are {', '.join(ATTACKS)}")
    count = 1 if attackers is None else attackers
    if volunteers < 2:
        raise ConfigError("an attack needs at least 2 volunteers, so that one is honest")
    if not 1 <= count <= volunteers - 1:
        raise ConfigError(
            f"--attackers must be between 1 and {volunteers - 1} (the volunteers less one)"
        )
    return count


def demo_volunteers(
    volunteers: int, attack: str | None = None, attackers: int | None = None
) -> tuple[list[VolunteerSpec], int]:
    """The demo's volunteers (links from LINKS; the last honest one 3× slower; the last
    ATTACKERS run ATTACK) and how many of them are honest."""
    if volunteers < 1:
        raise ConfigError("the demo needs at least one volunteer")
    bad = check_attack(attack, attackers, volunteers)
    honest = volunteers - bad
    specs = []
    for i in range(volunteers):
        slow = volunteers > 1 and i == honest - 1
        evil = attack if i >= honest else None
        name = f"volunteer-{i}" + ("-slow" if slow else "") + (f"-{evil}" if evil else "")
        specs.append(VolunteerSpec(name, LINKS[i % len(LINKS)], 3.0 if slow else 1.0, evil))
    return specs, honest


def join_command(cli: Sequence[str], url: str, name: str, home: Path) -> list[str]:
    """`crowdtrain join` (CLI: how to start the command) for a local volunteer named NAME with
    its files under HOME: one thread, quiet, a summary and its own cache."""
    return [
        *cli,
        "join",
        url,
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


def run_demo(
    *,
    volunteers: int = 4,
    rounds: int = 16,
    round_seconds: float = 6.0,
    state_root: Path = Path("runs"),
    attack: str | None = None,
    attackers: int | None = None,
    console: Console,
    keep_serving: Callable[[dict[str, Any]], None] | None = None,
    serve_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run the demo (one volunteer of several is 3× slower); return its summary document.

    With `keep_serving`, it is called with the summary once the run is over, and the
    coordinator and its dashboard then stay up until Ctrl-C. `serve_args` go to `crowdtrain
    serve` (e.g. `--wandb`, `--tensorboard DIR`).

    With ATTACK, the last ATTACKERS volunteers (default 1) behave as that attack; the slow one
    is then the last honest volunteer, and the quorum never exceeds the honest volunteers.
    """
    specs, honest = demo_volunteers(volunteers, attack, attackers)
    state = (state_root / time.strftime("demo-%Y%m%d-%H%M%S")).resolve()
    config = demo_config(rounds, round_seconds, quorum=min(2, honest))
    return run_network(
        config, specs, state, console=console, keep_serving=keep_serving, serve_args=serve_args
    )


def run_network(
    config: RunConfig,
    volunteers: list[VolunteerSpec],
    state: Path,
    *,
    console: Console,
    live: bool = True,
    keep_serving: Callable[[dict[str, Any]], None] | None = None,
    serve_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A coordinator process and one process per volunteer behind its own WAN proxy.

    Runs until the coordinator reports the run finished; returns the summary document. With
    `keep_serving`, hands it the summary and keeps the coordinator up until Ctrl-C.
    """
    state.mkdir(parents=True, exist_ok=True)
    config_path = state / "run.toml"
    config_path.write_text(tomli_w.dumps(config.model_dump(mode="json", exclude_none=True)))
    console.print("packing the corpus into shards (once)…")
    ensure_packed_for(config.data)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "crowdtrain.cli"]
    with _processes() as procs, contextlib.ExitStack() as stack:
        server_log = (state / "coordinator.log").open("wb")
        stack.callback(server_log.close)
        server = subprocess.Popen(
            [
                *cli,
                "serve",
                "--config",
                str(config_path),
                "--state",
                str(state),
                "--port",
                "0",
                *serve_args,
            ],
            stdout=server_log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        procs.append(server)
        url = _wait_for(state / "server.json", server, timeout=120)["url"]
        port = int(url.rsplit(":", 1)[1])
        console.print(f"coordinator at {url} (state in {state})")
        token = (state / "admin.token").read_text().strip()
        console.print(f"dashboard: [bold]{url}/[/bold]  (admin view: {url}/#admin={token})")
        proxies = []
        for spec in volunteers:
            link = spec.link
            proxy = WanProxy(
                "127.0.0.1",
                port,
                up_mbps=link.up_mbps,
                down_mbps=link.down_mbps,
                latency_ms=link.latency_ms,
            )
            stack.enter_context(proxy)
            proxies.append(proxy)
            home = state / "volunteers" / spec.name
            home.mkdir(parents=True, exist_ok=True)
            args = [
                *join_command(cli, f"http://127.0.0.1:{proxy.port}", spec.name, home),
                "--slowdown",
                str(spec.slowdown),
                *(["--attack", spec.attack] if spec.attack else []),
            ]
            log = (home / "volunteer.log").open("wb")
            stack.callback(log.close)
            venv = {**env, "CROWDTRAIN_CONFIG_DIR": str(home / "config")}
            procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=venv))
            console.print(
                f"{spec.name}: {link.up_mbps:g}/{link.down_mbps:g} Mbit/s up/down, "
                f"{link.latency_ms:g} ms latency"
                + (f", {spec.slowdown:g}× slower" if spec.slowdown > 1 else "")
                + (f", attacking with {spec.attack}" if spec.attack else "")
            )
        started = time.monotonic()
        status: dict[str, Any] = {"round": 0, "peers": [], "rounds": [], "finished": False}
        with (
            httpx.Client(base_url=url, timeout=10.0) as http,
            Live(
                _status_table(status, 0.0),
                console=console,
                refresh_per_second=2,
                transient=not live,
            ) as view,
        ):
            while not status.get("finished"):
                if server.poll() is not None:
                    raise ConfigError("the coordinator stopped unexpectedly; see coordinator.log")
                running = sum(p.poll() is None for p in procs[1:])
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    status = http.get("/v1/status").json()
                view.update(_status_table(status, time.monotonic() - started))
                if running < config.rounds.quorum:  # banned or failed: no round can close
                    break
                time.sleep(1.0)
            final = http.get("/v1/status").json()
        if final.get("finished"):
            deadline = time.monotonic() + 60
            for p in procs[1:]:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        else:
            console.print(
                f"[red]the run stalled:[/red] only {running} volunteer(s) still run, fewer "
                f"than the quorum of {config.rounds.quorum}; see the volunteers' logs"
            )
        summary = _summary(state, final, volunteers, proxies, time.monotonic() - started)
        if keep_serving is not None:
            keep_serving(summary)
            console.print(f"the dashboard stays up at {url}/ until Ctrl-C")
            with contextlib.suppress(KeyboardInterrupt):
                server.wait()
    return summary


def _summary(
    state: Path,
    status: dict[str, Any],
    specs: list[VolunteerSpec],
    proxies: list[WanProxy],
    wall: float,
) -> dict[str, Any]:
    rounds = status["rounds"]
    peers = {p.get("name"): p for p in status.get("peers", [])}
    volunteers = []
    for spec, proxy in zip(specs, proxies, strict=True):
        path = state / "volunteers" / spec.name / "summary.json"
        doc = json.loads(path.read_text()) if path.exists() else {}
        peer = peers.get(spec.name, {})
        volunteers.append(
            {
                "name": spec.name,
                "attack": spec.attack,
                "samples": doc.get("samples", 0),
                "rounds": doc.get("rounds", 0),
                "refused": doc.get("refused", 0),
                "verified": doc.get("verified", 0),
                "verify_steps": doc.get("verify_steps", 0),
                "compute_s": doc.get("compute_s", 0.0),
                "bytes_up": proxy.bytes_up,
                "bytes_down": proxy.bytes_down,
                "utilization": doc.get("utilization", 0.0),
                "banned": bool(peer.get("banned", False)),
                "ban_reason": peer.get("ban_reason", ""),
                "reputation": peer.get("reputation"),
                "strikes": peer.get("strikes"),
                "flagged": peer.get("flagged", 0),
            }
        )
    return {
        "eval_loss_start": status["initial_eval_loss"],
        "eval_loss_end": rounds[-1]["eval_loss"] if rounds else status["initial_eval_loss"],
        "rounds_completed": len(rounds),
        "finished": bool(status.get("finished", False)),
        "state_dir": str(state),
        "wall_s": round(wall, 1),
        "volunteers": volunteers,
        "banned": {v["name"]: v["ban_reason"] for v in volunteers if v["banned"]},
        "verdicts": status.get("verdicts", []),
    }
