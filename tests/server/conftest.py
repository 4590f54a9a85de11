"""Fixtures for the coordinator HTTP tests: a tiny run, a fake clock, and an in-process client.

Everything runs in-process through `fastapi.testclient.TestClient` (no sockets). The clock is a
`FakeClock` the test moves by hand, so deadlines never depend on wall time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from server_helpers import FakeClock, server_config, write_corpus

from crowdtrain.config import RunConfig
from crowdtrain.server.app import create_app
from crowdtrain.server.coordinator import Coordinator


@pytest.fixture(scope="session")
def server_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("server-corpus") / "corpus.py")


@pytest.fixture(scope="session")
def server_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Packed once per session; `ensure_packed` reuses it when the parameters match."""
    return tmp_path_factory.mktemp("server-data") / "data"


@pytest.fixture
def config(server_corpus: Path, server_data_dir: Path) -> RunConfig:
    return server_config(server_corpus, server_data_dir)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def coordinator(config: RunConfig, tmp_path: Path, clock: FakeClock) -> Coordinator:
    return Coordinator(config, tmp_path / "state", clock=clock, eval_batch_count=1)


@pytest.fixture
def client(coordinator: Coordinator) -> Iterator[TestClient]:
    with TestClient(create_app(coordinator), raise_server_exceptions=False) as c:
        yield c
