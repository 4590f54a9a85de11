"""The organizer's view of a run: the dashboard page (/), its JSON, the run status, metrics.

``/`` serves ``static/index.html`` (its scripts and styles come from the ``/static`` mount
that ``create_app`` adds). With ``/v1/dashboard?since=V`` the document's ``rounds`` hold only
the rounds after version V, so later polls stay small. ``/metrics`` is the Prometheus text
exposition. The page and the metrics are left out of the OpenAPI schema.
"""

from __future__ import annotations

from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, Response

from crowdtrain.server.routes.deps import MAX_ROUND, CoordinatorDep

#: The dashboard's page, scripts and styles.
STATIC = FilePath(__file__).parent.parent / "static"

router = APIRouter()

# Route functions carry no docstrings: FastAPI would publish them as OpenAPI descriptions.


@router.get("/v1/status")
def status(coordinator: CoordinatorDep) -> dict[str, Any]:
    return coordinator.status()


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/v1/dashboard")
def dashboard(
    coordinator: CoordinatorDep,
    since: Annotated[int | None, Query(ge=0, le=MAX_ROUND)] = None,
) -> dict[str, Any]:
    return coordinator.dashboard(since)


@router.get("/metrics", include_in_schema=False)
def metrics(coordinator: CoordinatorDep) -> Response:
    body, content_type = coordinator.metrics.render()
    return Response(body, media_type=content_type)
