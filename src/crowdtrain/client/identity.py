"""The volunteer's identity with one coordinator, and checking the run manifest it pins.

A volunteer keeps, per coordinator URL, a small JSON file with its peer id, its bearer token and
the manifest hash and public key it pinned on first join (trust on first use, as SSH does with
host keys). The file lives in the user's config directory, is written atomically and readable
only by the user (0600, directory 0700), because the token is a credential.

`verify_manifest` checks the `/v1/manifest` document: the hash is the sha256 of the manifest's
canonical JSON, the Ed25519 signature over it is valid (RFC 8032), the manifest has the exact
shape crowdtrain expects (a valid run config, a valid data manifest, consistent hashes), and
it is the one pinned at join. A changed manifest is refused (`ManifestChanged`): a DiLoCo run
(Douillard et al. 2023, arXiv:2311.08105) only converges if every worker trains the same model
on the same data from the same initial weights.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import platformdirs

from crowdtrain import strictjson
from crowdtrain.client.signing import manifest_hash, signature_is_valid
from crowdtrain.client.transfer import ClientError, ManifestChanged
from crowdtrain.config import ConfigError, RunConfig, canonical_json, config_hash, parse_config
from crowdtrain.data import DataError, DataManifest, parse_manifest
from crowdtrain.data.atomic import atomic_write_bytes, fsync_dir

log = logging.getLogger(__name__)

ENV_CONFIG_DIR = "CROWDTRAIN_CONFIG_DIR"
MAX_STATE_BYTES = 64 << 10
MAX_MANIFEST_DOC_BYTES = 8 << 20
"""The largest `/v1/manifest` document (JSON bytes) a client accepts."""

MANIFEST_FORMAT = "crowdtrain-manifest"
MANIFEST_VERSION = 1
MAX_PARAMS = 100_000
MAX_DIMS = 16
MAX_DIM = 1 << 40

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
_DOC_KEYS = frozenset({"manifest", "hash", "signature", "public_key"})
_MANIFEST_KEYS = frozenset(
    {
        "format",
        "version",
        "run",
        "config_hash",
        "data",
        "data_hash",
        "initial_weights",
        "param_shapes",
    }
)
_STATE_KEYS = frozenset({"url", "peer_id", "token", "manifest_hash", "public_key"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


class InsecureUrl(ClientError):
    """A plain http:// coordinator URL for another machine, refused without `insecure`."""


class ManifestError(ClientError):
    """The coordinator's manifest document is malformed, or its hash or signature is wrong."""


@dataclass(frozen=True)
class ClientState:
    """What a volunteer remembers about one coordinator: credentials and the pinned manifest."""

    url: str
    peer_id: str
    token: str
    manifest_hash: str | None = None
    public_key: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "peer_id": self.peer_id,
            "token": self.token,
            "manifest_hash": self.manifest_hash,
            "public_key": self.public_key,
        }

    def pin(self, verified: VerifiedManifest) -> ClientState:
        """This state with VERIFIED's hash and public key pinned."""
        return replace(self, manifest_hash=verified.hash, public_key=verified.public_key)


@dataclass(frozen=True)
class VerifiedManifest:
    """A manifest whose hash, signature and shape were checked, with its parts parsed."""

    manifest: dict[str, Any]
    hash: str
    public_key: str
    config: RunConfig
    data: DataManifest
    initial_weights: str
    param_shapes: dict[str, tuple[int, ...]]


# ---------------------------------------------------------------------------------------------
# The state file


def normalize_url(url: str) -> str:
    """The canonical form of a coordinator URL: scheme://host[:port][/path], no trailing slash.

    Raises ClientError for anything but an http(s) URL with a host and no credentials,
    query or fragment.
    """
    try:
        u = httpx.URL(url.strip())
    except (httpx.InvalidURL, TypeError):
        raise ClientError(f"{url!r} is not a valid coordinator URL") from None
    if u.scheme not in _DEFAULT_PORTS or not u.host:
        raise ClientError(f"{url!r} is not an http:// or https:// coordinator URL")
    if u.userinfo or u.query or u.fragment:
        raise ClientError(
            f"the coordinator URL {url!r} must not contain a user name, query or fragment"
        )
    host = f"[{u.host}]" if ":" in u.host else u.host
    port = "" if u.port in (None, _DEFAULT_PORTS[u.scheme]) else f":{u.port}"
    return f"{u.scheme}://{host.lower()}{port}{u.path.rstrip('/')}"


