"""Run a coordinator on uvicorn: bind first (port 0 works), then announce where it listens.

The bound address is printed and written to `<state>/server.json` so scripts and tests that
start a coordinator on port 0 can find it. The dashboard's admin token is the one given, or
else one generated once per state directory and kept in `<state>/admin.token` (mode 600).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path

import uvicorn

from crowdtrain.config import RunConfig
from crowdtrain.server.admission import AdmissionConfig
from crowdtrain.server.app import create_app
from crowdtrain.server.coordinator import Coordinator
from crowdtrain.server.tracking import Tracker

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def admin_token(state_dir: Path, given: str | None) -> str:
    """The run's admin token: `given`, else the one stored in the state directory (created)."""
    path = state_dir / "admin.token"
    if given:
        return given
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def serve(
    config: RunConfig,
    state_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    admission: AdmissionConfig | None = None,
    admin: str | None = None,
    trackers: list[Tracker] | None = None,
    announce: Callable[[str], None] = print,
    workers: int = 1,
) -> None:
    """Start the coordinator for `config` with its state in `state_dir` and serve until stopped.
    `workers`: threads for the work done on each contribution as it arrives (and for the
    close's aggregation)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    token = admin_token(state_dir, admin)
    coordinator = Coordinator(
        config,
        state_dir,
        admission=admission,
        admin_token=token,
        trackers=trackers,
        workers=workers,
    )
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    url = f"http://{host}:{bound}"
    info = {"url": url, "pid": os.getpid()}
    tmp = state_dir / "server.json.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, state_dir / "server.json")
    announce(f"coordinator for run '{config.name}' listening on {url} (state in {state_dir})")
    announce(coordinator.admission_config.describe())
    held = "your --admin-token" if admin else f"the token in {state_dir / 'admin.token'}"
    announce(f"dashboard at {url}/ (admin view: {url}/#admin=<{held}>)")
    server = uvicorn.Server(
        uvicorn.Config(create_app(coordinator), log_level="warning", access_log=False)
    )
    try:
        server.run(sockets=[sock])
    finally:
        coordinator.shutdown()
        coordinator.trackers.close()
