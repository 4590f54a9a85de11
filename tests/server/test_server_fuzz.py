"""Schemathesis against the live OpenAPI document of an in-process coordinator (issue 18, 6b).

Every operation of /v1/openapi.json gets generated requests (valid and invalid ones:
schemathesis's positive and negative modes), and each generated request is sent three times:
as generated (no valid token: none, or a generated one), with a registered volunteer's token
and with the admin token. Each response must not be a 5xx (`not_a_server_error`), must carry
a status the document lists for that route (`status_code_conformance`) and must have the body
the document gives for that status (`response_schema_conformance`). The run is bounded and
derandomized, so CI sends the same requests every time; bench/fuzz_api.py sends 10,000 or more.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)
from server_helpers import FakeClock, meta, register, work

from crowdtrain.config import RunConfig
from crowdtrain.server.app import create_app
from crowdtrain.server.coordinator import Coordinator
from crowdtrain.server.openapi import ROUTE_ERRORS

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "fuzz-admin-secret"
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
#: Generated requests per operation (each sent three times).
MAX_EXAMPLES = 50


@pytest.fixture
def fuzz_app(config: RunConfig, tmp_path: Path, clock: FakeClock) -> Iterator[FastAPI]:
    coordinator = Coordinator(
        config, tmp_path / "state", clock=clock, eval_batch_count=1, admin_token=ADMIN_TOKEN
    )
    yield create_app(coordinator)
    shutdown_lifespans()  # schemathesis started the app's lifespan (its ticker) on first call


@pytest.fixture
def fuzz_schema(fuzz_app: FastAPI) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_asgi("/v1/openapi.json", fuzz_app)


@pytest.fixture
def identities(fuzz_app: FastAPI) -> list[dict[str, str] | None]:
    """Headers for the three callers: as generated, a volunteer (holding work), the organizer."""
    client = TestClient(fuzz_app)
    volunteer = register(client, "fuzz-volunteer")
    work(client, volunteer)
    return [None, volunteer.auth, {"Authorization": f"Bearer {ADMIN_TOKEN}"}]


def fuzz(
    operation: schemathesis.APIOperation,
    identities: list[dict[str, str] | None],
    **fixed: Any,
) -> None:
    """MAX_EXAMPLES generated requests to OPERATION (with the FIXED parts given), each sent as
    every identity and checked."""
    cases = operation.as_strategy(GenerationMode.POSITIVE, **fixed) | operation.as_strategy(
        GenerationMode.NEGATIVE, **fixed
    )

    @given(case=cases)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def each(case: schemathesis.Case) -> None:
        for headers in identities:
            case.call_and_validate(headers=headers, checks=CHECKS)

    each()


def test_every_route_is_fuzzed(fuzz_schema: schemathesis.BaseSchema) -> None:
    operations = {
        (result.ok().method.lower(), result.ok().path)
        for result in fuzz_schema.get_all_operations()
    }
    assert operations == set(ROUTE_ERRORS)


@pytest.mark.parametrize(
    ("method", "path"),
    sorted(ROUTE_ERRORS),
    ids=[f"{m.upper()} {p}" for m, p in sorted(ROUTE_ERRORS)],
)
def test_generated_requests_get_documented_answers(
    method: str,
    path: str,
    fuzz_schema: schemathesis.BaseSchema,
    identities: list[dict[str, str] | None],
) -> None:
    fuzz(fuzz_schema[path][method.upper()], identities)


def test_generated_ranges_of_a_real_blob(
    fuzz_app: FastAPI, fuzz_schema: schemathesis.BaseSchema, identities: list[dict[str, str] | None]
) -> None:
    """A random sha is never a blob: here the Range header meets the initial weights."""
    sha = fuzz_app.state.coordinator.manifest["manifest"]["initial_weights"]
    fuzz(fuzz_schema["/v1/blobs/{sha}"]["GET"], identities, path_parameters={"sha": sha})


def test_generated_payloads_with_a_valid_meta(
    fuzz_schema: schemathesis.BaseSchema, identities: list[dict[str, str] | None]
) -> None:
    """A random meta header is refused first: here the generated body reaches the decoder."""
    operation = fuzz_schema["/v1/contributions/{round_number}"]["PUT"]
    fuzz(
        operation,
        identities,
        path_parameters={"round_number": 0},
        headers={"X-Crowdtrain-Meta": meta()},
    )
