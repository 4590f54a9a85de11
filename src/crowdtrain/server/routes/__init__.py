"""The coordinator's HTTP routes (docs/API.md), one `APIRouter` per area.

- ``volunteers``: what a volunteer calls to take part (register, manifest, work, heartbeat).
- ``uploads``: a volunteer's contributions and spot-check replays, and their shared checks.
- ``blobs``: weights, shards and deltas by content hash, with byte ranges.
- ``admin``: the organizer's controls, behind the admin token.
- ``dashboard``: the dashboard page and its JSON, the run status and Prometheus metrics.

``crowdtrain.server.app.create_app`` assembles them; ``deps`` holds what they share (the
coordinator and authentication, as FastAPI dependencies).
"""

from __future__ import annotations

from fastapi import APIRouter

from crowdtrain.server.routes import admin, blobs, dashboard, uploads, volunteers

#: Every router of the app, in the order they are included; this order keeps the paths of
#: /v1/openapi.json in the order clients have always seen.
ROUTERS: tuple[APIRouter, ...] = (
    volunteers.router,
    dashboard.router,
    admin.router,
    blobs.router,
    uploads.router,
)

__all__ = ["ROUTERS"]
