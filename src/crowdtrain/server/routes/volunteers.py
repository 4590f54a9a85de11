"""What a volunteer calls to take part: register, manifest, work and heartbeat.

Handlers parse and bound what arrives, then call the coordinator, which hands every round
decision to the sans-IO protocol core. Work and heartbeat need the peer's bearer token (the
``Peer`` dependency); the uploads a volunteer makes are in ``routes.uploads``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from crowdtrain.server.routes.deps import CoordinatorDep, Peer

router = APIRouter()


class DeviceInfo(BaseModel):
    """What a volunteer says about its machine (informational)."""

    model_config = ConfigDict(extra="ignore")

    kind: str = Field("cpu", max_length=16)
    threads: int = Field(1, ge=1, le=4096)
    name: str = Field("", max_length=200)


class ProofOfWork(BaseModel):
    """A solved challenge from GET /v1/register/challenge."""

    model_config = ConfigDict(extra="forbid")

    challenge: str = Field(min_length=1, max_length=200)
    nonce: str = Field(min_length=1, max_length=20, pattern=r"^[0-9]+$")


class RegisterBody(BaseModel):
    """Body of POST /v1/register."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    invite: str | None = Field(None, max_length=256)
    device: DeviceInfo = DeviceInfo()
    pow: ProofOfWork | None = None
    identity: str | None = Field(None, min_length=1, max_length=8192)
    # A secret the client chose and keeps until it has saved the answer: registering again with
    # the same key (after an answer lost to a crash or a dropped connection) returns the same
    # peer with a new token instead of name_taken.
    key: str | None = Field(None, min_length=32, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")


# Route functions carry no docstrings: FastAPI would publish them as OpenAPI descriptions.


@router.get("/v1/register/challenge")
def register_challenge(coordinator: CoordinatorDep) -> dict[str, Any]:
    return coordinator.register_challenge()


@router.post("/v1/register")
def register(body: RegisterBody, request: Request, coordinator: CoordinatorDep) -> dict[str, str]:
    return coordinator.register(
        body.name,
        body.device.model_dump(),
        host=request.client.host if request.client else None,
        invite=body.invite,
        pow_challenge=body.pow.challenge if body.pow else None,
        pow_nonce=body.pow.nonce if body.pow else None,
        identity=body.identity,
        key=body.key,
    )


@router.get("/v1/manifest")
def manifest(coordinator: CoordinatorDep) -> dict[str, Any]:
    return coordinator.manifest


@router.post("/v1/work")
def work(peer_id: Peer, coordinator: CoordinatorDep) -> dict[str, Any]:
    return coordinator.work(peer_id)


@router.post("/v1/heartbeat")
def heartbeat(peer_id: Peer, coordinator: CoordinatorDep) -> dict[str, Any]:
    return coordinator.heartbeat(peer_id)
