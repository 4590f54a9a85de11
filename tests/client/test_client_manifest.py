"""Signing and verifying the run manifest: hash, Ed25519 signature, shape, and pinning."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from crowdtrain.client.identity import (
    MAX_MANIFEST_DOC_BYTES,
    ClientState,
    ManifestError,
    parse_manifest_doc,
    verify_manifest,
)
from crowdtrain.client.signing import (
    SigningKeyError,
    load_or_create_signing_key,
    manifest_hash,
    public_key_hex,
    sign_manifest,
    signature_is_valid,
)
from crowdtrain.client.transfer import ManifestChanged
from crowdtrain.config import RunConfig, canonical_json, config_hash
from crowdtrain.data import DataManifest, ShardRef

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
URL = "http://127.0.0.1:8000"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_manifest(**changes: Any) -> dict[str, Any]:
    """A realistic run manifest: default run config, a three-shard corpus, a small model."""
    run = RunConfig()
    data = DataManifest(
        source="corpus",
        include=("*.py",),
        shard_bytes=8,
        val_fraction=0.25,
        train=(ShardRef(_sha(b"a"), 8), ShardRef(_sha(b"b"), 3)),
        val=(ShardRef(_sha(b"c"), 8),),
        total_bytes=19,
        files=2,
    )
    manifest = {
        "format": "crowdtrain-manifest",
        "version": 1,
        "run": run.model_dump(mode="json"),
        "config_hash": config_hash(run),
        "data": data.to_json(),
        "data_hash": data.hash(),
        "initial_weights": _sha(b"theta0"),
        "param_shapes": {"wte.weight": [256, 128], "ln.bias": [128], "scale": []},
    }
    manifest.update(changes)
    return manifest


def signed(manifest: dict[str, Any] | None = None, key: Ed25519PrivateKey = KEY) -> dict[str, Any]:
    return sign_manifest(make_manifest() if manifest is None else manifest, key)


def test_a_good_manifest_verifies_and_parses() -> None:
    doc = signed()
    v = verify_manifest(doc, None)
    assert v.hash == _sha(canonical_json(doc["manifest"])) == doc["hash"]
    assert v.public_key == public_key_hex(KEY)
    assert v.config == RunConfig()
    assert v.data.train_ids == [_sha(b"a"), _sha(b"b")]
    assert v.initial_weights == _sha(b"theta0")
    assert v.param_shapes == {"wte.weight": (256, 128), "ln.bias": (128,), "scale": ()}
    assert v.manifest == doc["manifest"]


def test_the_document_survives_a_json_round_trip() -> None:
    raw = json.dumps(signed(), indent=2).encode()
    assert verify_manifest(parse_manifest_doc(raw), None).hash == signed()["hash"]


def test_signing_is_deterministic_and_checkable() -> None:
    doc = signed()
    assert doc == signed()
    assert set(doc) == {"manifest", "hash", "signature", "public_key"}
    assert doc["hash"] == manifest_hash(doc["manifest"])
    assert signature_is_valid(doc["hash"], doc["signature"], doc["public_key"])
    assert not signature_is_valid(doc["hash"], doc["signature"], public_key_hex(OTHER_KEY))
    assert not signature_is_valid(doc["hash"], "zz", doc["public_key"])


def test_a_pinned_client_accepts_the_same_manifest() -> None:
    doc = signed()
    v = verify_manifest(doc, None)
    state = ClientState(URL, "p", "t").pin(v)
    assert (state.manifest_hash, state.public_key) == (doc["hash"], doc["public_key"])
    assert verify_manifest(doc, state).hash == doc["hash"]


def test_a_changed_manifest_is_refused_with_the_file_to_delete(tmp_path: Path) -> None:
    pinned = ClientState(URL, "p", "t").pin(verify_manifest(signed(), None))
    changed = signed(make_manifest(initial_weights=_sha(b"other")))
    with pytest.raises(ManifestChanged) as info:
        verify_manifest(changed, pinned, state_file=tmp_path / "state.json")
    msg = str(info.value)
    assert "changed since you joined" in msg
    assert pinned.manifest_hash is not None
    assert f"pinned {pinned.manifest_hash[:12]}" in msg
    assert f"now {changed['hash'][:12]}" in msg
    assert f"delete {tmp_path / 'state.json'} to join the new run" in msg


def test_the_default_file_in_the_message_is_the_state_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CROWDTRAIN_CONFIG_DIR", str(tmp_path))
    pinned = ClientState(URL, "p", "t", "00" * 32, public_key_hex(KEY))
    with pytest.raises(ManifestChanged, match=str(tmp_path)):
        verify_manifest(signed(), pinned)


def test_a_changed_signing_key_is_refused() -> None:
    pinned = ClientState(URL, "p", "t").pin(verify_manifest(signed(), None))
    with pytest.raises(ManifestChanged, match="signing key changed"):
        verify_manifest(signed(key=OTHER_KEY), pinned)


def test_a_wrong_hash_is_refused() -> None:
    doc = signed()
    doc["manifest"]["initial_weights"] = _sha(b"tampered")
    with pytest.raises(ManifestError, match="does not match its hash"):
        verify_manifest(doc, None)


def test_a_bad_signature_is_refused() -> None:
    doc = signed()
    doc["signature"] = OTHER_KEY.sign(bytes.fromhex(doc["hash"])).hex()
    with pytest.raises(ManifestError, match="signature is invalid"):
        verify_manifest(doc, None)


def test_a_consistently_re_signed_tampering_is_still_caught_by_the_pin() -> None:
    pinned = ClientState(URL, "p", "t").pin(verify_manifest(signed(), None))
    evil = signed(make_manifest(initial_weights=_sha(b"evil")), key=OTHER_KEY)
    with pytest.raises(ManifestChanged):
        verify_manifest(evil, pinned)


def test_an_oversized_document_is_refused_before_parsing() -> None:
    with pytest.raises(ManifestError, match="larger than"):
        parse_manifest_doc(b" " * (MAX_MANIFEST_DOC_BYTES + 1))
    big = signed(make_manifest(padding="x" * MAX_MANIFEST_DOC_BYTES))
    with pytest.raises(ManifestError, match="more than the"):
        verify_manifest(big, None)


@pytest.mark.parametrize("raw", [b"{nope", b"[1, 2]", b'{"a": 1, "a": 2}', b'{"a": NaN}', b"\xff"])
def test_malformed_documents_are_refused(raw: bytes) -> None:
    with pytest.raises(ManifestError):
        parse_manifest_doc(raw)


Mutation = Callable[[dict[str, Any]], object]

BAD_MANIFESTS: dict[str, Mutation] = {
    "extra key": lambda m: m.update(extra=1),
    "missing key": lambda m: m.pop("param_shapes"),
    "wrong format": lambda m: m.update(format="other"),
    "future version": lambda m: m.update(version=2),
    "version as bool": lambda m: m.update(version=True),
    "run not an object": lambda m: m.update(run=[1]),
    "bad run": lambda m: m["run"]["model"].update(arch="rnn"),
    "unknown run key": lambda m: m["run"].update(turbo=True),
    "stale config hash": lambda m: m.update(config_hash="0" * 64),
    "bad data": lambda m: m["data"].update(total_bytes=5),
    "data not an object": lambda m: m.update(data="x"),
    "stale data hash": lambda m: m.update(data_hash="0" * 64),
    "short weights hash": lambda m: m.update(initial_weights="abc"),
    "upper-case weights hash": lambda m: m.update(initial_weights="AB" * 32),
    "shapes not a dict": lambda m: m.update(param_shapes=[[1, 2]]),
    "empty shapes": lambda m: m.update(param_shapes={}),
    "shape not a list": lambda m: m.update(param_shapes={"w": 3}),
    "float dim": lambda m: m.update(param_shapes={"w": [2.0]}),
    "bool dim": lambda m: m.update(param_shapes={"w": [True]}),
    "negative dim": lambda m: m.update(param_shapes={"w": [-1]}),
    "too many dims": lambda m: m.update(param_shapes={"w": [1] * 17}),
    "empty name": lambda m: m.update(param_shapes={"": [1]}),
}


@pytest.mark.parametrize("name", BAD_MANIFESTS)
def test_malformed_manifests_are_refused_even_when_signed(name: str) -> None:
    manifest = copy.deepcopy(make_manifest())
    BAD_MANIFESTS[name](manifest)
    with pytest.raises(ManifestError) as info:
        verify_manifest(signed(manifest), None)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("signature"),
        lambda d: d.update(hash="XYZ"),
        lambda d: d.update(public_key="00"),
        lambda d: d.update(signature=1),
        lambda d: d.update(manifest=[]),
    ],
)
def test_malformed_envelopes_are_refused(mutate: Mutation) -> None:
    doc = signed()
    mutate(doc)
    with pytest.raises(ManifestError):
        verify_manifest(doc, None)


def test_a_future_version_asks_for_an_upgrade() -> None:
    with pytest.raises(ManifestError, match="upgrade crowdtrain"):
        verify_manifest(signed(make_manifest(version=2)), None)


# --- the coordinator's key file --------------------------------------------------------------


def test_the_signing_key_is_created_once_private_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "signing.key"
    key = load_or_create_signing_key(path)
    assert path.read_bytes() == key.private_bytes_raw() and len(path.read_bytes()) == 32
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_signing_key(path)
    assert public_key_hex(again) == public_key_hex(key)
    assert [p.name for p in path.parent.iterdir()] == ["signing.key"]


def test_a_broken_key_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    path.write_bytes(b"short")
    with pytest.raises(SigningKeyError, match="not a raw 32-byte Ed25519 key"):
        load_or_create_signing_key(path)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_loose_key_file_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    load_or_create_signing_key(path)
    os.chmod(path, 0o644)
    load_or_create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
