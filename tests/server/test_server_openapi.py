"""The OpenAPI document lists what each route really sends (`server.openapi`)."""

from __future__ import annotations

from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from crowdtrain.server.openapi import ROUTE_ERRORS
from crowdtrain.server.routes import ROUTERS


def test_every_documented_route_has_its_error_statuses(client: TestClient) -> None:
    doc = client.get("/v1/openapi.json").json()
    documented = {(method, path) for path, item in doc["paths"].items() for method in item}
    assert documented == set(ROUTE_ERRORS)  # a new route must say what it can send
    for (method, path), statuses in ROUTE_ERRORS.items():
        responses = doc["paths"][path][method]["responses"]
        assert "422" not in responses
        assert {str(s) for s in (*statuses, 408, 413, 500)} <= set(responses)
        for status, body in responses.items():
            if status != "200":
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
