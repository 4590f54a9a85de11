"""The volunteer's saved state: private files, atomic writes, clear errors, one file per URL."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from crowdtrain.client.identity import (
    ENV_CONFIG_DIR,
    ClientState,
    config_dir,
    forget_key,
    forget_state,
    load_state,
    normalize_url,
    registration_key,
    save_state,
    state_path,
)
from crowdtrain.client.transfer import ClientError

URL = "http://coordinator.example:8000"
HASH = "ab" * 32
KEY = "cd" * 32

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_round_trips(tmp_path: Path) -> None:
    state = ClientState(URL, "peer-1", "tok", HASH, KEY)
    path = save_state(state, tmp_path / "cfg")
    assert path == state_path(URL, tmp_path / "cfg")
    assert load_state(URL, tmp_path / "cfg") == state
    assert load_state(URL + "/", tmp_path / "cfg") == state  # same coordinator
    assert load_state("http://other:8000", tmp_path / "cfg") is None
    assert [p.name for p in (tmp_path / "cfg").iterdir()] == [path.name]  # no temp files left


def test_a_fresh_join_has_no_pins(tmp_path: Path) -> None:
    state = ClientState(URL, "peer-1", "tok")
    save_state(state, tmp_path)
    loaded = load_state(URL, tmp_path)
    assert loaded is not None and loaded.manifest_hash is None and loaded.public_key is None


@posix_only
def test_the_file_is_0600_and_the_directory_0700(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = save_state(ClientState(URL, "p", "t"), tmp_path / "new" / "cfg")
    finally:
        os.umask(old)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700


@posix_only
def test_a_file_readable_by_others_is_tightened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = ClientState(URL, "p", "t")
    path = save_state(state, tmp_path)
    os.chmod(path, 0o644)
    assert load_state(URL, tmp_path) == state
    assert _mode(path) == 0o600
    assert "tightening" in caplog.text


def test_the_env_var_overrides_the_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_CONFIG_DIR, str(tmp_path / "env"))
    assert config_dir() == tmp_path / "env"
    assert config_dir(tmp_path / "arg") == tmp_path / "arg"
    path = save_state(ClientState(URL, "p", "t"))
    assert path.parent == tmp_path / "env"
    assert load_state(URL) is not None
    assert forget_state(URL) and not forget_state(URL)
    assert load_state(URL) is None


def test_without_the_env_var_it_is_the_user_config_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_CONFIG_DIR, raising=False)
    assert config_dir().name == "crowdtrain"


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe",
        b"[]",
        b'{"url": "http://coordinator.example:8000"}',
        json.dumps(
            {"url": URL, "peer_id": "p", "token": "t", "manifest_hash": "xyz", "public_key": None}
        ).encode(),
        json.dumps(
            {"url": URL, "peer_id": None, "token": "t", "manifest_hash": None, "public_key": None}
        ).encode(),
        json.dumps(
            {
                "url": "http://x",
                "peer_id": "p",
                "token": "t",
                "manifest_hash": None,
                "public_key": None,
            }
        ).encode(),
        b" " * (70 << 10),
    ],
)
def test_a_corrupt_file_names_itself_and_says_to_delete_it(tmp_path: Path, content: bytes) -> None:
    path = state_path(URL, tmp_path)
    path.write_bytes(content)
    with pytest.raises(ClientError) as info:
        load_state(URL, tmp_path)
    assert str(path) in str(info.value)
    assert "delete that file" in str(info.value)


def test_file_names_differ_per_coordinator_and_hide_the_url(tmp_path: Path) -> None:
    a, b = state_path("http://a:1", tmp_path), state_path("http://b:1", tmp_path)
    assert a != b and a.parent == b.parent == tmp_path
    assert "a:1" not in a.name and a.name.endswith(".json")


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("HTTP://Example.COM:80/", "http://example.com"),
        ("https://example.com:443/run/", "https://example.com/run"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("https://[::1]:8443/", "https://[::1]:8443"),
        ("  http://h:9/a  ", "http://h:9/a"),
    ],
)
def test_urls_are_normalised(url: str, normal: str) -> None:
    assert normalize_url(url) == normal


@pytest.mark.parametrize(
    "url", ["ftp://h", "h:8000", "http://", "http://u:p@h", "http://h/?q=1", "http://h/#f"]
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ClientError, match="URL"):
        normalize_url(url)


def test_saving_twice_replaces_the_file(tmp_path: Path) -> None:
    save_state(ClientState(URL, "p", "t"), tmp_path)
    pinned = ClientState(URL, "p", "t", HASH, KEY)
    save_state(pinned, tmp_path)
    assert load_state(URL, tmp_path) == pinned
    assert len(list(tmp_path.iterdir())) == 1


def test_the_registration_key_is_kept_until_forgotten(tmp_path: Path) -> None:
    url = "http://127.0.0.1:8000"
    key = registration_key(url, tmp_path)
    assert len(key) >= 32 and registration_key(url, tmp_path) == key  # the same on a retry
    path = state_path(url, tmp_path).with_suffix(".key")
    assert path.read_text() == key and (path.stat().st_mode & 0o777) == 0o600
    assert registration_key("http://127.0.0.1:9000", tmp_path) != key  # one per coordinator
    forget_key(url, tmp_path)
    assert not path.exists() and registration_key(url, tmp_path) != key
    path.write_text("not a key!")  # a damaged file is replaced, not sent
    assert registration_key(url, tmp_path) != "not a key!"
