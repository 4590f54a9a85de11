"""Reputation of a volunteer: probation, spot-check rate, trust and bans.

Volunteer computing has always had to live with wrong results from untrusted hosts. BOINC
(Anderson 2004, "BOINC: A System for Public-Resource Computing and Storage") grants credit only
to validated results and replicates work adaptively: a new host's results are checked often, a
host with a run of valid results rarely (Kondo, Anderson and McLeod 2007, "Performance evaluation
of scheduling policies for volunteer computing"). This module keeps that bookkeeping for one
peer as a small JSON-friendly dataclass and the functions the round protocol calls on it:

- ``score`` in [0, 1] starts at ``reputation_initial``; an accepted round moves it a fraction
  ``reputation_gain`` towards 1, a failure multiplies it by ``reputation_slash``.
- Newcomers are on **probation** for ``probation_rounds`` accepted rounds: their contributions
  weigh ``probation_weight`` of their samples, which bounds what a fresh sybil can do.
- Every failure adds strikes (1 for a screening stage, ``check_strikes`` for a failed
  recomputation) and every accepted round forgives ``strike_forgive`` of them, so statistical
  stages' rare false alarms fade while repeated failures add up: ``ban_strikes`` strikes ban
  the peer, with the last reason recorded.
- A peer is **trusted** (may verify others' work) when it is past probation, not banned, has no
  failed check and its score is at least ``trust_threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass

from crowdtrain.config import DefenceConfig
from crowdtrain.robust import spotcheck

__all__ = [
    "Standing",
    "check_probability",
    "is_trusted",
    "new_standing",
    "record_check",
    "record_failure",
    "record_success",
    "weight_factor",
]


@dataclass
class Standing:
    """What the coordinator holds against (or for) one peer."""

    score: float
    strikes: float = 0.0
    rounds_ok: int = 0
    failures: int = 0
    passed_checks: int = 0
    failed_checks: int = 0
    verified: int = 0  # spot-checks this peer carried out for others
    banned: bool = False
    ban_reason: str = ""


def new_standing(cfg: DefenceConfig) -> Standing:
    """A newcomer's standing."""
    return Standing(score=cfg.reputation_initial)


def seed_standing(cfg: DefenceConfig) -> Standing:
    """A seed volunteer's standing (one the organizer vouches for): past probation and trusted
    from the start; it loses that as any peer does, by strikes and failed checks."""
    return Standing(
        score=max(cfg.reputation_initial, cfg.trust_threshold), rounds_ok=cfg.probation_rounds
    )


def record_success(st: Standing, cfg: DefenceConfig) -> None:
    """A contribution passed every screening stage and entered the aggregate."""
    st.rounds_ok += 1
    st.score += cfg.reputation_gain * (1.0 - st.score)
    st.strikes = max(0.0, st.strikes - cfg.strike_forgive)  # a rare false alarm fades


def record_failure(st: Standing, cfg: DefenceConfig, severity: float, reason: str) -> bool:
    """A stage refused a contribution; return True when this failure bans the peer."""
    st.failures += 1
    st.strikes += severity
    st.score *= cfg.reputation_slash
    if st.banned or st.strikes < cfg.ban_strikes:
        return False
    st.banned = True
    count = "1 failure" if st.failures == 1 else f"{st.failures} failures"
    st.ban_reason = f"banned after {count}; the last: {reason}"
    return True


def record_check(st: Standing, cfg: DefenceConfig, passed: bool, reason: str) -> bool:
    """A recomputation spot-check of this peer's work ended; return True when it bans the peer."""
    if passed:
        st.passed_checks += 1
        return False
    st.failed_checks += 1
    st.passed_checks = 0
    return record_failure(st, cfg, cfg.check_strikes, reason)


def on_probation(st: Standing, cfg: DefenceConfig) -> bool:
    """Whether the peer is still on probation (fewer accepted rounds than `probation_rounds`)."""
    return st.rounds_ok < cfg.probation_rounds


def weight_factor(st: Standing, cfg: DefenceConfig) -> float:
    """The factor on a contribution's sample weight: reduced while the peer is on probation."""
    return cfg.probation_weight if on_probation(st, cfg) else 1.0


def check_probability(st: Standing, cfg: DefenceConfig) -> float:
    """BOINC-style adaptive replication: p_new for a newcomer, halved per passed check."""
    if cfg.spot_check == "off":
        return 0.0
    return spotcheck.check_probability(
        st.passed_checks, p_new=cfg.check_p_new, p_min=cfg.check_p_min
    )


def is_trusted(st: Standing, cfg: DefenceConfig) -> bool:
    """Whether the peer may verify other peers' work."""
    return (
        not st.banned
        and st.failed_checks == 0
        and st.rounds_ok >= cfg.probation_rounds
        and st.score >= cfg.trust_threshold
    )
