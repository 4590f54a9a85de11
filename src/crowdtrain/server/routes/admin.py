"""The organizer's controls under /v1/admin (docs/API.md): pause, resume, ban, unban, deadline.

Every route here needs the run's admin token: the router carries ``require_admin`` as a
dependency, so no handler checks it itself. Each control is an admin event handed to the
protocol core through ``Coordinator.admin``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field

from crowdtrain.protocol import DeadlineChanged, PeerBanned, PeerUnbanned, RunPaused, RunResumed
from crowdtrain.server.routes.deps import CoordinatorDep, require_admin

router = APIRouter(prefix="/v1/admin", dependencies=[Depends(require_admin)])


class BanBody(BaseModel):
    """Body of POST /v1/admin/peers/{peer_id}/ban."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field("banned by the organizer", min_length=1, max_length=500)


class DeadlineBody(BaseModel):
    """Body of POST /v1/admin/deadline."""

    model_config = ConfigDict(extra="forbid")

    deadline_in: float = Field(gt=0, le=7 * 86400, allow_inf_nan=False)
    round_seconds: float | None = Field(None, gt=0, le=7 * 86400, allow_inf_nan=False)


# Route functions carry no docstrings: FastAPI would publish them as OpenAPI descriptions.


@router.get("/check")
def admin_check() -> dict[str, bool]:
    return {"ok": True}


@router.post("/pause")
def admin_pause(coordinator: CoordinatorDep) -> dict[str, bool]:
    coordinator.admin(RunPaused())
    return {"paused": True}


@router.post("/resume")
def admin_resume(coordinator: CoordinatorDep) -> dict[str, bool]:
    coordinator.admin(RunResumed())
    return {"paused": False}


@router.post("/peers/{peer_id}/ban")
def admin_ban(
    peer_id: Annotated[str, Path(max_length=64)],
    coordinator: CoordinatorDep,
    body: BanBody | None = None,
) -> dict[str, Any]:
    coordinator.admin(PeerBanned(peer_id, (body or BanBody()).reason))
    return {"peer_id": peer_id, "banned": True}


@router.post("/peers/{peer_id}/unban")
def admin_unban(
    peer_id: Annotated[str, Path(max_length=64)], coordinator: CoordinatorDep
) -> dict[str, Any]:
    coordinator.admin(PeerUnbanned(peer_id))
    return {"peer_id": peer_id, "banned": False}


@router.post("/deadline")
def admin_deadline(body: DeadlineBody, coordinator: CoordinatorDep) -> dict[str, float]:
    coordinator.admin(DeadlineChanged(body.deadline_in, body.round_seconds))
    return {"deadline": coordinator.protocol.deadline}
