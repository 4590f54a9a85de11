"""Helpers of the chaos suite: a real `crowdtrain serve` process and a scripted volunteer.

`Coordinator` starts `python -m crowdtrain.cli serve` (the code on this process's PYTHONPATH,
so a worktree tests its own code), optionally with ``CROWDTRAIN_CRASH_AT`` set
(``crowdtrain.faults``), finds its URL in ``<state>/server.json`` and kills it with SIGKILL.

`Driver` is a scripted volunteer fleet over plain HTTP: it registers peers, asks for work and
uploads a deterministic payload per (peer, round), one request at a time, and records every
receipt it was given and every 5xx it saw. Its payloads are random deltas seeded by peer and
round, and the peers always upload in the same order, so a run driven by it closes the same
rounds with the same contributions however often its coordinator is killed and restarted: the
weights of every version must be bitwise those of a run without crashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from crowdtrain import codec
from crowdtrain.config import RunConfig, load_config
from crowdtrain.models import param_shapes
from crowdtrain.store import SqliteStateStore, VersionRow
from crowdtrain_testing import join_command, write_e2e_config

#: `crowdtrain serve` as `python -m crowdtrain.cli` would run it, with SIGUSR1 dumping every
#: thread's stack into its log (`Coordinator.dump_stacks`: what a hung coordinator was doing).
CLI = [
    sys.executable,
    "-c",
    "import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1); "
    "from crowdtrain.cli import main; sys.argv[0] = 'crowdtrain'; main()",
]
#: Transport failures that mean the coordinator is gone (killed, or not yet listening again).
GONE = (httpx.TransportError,)


def write_config(path: Path, corpus: Path, data: Path, **sections: dict[str, Any]) -> Path:
    """The e2e tests' tiny run (a 1-layer GPT, 3 rounds, quorum 2), with no deadline closes."""
    cfg: dict[str, dict[str, Any]] = {
        "rounds": {"deadline_s": 600.0},
        "defence": {"spot_check": "off", "scoring": "coordinator", "score_per_round": 0},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return write_e2e_config(path, corpus, data, "chaos", **cfg)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def blob_path(state: Path, sha: str) -> Path:
    return state / "blobs" / sha[:2] / sha[2:]


class Coordinator:
    """One `crowdtrain serve` process after another on the same state directory and port."""

    def __init__(self, tmp: Path, config: Path, state: Path) -> None:
        self.tmp, self.config, self.state = tmp, config, state
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0
        self.url = ""

    def log(self, n: int | None = None) -> str:
        return (self.tmp / f"server-{self.starts if n is None else n}.log").read_text(
            errors="replace"
        )

    def start(self, crash_at: str | None = None, wait: bool = True) -> str:
        """Start `crowdtrain serve`; with CRASH_AT it kills itself there (`crowdtrain.faults`).
        Returns the URL once it listens (or "" when WAIT is false)."""
        self.stop()
        (self.state / "server.json").unlink(missing_ok=True)
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if k != "CROWDTRAIN_CRASH_AT"}
        if crash_at is not None:
            env["CROWDTRAIN_CRASH_AT"] = crash_at
        with (self.tmp / f"server-{self.starts}.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    *CLI,
                    "serve",
                    "--config",
                    str(self.config),
                    "--state",
                    str(self.state),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        if not wait:
            return ""
        deadline = time.monotonic() + 120
        while not (self.state / "server.json").exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"the coordinator exited during start-up:\n{self.log()}")
            assert time.monotonic() < deadline, "the coordinator did not start"
            time.sleep(0.05)
        self.url = str(json.loads((self.state / "server.json").read_text())["url"])
        self.port = int(self.url.rsplit(":", 1)[1])
        return self.url

    def dump_stacks(self) -> str:
        """Every thread's stack of the running coordinator (faulthandler), from its log."""
        if not self.alive():
            return "(not running)"
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        return self.log()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_dead(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """SIGKILL the process if it runs (a test's clean-up, and a crash on demand)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()

    def store(self) -> SqliteStateStore:
        return SqliteStateStore(self.state / "state.sqlite")

    def versions(self) -> list[VersionRow]:
        store = self.store()
        try:
            return store.list_versions()
        finally:
            store.close()


class CoordinatorDied(Exception):
    """The coordinator stopped answering (it was killed)."""


@dataclass
class Peer:
    name: str
    peer_id: str
    token: str
    finished: bool = False

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class Driver:
    """Scripted volunteers: register, work, upload, one request at a time (module docstring)."""

    config: RunConfig
    names: tuple[str, ...] = ("v0", "v1")
    client: httpx.Client | None = None
    peers: dict[str, Peer] = field(default_factory=dict)
    receipts: dict[tuple[str, int], tuple[str, str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # every 5xx and unexpected answer
    refusals: list[str] = field(default_factory=list)  # 4xx answers to uploads, for the record
    bases: list[tuple[int, str]] = field(default_factory=list)  # (base_version, weights) seen
    #: peer name -> (round, base version) of an upload whose answer never came: sent again
    #: first when the run goes on, as `crowdtrain join` retries a transfer that failed
    pending: dict[str, tuple[int, int]] = field(default_factory=dict)

    def connect(self, url: str) -> None:
        if self.client is not None:
            self.client.close()
        self.client = httpx.Client(base_url=url, timeout=60.0)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        assert self.client is not None
        try:
            r = self.client.request(method, path, **kw)
        except GONE as exc:
            raise CoordinatorDied(f"{method} {path}: {exc!r}") from None
        if r.status_code >= 500:
            self.errors.append(f"{method} {path}: {r.status_code} {r.text}")
        return r

    def payload(self, name: str, rnd: int) -> bytes:
        seed = int.from_bytes(hashlib.sha256(f"{name}/{rnd}".encode()).digest()[:4], "big")
        gen = torch.Generator().manual_seed(seed)
        delta = {
            k: torch.randn(shape, generator=gen) * 1e-3
            for k, shape in param_shapes(self.config.model).items()
        }
        return codec.encode(delta, self.config.codec)

    def meta(self, base: int) -> dict[str, Any]:
        """The X-Crowdtrain-Meta of a contribution from version BASE (claims that match the
        work order, so that the claims check passes)."""
        steps = self.config.inner.steps
        samples = steps * self.config.data.batch_size
        return {
            "base_version": base,
            "samples": samples,
            "tokens": samples * self.config.model.context,
            "steps": steps,
            "train_loss": 5.0,
        }

    def register(self, name: str) -> Peer:
        """Register NAME with a registration key, as `crowdtrain join` does: a retry after a
        crash that ate the answer gets the same peer back, never 409 `name_taken`."""
        body = {
            "name": name,
            "device": {"kind": "cpu", "threads": 1, "name": "chaos"},
            "key": hashlib.sha256(f"chaos-key-{name}".encode()).hexdigest(),
        }
        r = self._call("POST", "/v1/register", json=body)
        if r.status_code != 200:
            self.errors.append(f"register {name}: {r.status_code} {r.text}")
            raise AssertionError(f"register {name}: {r.status_code} {r.text}")
        doc = r.json()
        peer = Peer(name, doc["peer_id"], doc["token"])
        self.peers[name] = peer
        return peer

    def step(self, peer: Peer) -> bool:
        """One work request of PEER and, if it got an order, its upload; True when it did
        something (an upload or learning that the run finished)."""
        r = self._call("POST", "/v1/work", headers=peer.auth)
        if r.status_code != 200:
            self.errors.append(f"work {peer.name}: {r.status_code} {r.text}")
            raise AssertionError(f"work {peer.name}: {r.status_code} {r.text}")
        doc = r.json()
        if doc["kind"] == "finished":
            peer.finished = True
            return True
        if doc["kind"] != "work":
            if doc["kind"] != "wait":
                self.errors.append(f"work {peer.name}: unexpected {doc}")
            return False
        rnd, base = int(doc["round"]), int(doc["base_version"])
        self.bases.append((base, str(doc["weights"])))
        return self.upload(peer, rnd, base)

    def upload(self, peer: Peer, rnd: int, base: int) -> bool:
        """PEER's contribution to round RND from version BASE; True when it got a receipt."""
        self.pending[peer.name] = (rnd, base)
        meta = self.meta(base)
        up = self._call(
            "PUT",
            f"/v1/contributions/{rnd}",
            content=self.payload(peer.name, rnd),
            headers={
                **peer.auth,
                "Content-Type": "application/octet-stream",
                "X-Crowdtrain-Meta": json.dumps(meta),
            },
        )
        del self.pending[peer.name]
        if up.status_code == 200:
            receipt = up.json()["receipt"]
            before = self.receipts.get((peer.name, rnd))
            if before is not None and before[1] != receipt:
                self.errors.append(f"{peer.name} round {rnd}: receipt {receipt} after {before}")
            self.receipts[(peer.name, rnd)] = (peer.peer_id, receipt)
            return True
        self.refusals.append(f"upload {peer.name} round {rnd}: {up.status_code} {up.text}")
        return False

    def run(self, timeout: float = 60.0) -> None:
        """Register what is missing, then step the peers in turn until the run finishes."""
        for name in self.names:
            if name not in self.peers:
                self.register(name)
        for name, (rnd, base) in list(self.pending.items()):
            self.upload(self.peers[name], rnd, base)
        end = time.monotonic() + timeout
        while not all(p.finished for p in self.peers.values()):
            assert time.monotonic() < end, f"the run did not finish: {self.errors}"
            moved = False
            for name in self.names:
                peer = self.peers[name]
                if not peer.finished:
                    moved |= self.step(peer)
            if not moved:
                time.sleep(0.05)


def status(url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/v1/status", timeout=10).json())


def load(path: Path) -> RunConfig:
    return load_config(path)


class Volunteers:
    """`crowdtrain join` processes, each with its own home (identity, cache), killed at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: dict[str, int] = {}

    def start(self, url: str, name: str) -> subprocess.Popen[bytes]:
        """Start (or start again, with the identity kept in its home) volunteer NAME."""
        home = self.tmp / name
        home.mkdir(exist_ok=True)
        self.starts[name] = self.starts.get(name, 0) + 1
        env = {**os.environ, "CROWDTRAIN_CONFIG_DIR": str(home / "config")}
        env.pop("CROWDTRAIN_CRASH_AT", None)
        with (home / f"log-{self.starts[name]}").open("wb") as log:
            proc = subprocess.Popen(
                join_command(url, name, home),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def wait(self, name: str, timeout: float = 180.0) -> int:
        return self.procs[name].wait(timeout=timeout)

    def summary(self, name: str) -> dict[str, Any]:
        return dict(json.loads((self.tmp / name / "summary.json").read_text()))

    def logs(self, name: str) -> str:
        return "\n".join(
            (self.tmp / name / f"log-{i}").read_text(errors="replace")
            for i in range(1, self.starts.get(name, 0) + 1)
        )

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def wait_until(what: str, check: Any, timeout: float = 120.0, every: float = 0.05) -> Any:
    """Poll CHECK until it returns something true; return that."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def snapshot(state: Path) -> dict[str, Any]:
    """The protocol snapshot last committed in STATE ({} before the first)."""
    store = SqliteStateStore(state / "state.sqlite")
    try:
        return dict(store.get_json("protocol") or {})
    finally:
        store.close()


def holds_order(state: Path, name: str) -> tuple[str, int] | None:
    """(peer id, round) when volunteer NAME holds a work order in the open round and has not
    contributed to it yet."""
    snap = snapshot(state)
    if not snap:
        return None
    ids = {p["peer_id"] for p in snap["peers"] if p["name"] == name}
    rnd = snap["round"]
    orders = {o["peer_id"] for o in rnd["orders"]}
    held = ids & orders
    if not held:
        return None
    peer_id = held.pop()
    store = SqliteStateStore(state / "state.sqlite")
    try:
        if store.get_contribution(peer_id, int(rnd["number"])) is not None:
            return None
    finally:
        store.close()
    return peer_id, int(rnd["number"])


def slow_upload(state: Path, seen: dict[str, int]) -> bool:
    """Whether an upload body has been arriving for two polls in a row (a temp file of
    the blob store that is still there and has grown: the slow volunteer's, not a fast one's)."""
    now = {}
    for part in (state / "blobs" / "tmp").glob("put-*.part"):
        try:
            now[part.name] = part.stat().st_size
        except FileNotFoundError:
            continue
    slow = any(name in seen and size > seen[name] for name, size in now.items())
    seen.clear()
    seen.update(now)
    return slow


def accepted(state: Path) -> dict[tuple[str, int], str]:
    """(peer id, round) -> receipt of every accepted contribution in the store."""
    store = SqliteStateStore(state / "state.sqlite")
    try:
        rows = {}
        for v in range(0, 64):
            for c in store.contributions_for_round(v):
                if c.status == "accepted":
                    assert (c.peer_id, c.round) not in rows, "a contribution counted twice"
                    rows[(c.peer_id, c.round)] = c.receipt
        return rows
    finally:
        store.close()
