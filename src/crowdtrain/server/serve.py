"""Run a coordinator on uvicorn: bind first (port 0 works), then announce where it listens.

The bound address is printed and written to `<state>/server.json` so scripts and tests that
start a coordinator on port 0 can find it.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import uvicorn

from crowdtrain.config import RunConfig
from crowdtrain.server.app import create_app
from crowdtrain.server.coordinator import Coordinator

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


def serve(
    config: RunConfig,
    state_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    invite: str | None = None,
    announce: Callable[[str], None] = print,
) -> None:
    """Start the coordinator for `config` with its state in `state_dir` and serve until stopped."""
    coordinator = Coordinator(config, state_dir, invite=invite)
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    url = f"http://{host}:{bound}"
    info = {"url": url, "pid": os.getpid()}
    tmp = state_dir / "server.json.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, state_dir / "server.json")
    announce(f"coordinator for run '{config.name}' listening on {url} (state in {state_dir})")
    server = uvicorn.Server(
        uvicorn.Config(create_app(coordinator), log_level="warning", access_log=False)
    )
    server.run(sockets=[sock])
