"""Signing and checking the run manifest with Ed25519, shared by the coordinator and the client.

The coordinator pins a run with a manifest (resolved config, data hash, initial-weights hash) and
signs the sha256 of its canonical JSON with an Ed25519 key (Bernstein et al. 2012, "High-speed
high-security signatures"; RFC 8032). Volunteers pin the hash and the public key on first join
(trust on first use, as SSH does with host keys) and refuse a manifest that later differs.

The coordinator's private key is a raw 32-byte file, created once with mode 0600.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from crowdtrain.config import canonical_json

KEY_BYTES = 32


class SigningKeyError(ValueError):
    """The coordinator's signing-key file is unusable; the message is one sentence."""


def manifest_hash(manifest: dict[str, Any]) -> str:
    """sha256 hex of the manifest's canonical JSON: the bytes the coordinator signs."""
    return hashlib.sha256(canonical_json(manifest)).hexdigest()


def public_key_hex(private_key: Ed25519PrivateKey) -> str:
    """The raw 32-byte Ed25519 public key of PRIVATE_KEY, as hex."""
    return private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def sign_manifest(manifest: dict[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """The `/v1/manifest` response document for MANIFEST, signed with PRIVATE_KEY."""
    digest = manifest_hash(manifest)
    return {
        "manifest": manifest,
        "hash": digest,
        "signature": private_key.sign(bytes.fromhex(digest)).hex(),
        "public_key": public_key_hex(private_key),
    }


def signature_is_valid(digest_hex: str, signature_hex: str, public_key_hex: str) -> bool:
    """Whether SIGNATURE_HEX is a valid Ed25519 signature of the bytes of DIGEST_HEX.

    Malformed hex or a malformed key count as an invalid signature (never an exception).
    """
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
        key.verify(bytes.fromhex(signature_hex), bytes.fromhex(digest_hex))
    except (ValueError, InvalidSignature):
        return False
    return True


def _read_key(path: Path) -> Ed25519PrivateKey:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise SigningKeyError(f"cannot read signing key {path}: {exc.strerror}") from None
    try:
        if os.name == "posix" and stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o600)
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) != KEY_BYTES:
        raise SigningKeyError(
            f"signing key {path} is not a raw {KEY_BYTES}-byte Ed25519 key; "
            "move it away to create a new one (volunteers will then refuse the new key)"
        )
    return Ed25519PrivateKey.from_private_bytes(raw)


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load the raw Ed25519 key at PATH, or create it (mode 0600, atomically) if it is missing.

    A new key is written to a temporary file, fsync'ed and then hard-linked to PATH, so two
    coordinators starting at once end up sharing one key and no reader sees a partial file.
    Group/other permissions on an existing key file are removed.
    """
    path = Path(path)
    if path.exists():
        return _read_key(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes_raw()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read_key(path)
        except OSError:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return key
