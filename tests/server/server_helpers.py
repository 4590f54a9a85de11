"""Helpers for the coordinator HTTP tests: fake clock, tiny run config, peers and uploads.

Imported by tests/server/conftest.py and the test modules (a module, not the conftest, so
that its name is unique in the repo).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from fastapi.testclient import TestClient

from crowdtrain import codec
from crowdtrain.codec import wire
from crowdtrain.config import RunConfig, parse_config
from crowdtrain.models import param_shapes
from crowdtrain.protocol.broadcast import weights_bytes

TOKENS = ["def", "class", "return", "import", "self", "if", "else", "for", "in", "None", "(", ")"]


class FakeClock:
    """A clock the test advances by hand (the coordinator's only source of time)."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def write_corpus(path: Path, n_bytes: int = 100_000) -> Path:
    """About `n_bytes` of varied, deterministic Python-like lines."""
    rng = random.Random(1)
    lines: list[str] = []
    size = 0
    i = 0
    while size < n_bytes:
        words = " ".join(rng.choice(TOKENS) for _ in range(rng.randint(2, 7)))
        line = f"{'    ' * rng.randint(0, 2)}{words} v{i % 23} = {rng.randint(0, 999)}\n"
        lines.append(line)
        size += len(line)
        i += 1
    path.write_text("".join(lines))
    return path


def server_config(corpus: Path, data_dir: Path, **rounds: Any) -> RunConfig:
    """The tiny run config of these tests (3 rounds, quorum 2, 30 s deadline)."""
    return parse_config(
        {
            "model": {"width": 32, "depth": 1, "heads": 2, "context": 32},
            "data": {
                "source": str(corpus),
                "dir": str(data_dir),
                "shard_bytes": 8192,
                "val_fraction": 0.1,
                "batch_size": 4,
            },
            "inner": {"steps": 2},
            "rounds": {"total": 3, "quorum": 2, "deadline_s": 30, **rounds},
            # HTTP mechanics with random deltas; test_server_defence.py turns the stages on.
            "defence": {"enabled": False},
        }
    )


# --- helpers ---------------------------------------------------------------------------------


@dataclass
class Peer:
    """A registered volunteer as the tests see it."""

    peer_id: str
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def register(client: TestClient, name: str = "vol", invite: str | None = None) -> Peer:
    body: dict[str, Any] = {"name": name, "device": {"kind": "cpu", "threads": 1, "name": "t"}}
    if invite is not None:
        body["invite"] = invite
    r = client.post("/v1/register", json=body)
    assert r.status_code == 200, r.text
    doc = r.json()
    return Peer(doc["peer_id"], doc["token"])


def work(client: TestClient, peer: Peer) -> dict[str, Any]:
    r = client.post("/v1/work", headers=peer.auth)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def make_delta(config: RunConfig, seed: int = 0, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=gen) * scale
        for name, shape in param_shapes(config.model).items()
    }


def make_payload(config: RunConfig, seed: int = 0) -> bytes:
    return codec.encode(make_delta(config, seed), config.codec)


def meta(base_version: int = 0, **over: Any) -> str:
    doc: dict[str, Any] = {
        "base_version": base_version,
        "samples": 8,
        "tokens": 256,
        "steps": 2,
        "train_loss": 5.0,
    }
    doc.update(over)
    return json.dumps(doc)


def upload(
    client: TestClient,
    peer: Peer,
    round_number: int | str,
    payload: bytes,
    meta_header: str | None = None,
    **headers: str,
) -> Any:
    """PUT a contribution; `meta_header` defaults to a valid meta for base version 0."""
    hdrs = {**peer.auth, "Content-Type": "application/octet-stream", **headers}
    hdrs["X-Crowdtrain-Meta"] = meta() if meta_header is None else meta_header
    return client.put(f"/v1/contributions/{round_number}", content=payload, headers=hdrs)


def ask_for_check(
    client: TestClient, config: RunConfig, peer: Peer, *others: Peer
) -> dict[str, Any]:
    """What PEER is handed once it has no work of its own left in the open round: it takes its
    order and uploads its contribution while OTHERS hold orders of theirs (so the round stays
    open), then asks again. A volunteer's own work comes first; checks come after."""
    order = work(client, peer)
    assert order["kind"] == "work", order
    for other in others:
        work(client, other)
    base = meta(order["base_version"])
    r = upload(client, peer, order["round"], make_payload(config, seed=50), base)
    assert r.status_code == 200, r.text
    return work(client, peer)


def assert_error(response: Any, status: int) -> dict[str, Any]:
    """The response is a JSON error {"error", "detail"} with this status and no traceback."""
    assert response.status_code == status, response.text
    doc: dict[str, Any] = response.json()
    assert set(doc) == {"error", "detail"}, doc
    assert isinstance(doc["error"], str) and doc["error"]
    assert isinstance(doc["detail"], str) and doc["detail"]
    assert "Traceback" not in response.text
    assert "\n" not in doc["detail"]
    return doc


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def delta_blob_id(config: RunConfig, payload: bytes) -> str:
    """The id under which the coordinator stores the decoded delta of `payload`."""
    decoded = codec.decode(payload, param_shapes(config.model))
    return sha256(weights_bytes(decoded))


def nan_payload(config: RunConfig, seed: int = 0) -> bytes:
    """A payload whose first block scale is NaN, with a *correct* digest (as in tests/codec), so
    the decoder reaches its value checks."""
    payload = make_payload(config, seed)
    header = codec.read_header(payload)
    core = wire.metadata_core(header.codec, header.params, header.shapes)
    tensors = dict(safetensors.torch.load(payload))
    key = next(k for k in sorted(tensors) if k.endswith("::scale"))
    bad = tensors[key].clone()
    bad[0] = math.nan
    tensors[key] = bad
    views = [(n, tensors[n].contiguous().view(torch.uint8).numpy().data) for n in sorted(tensors)]
    digest = wire.compute_digest(core, views)
    text = wire.metadata_text(core, digest)
    return bytes(safetensors.torch.save(tensors, metadata={wire.METADATA_KEY: text}))


def wrong_shape_payload(config: RunConfig) -> bytes:
    """A well-formed payload in which one parameter has the wrong shape."""
    delta = make_delta(config)
    name = sorted(delta)[0]
    delta[name] = torch.zeros(3, 5)
    return codec.encode(delta, config.codec)
