"""The OpenAPI document lists what each route really sends (`server.openapi`)."""

from __future__ import annotations

import re

from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from crowdtrain.server.coordinator import Coordinator
from crowdtrain.server.openapi import ROUTE_BYTES, ROUTE_ERRORS
from crowdtrain.server.routes import ROUTERS
from crowdtrain.server.routes.blobs import RANGE_PATTERN
from crowdtrain.server.routes.uploads import ScoreBody


def test_every_documented_route_has_its_error_statuses(client: TestClient) -> None:
    doc = client.get("/v1/openapi.json").json()
    documented = {(method, path) for path, item in doc["paths"].items() for method in item}
    assert documented == set(ROUTE_ERRORS)  # a new route must say what it can send
    for (method, path), statuses in ROUTE_ERRORS.items():
        responses = doc["paths"][path][method]["responses"]
        assert "422" not in responses
        assert {str(s) for s in (*statuses, 408, 413, 500)} <= set(responses)
        for status, body in responses.items():
            if int(status) not in (200, *ROUTE_BYTES.get((method, path), ())):  # not a success
                ref = body["content"]["application/json"]["schema"]["$ref"]
                assert ref == "#/components/schemas/Error"
        names = {p["name"].lower() for p in doc["paths"][path][method].get("parameters", [])}
        assert "content-length" not in names
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_the_routes_in_the_schema_are_the_routes_served() -> None:
    served = {
        (method.lower(), route.path)
        for router in ROUTERS
        for route in router.routes
        if isinstance(route, APIRoute) and route.include_in_schema
        for method in route.methods
    }
    assert served == set(ROUTE_ERRORS)


def test_an_undocumented_status_is_not_sent_for_a_bad_request(client: TestClient) -> None:
    r = client.post("/v1/register", json={"name": 5})
    assert r.status_code == 400  # validation errors are 400, as documented; never 422


def test_a_byte_range_answer_is_documented(client: TestClient, coordinator: Coordinator) -> None:
    # Found by tests/server/test_server_fuzz.py: a blob's 206 was sent but not documented, and
    # its 200 was documented as JSON.
    doc = client.get("/v1/openapi.json").json()["paths"]["/v1/blobs/{sha}"]["get"]
    sha = coordinator.manifest["manifest"]["initial_weights"]
    for headers in ({}, {"Range": "bytes=0-9"}, {"Range": "bytes=-7"}):
        r = client.get(f"/v1/blobs/{sha}", headers=headers)
        assert r.status_code in (200, 206)
        documented = doc["responses"][str(r.status_code)]["content"]
        assert set(documented) == {r.headers["content-type"]} == {"application/octet-stream"}
    # the Range header's documented form is the one served
    (range_param,) = (p for p in doc["parameters"] if p["name"] == "range")
    assert range_param["schema"]["pattern"] == RANGE_PATTERN
    assert re.match(RANGE_PATTERN, "bytes=0-9") and re.match(RANGE_PATTERN, "bytes=-7")
    assert client.get(f"/v1/blobs/{sha}", headers={"Range": "items=0-9"}).status_code == 400


def test_streamed_request_bodies_are_documented(client: TestClient) -> None:
    # FastAPI cannot see a body the handler streams: without these, the document said the
    # upload routes take no body at all.
    paths = client.get("/v1/openapi.json").json()["paths"]
    for path in ("/v1/contributions/{round_number}", "/v1/verifications/{check_id}"):
        body = paths[path]["put"]["requestBody"]
        assert body["required"] is True
        assert set(body["content"]) == {"application/octet-stream"}
    score = paths["/v1/scores/{check_id}"]["put"]["requestBody"]["content"]["application/json"]
    assert set(score["schema"]["properties"]) == set(ScoreBody.model_fields)
