"""The client's transport rules: plain http:// only to this machine unless `--insecure`, and
HTTPS that always verifies, trusting the system's CAs plus `--ca-cert`'s.

Nothing here connects anywhere: URLs are only checked, and `join` is refused before it dials.
(tests/server/test_server_tls.py talks HTTPS to a live coordinator on 127.0.0.1.)
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme
from typer.testing import CliRunner

from crowdtrain.cli import app
from crowdtrain.client.api import CoordinatorApi
from crowdtrain.client.identity import InsecureUrl, coordinator_url, is_loopback
from crowdtrain.client.transfer import ClientError, tls_context

LOOPBACK = [
    "http://127.0.0.1:8000",
    "http://127.9.8.7",
    "http://localhost:8000/",
    "http://LocalHost",
    "http://[::1]:8000",
]
ELSEWHERE = [
    "http://organizer.example:8000",
    "http://10.0.0.5:8000",
    "http://192.168.1.20",
    "http://[2001:db8::1]:8000",
    "http://localhost.example.com",
    "http://127.0.0.1.nip.io",
    "http://0.0.0.0:8000",
]


@pytest.mark.parametrize("url", LOOPBACK)
def test_plain_http_to_this_machine_is_allowed(url: str) -> None:
    assert coordinator_url(url).startswith("http://")


@pytest.mark.parametrize("url", ELSEWHERE)
def test_plain_http_to_another_machine_needs_insecure(url: str) -> None:
    with pytest.raises(InsecureUrl) as caught:
        coordinator_url(url)
    message = str(caught.value)
    assert message.startswith("refusing plain http:// to ")
    assert "https://" in message and "--insecure" in message and "\n" not in message
    assert coordinator_url(url, insecure=True).startswith("http://")


@pytest.mark.parametrize("url", ["https://organizer.example:8000", "https://10.0.0.5"])
def test_https_is_allowed_anywhere(url: str) -> None:
    assert coordinator_url(url) == url


def test_the_url_is_normalized_as_before() -> None:
    assert coordinator_url("https://Organizer.Example:443/run/ ") == "https://organizer.example/run"
    with pytest.raises(ClientError, match="is not an http:// or https:// coordinator URL"):
        coordinator_url("ftp://organizer.example", insecure=True)


def test_loopback_hosts() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.255.0.1", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("128.0.0.1", "::2", "example.com", "localhost.lan"))


def test_the_api_client_checks_its_url_before_anything_else() -> None:
    with pytest.raises(InsecureUrl):
        CoordinatorApi("http://organizer.example:8000")
    with CoordinatorApi("http://organizer.example:8000", insecure=True) as api:
        assert api.base_url == "http://organizer.example:8000"


# --- trusted certificate authorities -----------------------------------------------------------


def test_tls_context_always_verifies(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    system = tls_context()
    extended = tls_context(ca)
    for context in (system, extended):
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert extended.cert_store_stats()["x509_ca"] == system.cert_store_stats()["x509_ca"] + 1


def test_tls_context_refuses_a_bad_ca_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ClientError, match=r"^--ca-cert: cannot read .*missing.pem: No such file"):
        tls_context(missing)
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(ClientError, match=r"^--ca-cert: .*notes.txt holds no PEM CA certificate$"):
        tls_context(not_pem)


# --- crowdtrain join ---------------------------------------------------------------------------


def join_error(*args: str) -> str:
    """`crowdtrain join ARGS`: its one-line error (exit status 2, no traceback)."""
    result = CliRunner().invoke(app, ["join", *args, "--device", "cpu", "--quiet"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_join_refuses_plain_http_to_another_machine() -> None:
    line = join_error("http://organizer.example:8000")
    assert line.startswith("error: refusing plain http:// to organizer.example, another machine")


def test_join_refuses_a_missing_ca_file(tmp_path: Path) -> None:
    line = join_error("https://127.0.0.1:9", "--ca-cert", str(tmp_path / "ca.pem"))
    assert line.startswith("error: --ca-cert: cannot read ")