def is_loopback(host: str) -> bool:
    """Whether HOST names this machine: `localhost`, 127.0.0.0/8 or ::1 (brackets allowed)."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def coordinator_url(url: str, *, insecure: bool = False) -> str:
    """`normalize_url(url)`, refusing plain http:// to any host but this machine.

    Over plain HTTP anyone on the path between volunteer and coordinator can read the bearer
    token and change the weights, data and manifest in flight (the manifest's signature is
    pinned only from the first, possibly tampered, join). Loopback traffic never leaves the
    machine, so it is allowed; anything else needs https:// or INSECURE (`join --insecure`).
    Raises InsecureUrl for a refused URL, ClientError for one that is not a coordinator URL.
    """
    canonical = normalize_url(url)
    parsed = httpx.URL(canonical)
    if parsed.scheme == "http" and not insecure and not is_loopback(parsed.host):
        raise InsecureUrl(
            f"refusing plain http:// to {parsed.host}, another machine: anyone on the way could "
            "read your token and alter the model you train; use the coordinator's https:// "
            "URL, or pass --insecure if you accept that (e.g. on a network you trust)"
        )
    return canonical


def _resolve_dir(override: Path | None = None) -> Path:
    """Where client state lives: OVERRIDE, else $CROWDTRAIN_CONFIG_DIR, else the user config dir."""
    if override is not None:
        return Path(override)
    env = os.environ.get(ENV_CONFIG_DIR)
    if env:
        return Path(env)
    return Path(platformdirs.user_config_dir("crowdtrain"))


config_dir = _resolve_dir


def state_path(url: str, config_dir: Path | None = None) -> Path:
    """The state file for coordinator URL (named by a sha256 of the normalised URL)."""
    digest = hashlib.sha256(normalize_url(url).encode()).hexdigest()
    return _resolve_dir(config_dir) / f"coordinator-{digest[:32]}.json"


def _corrupt(path: Path, why: str) -> ClientError:
    return ClientError(
        f"the saved client state {path} is unusable ({why}); delete that file and join again"
    )


def _optional_str(
    obj: dict[str, Any], key: str, path: Path, pattern: re.Pattern[str] | None
) -> str | None:
    value = obj[key]
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise _corrupt(path, f"'{key}' is not a string")
    if pattern is not None and not pattern.fullmatch(value):
        raise _corrupt(path, f"'{key}' is not 64 lowercase hex digits")
    return value


def _required_str(obj: dict[str, Any], key: str, path: Path) -> str:
    value = _optional_str(obj, key, path, None)
    if value is None:
        raise _corrupt(path, f"'{key}' is missing")
    return value


def load_state(url: str, config_dir: Path | None = None) -> ClientState | None:
    """The saved state for coordinator URL, or None if this machine never joined it.

    A file readable by group or others is tightened to 0600 (with a warning); a corrupt file
    raises ClientError naming it and telling the user to delete it.
    """
    path = state_path(url, config_dir)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _corrupt(path, exc.strerror or "cannot open it") from None
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if os.name == "posix" and mode & 0o077:
            log.warning("%s was readable by others (mode %o); tightening it to 0600", path, mode)
            os.fchmod(fd, 0o600)
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_STATE_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_STATE_BYTES:
        raise _corrupt(path, f"it is larger than {MAX_STATE_BYTES} bytes")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _corrupt(path, "it is not valid JSON") from None
    if not isinstance(obj, dict) or set(obj) != _STATE_KEYS:
        raise _corrupt(path, f"it must be an object with keys {sorted(_STATE_KEYS)}")
    if obj["url"] != normalize_url(url):
        raise _corrupt(path, f"it belongs to {str(obj['url'])[:100]!r}, not {normalize_url(url)!r}")
    return ClientState(
        url=obj["url"],
        peer_id=_required_str(obj, "peer_id", path),
        token=_required_str(obj, "token", path),
        manifest_hash=_optional_str(obj, "manifest_hash", path, _HEX64),
        public_key=_optional_str(obj, "public_key", path, _HEX64),
    )


def save_state(state: ClientState, config_dir: Path | None = None) -> Path:
    """Write STATE atomically to its file (mode 0600, directory 0700) and return the path."""
    state = replace(state, url=normalize_url(state.url))
    path = state_path(state.url, config_dir)
    directory = path.parent
    if not directory.is_dir():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.name == "posix":
            os.chmod(directory, 0o700)
    data = (json.dumps(state.to_json(), indent=1, sort_keys=True) + "\n").encode()
    atomic_write_bytes(path, data)  # a mkstemp file: mode 0600 from its creation
    fsync_dir(directory)
    return path


def registration_key(url: str, config_dir: Path | None = None) -> str:
    """The secret this client registers with at coordinator URL, created (mode 0600, durable)
    before its first registration and kept until the answer is saved (``forget_key``): a
    registration whose answer was lost is retried with the same key, and the coordinator
    returns the same peer instead of refusing the name as taken."""
    path = state_path(url, config_dir).with_suffix(".key")
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        key = ""
    except OSError as exc:
        raise ClientError(f"cannot read the registration key {path}: {exc}") from None
    if re.fullmatch(r"[A-Za-z0-9_-]{32,128}", key):
        return key
    key = secrets.token_urlsafe(32)
    directory = path.parent
    if not directory.is_dir():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write_bytes(path, key.encode())  # a mkstemp file: mode 0600 from its creation
    fsync_dir(directory)
    return key


def forget_key(url: str, config_dir: Path | None = None) -> None:
    """Delete the registration key once the registration's answer is saved."""
    state_path(url, config_dir).with_suffix(".key").unlink(missing_ok=True)


