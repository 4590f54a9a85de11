"""Run a coordinator on uvicorn: bind first (port 0 works), then announce where it listens.

The bound address is printed and written to `<state>/server.json` so scripts and tests that
start a coordinator on port 0 can find it. The dashboard's admin token is the one given, or
else one generated once per state directory and kept in `<state>/admin.token` (mode 600).
With a certificate and its key (`TlsFiles`, checked by `tls_files` before anything starts) it
serves HTTPS, and every URL it announces is https://.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import uvicorn
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)

from crowdtrain.config import ConfigError, RunConfig
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


@dataclass(frozen=True)
class TlsFiles:
    """A PEM certificate (chain) and its unencrypted PEM private key, checked by `tls_files`."""

    cert: Path
    key: Path


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from None


def _public(key: PublicKeyTypes) -> bytes:
    """The SubjectPublicKeyInfo bytes of a public key."""
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def tls_files(cert: Path | None, key: Path | None) -> TlsFiles | None:
    """The TLS files of `serve --tls-cert CERT --tls-key KEY`, or None for plain HTTP.

    Both or neither must be given. Raises ConfigError (one sentence) when a file cannot be
    read, CERT is not a PEM certificate or has expired, KEY is not an unencrypted PEM private
    key, or KEY does not belong to CERT, so that a bad file stops `serve` before it listens.
    """
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        given, missing = ("--tls-cert", "--tls-key") if key is None else ("--tls-key", "--tls-cert")
        raise ConfigError(
            f"{given} needs {missing} too: HTTPS needs both the certificate and its key"
        )
    cert_pem, key_pem = _read(cert, "certificate"), _read(key, "key")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ConfigError(f"--tls-cert: {cert} is not a PEM certificate") from None
    try:
        private = load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(f"--tls-key: {key} is encrypted; give serve an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"--tls-key: {key} is not a PEM private key") from None
    if _public(chain[0].public_key()) != _public(private.public_key()):
        raise ConfigError(f"--tls-key: {key} is not the key of the certificate {cert}")
    expiry = chain[0].not_valid_after_utc
    if expiry < datetime.now(UTC):
        raise ConfigError(f"--tls-cert: the certificate {cert} expired on {expiry:%Y-%m-%d}")
    try:  # what uvicorn will do with them
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(f"the TLS library cannot use {cert} with {key}: {exc}") from None
    return TlsFiles(cert, key)


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


@dataclass
class Listening:
    """A coordinator bound to its socket and announced: `run` serves until it is stopped."""

    coordinator: Coordinator
    server: uvicorn.Server
    sock: socket.socket
    url: str

    def run(self) -> None:
        """Serve until Ctrl-C, SIGTERM or `server.should_exit`, then shut the coordinator down."""
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.coordinator.shutdown()
            self.coordinator.trackers.close()


def listen(
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
    tls: TlsFiles | None = None,
) -> Listening:
    """The coordinator for `config` with its state in `state_dir`, bound to (host, port), its
    URLs announced and written to `<state>/server.json`; `.run()` serves until stopped.

    `workers`: threads for the work done on each contribution as it arrives (and for the
    close's aggregation). `tls`: serve HTTPS with these files (checked by `tls_files`).
    """
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
    url = f"{'https' if tls else 'http'}://{host}:{bound}"
    info = {"url": url, "pid": os.getpid()}
    tmp = state_dir / "server.json.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, state_dir / "server.json")
    announce(f"coordinator for run '{config.name}' listening on {url} (state in {state_dir})")
    announce(coordinator.admission_config.describe())
    held = "your --admin-token" if admin else f"the token in {state_dir / 'admin.token'}"
    announce(f"dashboard at {url}/ (admin view: {url}/#admin=<{held}>)")
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(coordinator),
            log_level="warning",
            access_log=False,
            ssl_certfile=str(tls.cert) if tls else None,
            ssl_keyfile=str(tls.key) if tls else None,
        )
    )
    return Listening(coordinator, server, sock, url)
