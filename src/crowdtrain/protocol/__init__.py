"""The sans-IO round protocol: events in, decisions out (see core.py)."""

from crowdtrain.protocol.core import Clock, RoundProtocol
from crowdtrain.protocol.events import (
    Accepted,
    ContributionSubmitted,
    Decision,
    Event,
    PeerJoined,
    PeerLeft,
    PeerRecord,
    PeerSeen,
    Rejected,
    RoundClosed,
    RunFinished,
    Tick,
    Unknown,
    Wait,
    WorkOrder,
    WorkRequested,
)

__all__ = [
    "Accepted",
    "Clock",
    "ContributionSubmitted",
    "Decision",
    "Event",
    "PeerJoined",
    "PeerLeft",
    "PeerRecord",
    "PeerSeen",
    "Rejected",
    "RoundClosed",
    "RoundProtocol",
    "RunFinished",
    "Tick",
    "Unknown",
    "Wait",
    "WorkOrder",
    "WorkRequested",
]
