"""`crowdtrain serve --tls-cert --tls-key`: a live coordinator over HTTPS on 127.0.0.1.

A test CA and a certificate for 127.0.0.1 and localhost come from `trustme`. The coordinator is
the one `crowdtrain serve` starts (`crowdtrain.server.serve.listen`), run in a thread on port 0
and stopped through uvicorn's `should_exit`. The CLI's checks of the TLS files run before
anything listens.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    PrivateFormat,
    load_pem_private_key,
)
from typer.testing import CliRunner

from crowdtrain.cli import app
from crowdtrain.client.api import CoordinatorApi
from crowdtrain.client.transfer import CertificateError, RetryPolicy
from crowdtrain.config import ConfigError, RunConfig
from crowdtrain.server.serve import Listening, TlsFiles, listen, tls_files

runner = CliRunner()


@dataclass(frozen=True)
class Pki:
    """A test CA's certificate and a server certificate (with its key) that it issued."""

    ca_cert: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    where = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    server.cert_chain_pems[0].write_to_path(str(where / "cert.pem"))
    server.private_key_pem.write_to_path(str(where / "key.pem"))
    return Pki(where / "ca.pem", where / "cert.pem", where / "key.pem")


@dataclass
class Live:
    """A coordinator serving HTTPS in a thread, and the lines it announced at start-up."""

    url: str
    lines: list[str]
    state: Path


@pytest.fixture
def live(config: RunConfig, tmp_path: Path, pki: Pki) -> Iterator[Live]:
    lines: list[str] = []
    tls = tls_files(pki.cert, pki.key)
    assert tls == TlsFiles(pki.cert, pki.key)
    served: Listening = listen(
        config, tmp_path / "state", host="127.0.0.1", port=0, announce=lines.append, tls=tls
    )
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not served.server.started:
        assert thread.is_alive(), "the coordinator stopped during start-up"
        assert time.monotonic() < deadline, "the coordinator did not start"
        time.sleep(0.02)
    try:
        yield Live(served.url, lines, tmp_path / "state")
    finally:
        served.server.should_exit = True
        thread.join(timeout=20)


