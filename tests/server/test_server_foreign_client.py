"""A client written from docs/API.md alone: it builds an int8 upload with numpy, hashlib and
json (no crowdtrain codec, no safetensors library) and the coordinator accepts it.

Everything it does is in docs/API.md, "The upload payload, byte by byte"; only the final
check (the payload decodes to the update within the documented error) uses crowdtrain.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from crowdtrain import codec
from crowdtrain.config import RunConfig


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def quantize(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes and float32 scales of a flat float32 array, as the document says."""
    n = x.size
    blocks = -(-n // block)
    padded = np.zeros(blocks * block, dtype=np.float32)
    padded[:n] = x
    rows = padded.reshape(blocks, block)
    absmax = np.abs(rows).max(axis=1).astype(np.float64)
    scale = (absmax / 127).astype(np.float32)
    short = scale.astype(np.float64) * 127 < absmax
    scale[short] = np.nextafter(scale[short], np.float32(np.inf))
    safe = np.where(scale > 0, scale, 1).astype(np.float64)
    q = np.clip(np.round(rows.astype(np.float64) / safe[:, None]), -127, 127).astype(np.int8)
    return q.reshape(-1)[:n], scale


def int8_payload(delta: dict[str, np.ndarray], block: int) -> bytes:
    tensors: dict[str, tuple[str, bytes, int]] = {}
    for name in sorted(delta):
        q, scale = quantize(delta[name].astype(np.float32).reshape(-1), block)
        tensors[f"{name}::q"] = ("I8", q.astype("<i1").tobytes(), q.size)
        tensors[f"{name}::scale"] = ("F32", scale.astype("<f4").tobytes(), scale.size)
    core = {
        "codec": "int8",
        "format": "crowdtrain-delta",
        "params": {"block_size": block},
        "shapes": {name: list(a.shape) for name, a in delta.items()},
        "version": 1,
    }
    h = hashlib.blake2b(canonical(core), digest_size=16)
    for name in sorted(tensors):
        data = tensors[name][1]
        h.update(struct.pack("<Q", len(name.encode())) + name.encode())
        h.update(struct.pack("<Q", len(data)) + data)
    header: dict[str, Any] = {
        "__metadata__": {"header": canonical({**core, "digest": h.hexdigest()}).decode()}
    }
    offset, body = 0, b""
    for name in sorted(tensors):
        dtype, data, count = tensors[name]
        header[name] = {
            "dtype": dtype,
            "shape": [count],
            "data_offsets": [offset, offset + len(data)],
        }
        offset, body = offset + len(data), body + data
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def test_a_client_from_the_docs_alone_uploads_an_int8_update(
    client: TestClient, config: RunConfig
) -> None:
    device = {"kind": "cpu", "threads": 1, "name": "other-language"}
    peer = client.post("/v1/register", json={"name": "foreign", "device": device}).json()
    auth = {"Authorization": f"Bearer {peer['token']}"}
    manifest = client.get("/v1/manifest").json()["manifest"]
    shapes = manifest["param_shapes"]
    block = manifest["run"]["codec"]["block_size"]
    assert manifest["run"]["codec"]["name"] == "int8"
    order = client.post("/v1/work", headers=auth).json()
    assert order["kind"] == "work"
    rng = np.random.default_rng(7)
    delta = {
        name: rng.normal(0, 0.01, size=shape).astype(np.float32) for name, shape in shapes.items()
    }
    payload = int8_payload(delta, block)
    meta = {
        "base_version": order["base_version"],
        "samples": order["max_steps"] * config.data.batch_size,
        "tokens": order["max_steps"] * config.data.batch_size * config.model.context,
        "steps": order["max_steps"],
        "train_loss": 3.0,
    }
    r = client.put(
        f"/v1/contributions/{order['round']}",
        content=payload,
        headers={**auth, "X-Crowdtrain-Meta": json.dumps(meta)},
    )
    assert r.status_code == 200, r.text
    assert r.json()["receipt"]
    # what it sent is what it meant (crowdtrain's own decoder, for the check only)
    decoded = codec.decode(payload, {k: tuple(v) for k, v in shapes.items()})
    for name, x in delta.items():
        assert np.allclose(decoded[name].numpy(), x, atol=float(np.abs(x).max()) / 127)
