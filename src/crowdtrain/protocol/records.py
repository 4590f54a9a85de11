"""What the round machine remembers between events: its rounds, their accepted contributions,
and the spot-checks still waiting for a replay.

Plain dataclasses shared by the round machine (`core.py`), the verification pipeline
(`verification.py`) and the snapshot codec (`snapshot.py`), which turns them into JSON and back.
A round follows DiLoCo (Douillard et al. 2023, arXiv:2311.08105): every work order of round r
starts from the same base version θ_r, and a submission is one peer's pseudo-gradient for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from crowdtrain.protocol.events import ScoreOrder, VerifyOrder, WorkOrder
from crowdtrain.robust import DeltaSource


@dataclass
class Submission:
    """One accepted contribution, kept until its round closes (and one round longer, so that
    the next round's overlapped work can name it as the prior work to replay)."""

    peer_id: str
    delta: DeltaSource
    weight: float
    samples: int
    train_loss: float
    payload_bytes: int
    receipt: str
    ref: str = ""
    steps: int = 0
    overlap_steps: int = 0
    round: int = -1  # the round the work was ordered for (a late one belongs to the last)
    overlap_round: int = -1  # the round whose order the overlapped steps continued
    overlap_first_batch: int = 0  # ... from this batch of that order's stream

    @property
    def key(self) -> str:
        """Its key, "round/peer": a peer may have a late and an on-time contribution in one
        close."""
        return f"{self.round}/{self.peer_id}"


@dataclass
class Round:
    """One round: its base version, clock, the orders handed out and what came back.

    `late` holds contributions to the round before this one that arrived after it closed
    (accepted with `rounds.late = "accept"`); they are aggregated with this round's. The
    round they were ordered for lists them in its own `late` too."""

    number: int
    base_version: int
    opened_at: float
    deadline: float
    orders: dict[str, WorkOrder] = field(default_factory=dict)
    submissions: dict[str, Submission] = field(default_factory=dict)
    late: dict[str, Submission] = field(default_factory=dict)

    def waiting_on(self) -> set[str]:
        """Peers with an order of this round and no contribution to it yet."""
        return set(self.orders) - set(self.submissions)


@dataclass
class Check:
    """A pending check of one accepted contribution: a recomputation spot-check (its order a
    `VerifyOrder`) or a usefulness score on a volunteer (a `ScoreOrder`).

    `assigned` holds the verifiers replaying it now (peer id -> when it was handed out);
    `reports` the verifiers that answered, each with "" (its replay matched the contribution)
    or why it did not, and for a score the four losses it reported (`scores`). The check is
    decided when enough reports agree (`Verification.judge`)."""

    order: VerifyOrder | ScoreOrder
    delta: DeltaSource
    ref: str
    opened_round: int
    samples: int = 0
    assigned: dict[str, float] = field(default_factory=dict)
    reports: dict[str, str] = field(default_factory=dict)
    scores: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # the verifiers agreed it failed, and the coordinator's own replay now decides
    confirming: bool = False

    def tally(self) -> tuple[int, int]:
        """(matching replays, mismatching replays) reported so far."""
        passed = sum(1 for reason in self.reports.values() if not reason)
        return passed, len(self.reports) - passed