def one_line_error(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert "Traceback" not in output
    assert len(lines) == 1, output
    return lines[0]


def test_the_coordinator_serves_https_and_announces_https_urls(live: Live, pki: Pki) -> None:
    assert live.url.startswith("https://127.0.0.1:")
    assert f"listening on {live.url} " in live.lines[0]
    assert any(line.startswith(f"dashboard at {live.url}/ ") for line in live.lines)
    assert not any("http://" in line for line in live.lines)
    assert '"url": "https://127.0.0.1:' in (live.state / "server.json").read_text()
    with CoordinatorApi(live.url, ca_cert=pki.ca_cert, policy=RetryPolicy(max_tries=1)) as api:
        doc = api.manifest()
    assert set(doc) >= {"manifest", "hash", "signature", "public_key"}


def test_localhost_matches_the_certificate_too(live: Live, pki: Pki) -> None:
    url = live.url.replace("127.0.0.1", "localhost")
    with CoordinatorApi(url, ca_cert=pki.ca_cert, policy=RetryPolicy(max_tries=1)) as api:
        assert isinstance(api.status(), dict)


def never_sleep(seconds: float) -> None:
    raise AssertionError("a certificate failure was retried")


def test_an_untrusted_certificate_is_a_clear_error_at_once(live: Live) -> None:
    # Endless retries, but a certificate failure must end the call at its first try.
    api = CoordinatorApi(live.url, policy=RetryPolicy(max_tries=None), sleep=never_sleep)
    with api, pytest.raises(CertificateError) as caught:
        api.manifest()
    message = str(caught.value)
    assert message.startswith("the coordinator's TLS certificate failed verification (")
    assert "--ca-cert" in message and "\n" not in message


def test_another_ca_does_not_make_the_certificate_trusted(
    live: Live, tmp_path: Path, pki: Pki
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    api = CoordinatorApi(live.url, ca_cert=other, sleep=never_sleep)
    with api, pytest.raises(CertificateError):
        api.status()


def test_join_reports_an_untrusted_certificate_in_one_line(live: Live, tmp_path: Path) -> None:
    args = ["join", live.url, "--device", "cpu", "--threads", "1", "--quiet"]
    result = runner.invoke(app, [*args, "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 2
    line = one_line_error(result.output)
    assert line.startswith("error: the coordinator's TLS certificate failed verification")


# --- serve's checks of its TLS files (before it listens) -------------------------------------


def serve_error(tmp_path: Path, *tls: str | Path) -> str:
    """`crowdtrain serve` with these TLS options: its one-line error (exit status 2)."""
    args = ["serve", "--state", str(tmp_path / "state"), "--port", "0", *map(str, tls)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "state").exists()  # refused before anything started
    return one_line_error(result.output)


def test_serve_needs_both_the_certificate_and_the_key(tmp_path: Path, pki: Pki) -> None:
    line = serve_error(tmp_path, "--tls-cert", pki.cert)
    assert line == (
        "error: --tls-cert needs --tls-key too: HTTPS needs both the certificate and its key"
    )
    line = serve_error(tmp_path, "--tls-key", pki.key)
    assert line.startswith("error: --tls-key needs --tls-cert too")


def test_serve_refuses_a_missing_certificate_or_key(tmp_path: Path, pki: Pki) -> None:
    missing = tmp_path / "nope.pem"
    line = serve_error(tmp_path, "--tls-cert", missing, "--tls-key", pki.key)
    assert line == f"error: cannot read the TLS certificate {missing}: No such file or directory"
    line = serve_error(tmp_path, "--tls-cert", pki.cert, "--tls-key", missing)
    assert line == f"error: cannot read the TLS key {missing}: No such file or directory"


def test_serve_refuses_files_that_are_not_a_certificate_and_its_key(
    tmp_path: Path, pki: Pki
) -> None:
    line = serve_error(tmp_path, "--tls-cert", pki.key, "--tls-key", pki.key)
    assert line == f"error: --tls-cert: {pki.key} is not a PEM certificate"
    line = serve_error(tmp_path, "--tls-cert", pki.cert, "--tls-key", pki.cert)
    assert line == f"error: --tls-key: {pki.cert} is not a PEM private key"
    stranger = tmp_path / "stranger.pem"
    trustme.CA().issue_cert("127.0.0.1").private_key_pem.write_to_path(str(stranger))
    line = serve_error(tmp_path, "--tls-cert", pki.cert, "--tls-key", stranger)
    assert line == f"error: --tls-key: {stranger} is not the key of the certificate {pki.cert}"


def test_tls_files_refuses_an_unreadable_path(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ConfigError, match=r"^cannot read the TLS certificate .*: Is a directory$"):
        tls_files(tmp_path, pki.key)
    assert tls_files(None, None) is None


def test_tls_files_refuses_an_encrypted_key(tmp_path: Path, pki: Pki) -> None:
    key = load_pem_private_key(pki.key.read_bytes(), password=None)
    locked = tmp_path / "locked.pem"
    locked.write_bytes(
        key.private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"secret passphrase")
        )
    )
    with pytest.raises(ConfigError, match=r"^--tls-key: .*locked.pem is encrypted; give serve"):
        tls_files(pki.cert, locked)


def test_tls_files_refuses_an_expired_certificate(tmp_path: Path) -> None:
    old = trustme.CA().issue_cert(
        "127.0.0.1", not_before=datetime(2020, 1, 1), not_after=datetime(2021, 1, 1)
    )
    cert, key = tmp_path / "old.pem", tmp_path / "old-key.pem"
    old.cert_chain_pems[0].write_to_path(str(cert))
    old.private_key_pem.write_to_path(str(key))
    with pytest.raises(ConfigError, match=r"^--tls-cert: the certificate .* expired on 2021-01-01"):
        tls_files(cert, key)
