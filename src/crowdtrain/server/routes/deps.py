"""FastAPI dependencies shared by the routes: the coordinator and who is calling.

The coordinator lives on ``app.state.coordinator`` (set by ``create_app``); routes reach it
through ``CoordinatorDep`` rather than closures. ``Peer`` authenticates a volunteer by its
bearer token; ``require_admin`` checks the organizer's admin token. Both raise ``Problem``,
which the app turns into ``{"error": code, "detail": ...}`` with the right status.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, Request

from crowdtrain.server.coordinator import Coordinator, Problem

# Round numbers are stored as SQLite INTEGERs (64-bit signed); larger ones are malformed.
MAX_ROUND = 2**63 - 1


async def get_coordinator(request: Request) -> Coordinator:
    """FastAPI dependency: the coordinator this app serves."""
    coordinator: Coordinator = request.app.state.coordinator
    return coordinator


CoordinatorDep = Annotated[Coordinator, Depends(get_coordinator)]


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def authenticate_peer(
    coordinator: CoordinatorDep, authorization: Annotated[str | None, Header()] = None
) -> str:
    """FastAPI dependency: the peer id behind the request's bearer token (else 401)."""
    return coordinator.authenticate(bearer(authorization))


Peer = Annotated[str, Depends(authenticate_peer)]


def require_admin(
    coordinator: CoordinatorDep, authorization: Annotated[str | None, Header()] = None
) -> None:
    """FastAPI dependency: the request carries the coordinator's admin token (else 401/403)."""
    if coordinator.admin_token is None:
        raise Problem(403, "no_admin", "this coordinator was started without an admin token")
    token = bearer(authorization) or ""
    if not secrets.compare_digest(token.encode(), coordinator.admin_token.encode()):
        raise Problem(401, "bad_admin_token", "this call needs the run's admin token")