def forget_state(url: str, config_dir: Path | None = None) -> bool:
    """Delete the saved state for coordinator URL; whether there was one."""
    try:
        state_path(url, config_dir).unlink()
    except FileNotFoundError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# The manifest


def parse_manifest_doc(raw: bytes) -> dict[str, Any]:
    """Parse a `/v1/manifest` reply's bytes (size-bounded, strict JSON) into a dict."""
    if len(raw) > MAX_MANIFEST_DOC_BYTES:
        raise ManifestError(
            f"the coordinator's manifest is larger than {MAX_MANIFEST_DOC_BYTES} bytes"
        )
    try:
        doc = strictjson.loads(raw)
    except strictjson.StrictJsonError as exc:
        raise ManifestError(f"the coordinator's manifest is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ManifestError("the coordinator's manifest document is not a JSON object")
    return doc


def _bad(why: str) -> ManifestError:
    return ManifestError(f"the coordinator's run manifest is invalid: {why}")


def _hex(doc: dict[str, Any], key: str, pattern: re.Pattern[str], what: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _bad(f"'{key}' is not {what}")
    return value


def _param_shapes(value: object) -> dict[str, tuple[int, ...]]:
    if not isinstance(value, dict) or not value:
        raise _bad("'param_shapes' must be a non-empty object of parameter shapes")
    if len(value) > MAX_PARAMS:
        raise _bad(f"'param_shapes' lists more than {MAX_PARAMS} parameters")
    out: dict[str, tuple[int, ...]] = {}
    for name, dims in value.items():
        if not isinstance(name, str) or not 1 <= len(name) <= 256:
            raise _bad("a parameter name in 'param_shapes' is empty or too long")
        if (
            not isinstance(dims, list)
            or len(dims) > MAX_DIMS
            or not all(type(d) is int and 0 <= d <= MAX_DIM for d in dims)
        ):
            raise _bad(f"'param_shapes.{name[:64]}' is not a list of non-negative integers")
        out[name] = tuple(dims)
    return out


def _check_contents(manifest: object) -> tuple[RunConfig, DataManifest, str, dict[str, Any]]:
    if not isinstance(manifest, dict):
        raise _bad("'manifest' is not a JSON object")
    keys = set(manifest)
    if keys != _MANIFEST_KEYS:
        missing, extra = sorted(_MANIFEST_KEYS - keys), sorted(keys - _MANIFEST_KEYS)
        raise _bad(f"missing keys {missing}" if missing else f"unknown keys {extra}")
    if manifest["format"] != MANIFEST_FORMAT:
        raise _bad(f"'format' is {str(manifest['format'])[:64]!r}, not {MANIFEST_FORMAT!r}")
    if type(manifest["version"]) is not int or manifest["version"] != MANIFEST_VERSION:
        raise ManifestError(
            f"the coordinator's manifest is version {str(manifest['version'])[:20]}, and this "
            f"crowdtrain reads version {MANIFEST_VERSION}; upgrade crowdtrain"
        )
    if not isinstance(manifest["run"], dict):
        raise _bad("'run' is not a JSON object")
    try:
        run = parse_config(manifest["run"])
    except ConfigError as exc:
        raise _bad(f"'run' is not a valid run config ({exc})") from None
    if _hex(manifest, "config_hash", _HEX64, "a sha256 hex digest") != config_hash(run):
        raise _bad("'config_hash' is not the hash of 'run'")
    try:
        data = parse_manifest(canonical_json(manifest["data"]), "'data'")
    except DataError as exc:
        raise _bad(str(exc)) from None
    if _hex(manifest, "data_hash", _HEX64, "a sha256 hex digest") != data.hash():
        raise _bad("'data_hash' is not the hash of 'data'")
    weights = _hex(manifest, "initial_weights", _HEX64, "a sha256 hex digest")
    return run, data, weights, manifest


def verify_manifest(
    doc: dict[str, Any],
    pinned: ClientState | None,
    *,
    state_file: Path | None = None,
) -> VerifiedManifest:
    """Check a `/v1/manifest` document and return its parsed parts.

    Raises ManifestError if it is malformed or its hash or signature is wrong, and
    ManifestChanged if PINNED holds a different manifest hash or public key. STATE_FILE (by
    default PINNED's file in the default config dir) is named in the message so that the user
    knows what to delete to join the new run.
    """
    if not isinstance(doc, dict) or not set(doc) >= _DOC_KEYS:
        raise ManifestError(
            f"the coordinator's manifest document must be an object with keys {sorted(_DOC_KEYS)}"
        )
    size = len(canonical_json(doc["manifest"]))
    if size > MAX_MANIFEST_DOC_BYTES:
        raise ManifestError(
            f"the coordinator's manifest is {size} bytes, more than the "
            f"{MAX_MANIFEST_DOC_BYTES} allowed"
        )
    digest = _hex(doc, "hash", _HEX64, "a sha256 hex digest")
    signature = _hex(doc, "signature", _HEX128, "an Ed25519 signature in hex")
    public_key = _hex(doc, "public_key", _HEX64, "an Ed25519 public key in hex")
    if not isinstance(doc["manifest"], dict) or manifest_hash(doc["manifest"]) != digest:
        raise ManifestError(
            "the coordinator's manifest does not match its hash; it was altered in transit "
            "or the coordinator is broken"
        )
    if not signature_is_valid(digest, signature, public_key):
        raise ManifestError(
            "the coordinator's manifest signature is invalid; it was altered in transit "
            "or the coordinator is broken"
        )
    run, data, weights, manifest = _check_contents(doc["manifest"])
    shapes = _param_shapes(manifest["param_shapes"])
    if pinned is not None:
        where = state_file if state_file is not None else state_path(pinned.url)
        if pinned.manifest_hash is not None and pinned.manifest_hash != digest:
            raise ManifestChanged(
                "the coordinator's run manifest changed since you joined (pinned "
                f"{pinned.manifest_hash[:12]}…, now {digest[:12]}…); refusing to continue — "
                f"delete {where} to join the new run"
            )
        if pinned.public_key is not None and pinned.public_key != public_key:
            raise ManifestChanged(
                "the coordinator's signing key changed since you joined (pinned "
                f"{pinned.public_key[:12]}…, now {public_key[:12]}…); refusing to continue — "
                f"delete {where} to join the new run"
            )
    return VerifiedManifest(
        manifest=manifest,
        hash=digest,
        public_key=public_key,
        config=run,
        data=data,
        initial_weights=weights,
        param_shapes=shapes,
    )
