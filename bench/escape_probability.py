"""How often a cheater escapes every spot-check draw for k rounds, measured on the protocol.

    .venv/bin/python bench/escape_probability.py [TRIALS] [--rounds 10] [--p-new P]

Runs the real round protocol (`crowdtrain.protocol.RoundProtocol`, with a secret drawn per run
as a coordinator draws it) with 5 volunteers on a toy parameter set, TRIALS times, for ROUNDS
rounds each. One volunteer is the cheater: it never passes a check, so its check probability
stays at `defence.check_p_new` (a passed check would halve it). Nobody verifies (the trust
threshold is out of reach), so only the draws are measured: the round in which the protocol
first opens a spot-check of the cheater's contribution. Prints, for each k, the share of
trials with no draw in the first k rounds, next to the rule's (1 − p_new)^k, and JSON last.
"""

from __future__ import annotations

import argparse
import json
import secrets
from typing import Any

import torch

from crowdtrain.config import DefenceConfig, parse_config
from crowdtrain.protocol import ContributionSubmitted, RoundProtocol, WorkOrder, WorkRequested
from crowdtrain.robust import DictSource

SHAPES = {"w": (8, 8), "b": (8,)}
PEERS = ("a", "b", "c", "d", "cheater")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def first_draw(rounds: int, p_new: float, seed: int) -> int | None:
    """The round the cheater's contribution is first drawn for a check, or None."""
    cfg = parse_config(
        {
            "model": {"context": 8},
            "data": {"batch_size": 2, "shards_per_peer": 2},
            "inner": {"steps": 5},
            "rounds": {"total": rounds, "quorum": len(PEERS), "deadline_s": 60.0},
            "broadcast": {"codec": "fp32"},
            "aggregation": {"method": "mean"},
            "defence": {
                "spot_check": "peer",
                "check_p_new": p_new,
                "score_per_round": 0,
                "trust_threshold": 1.0,  # nobody verifies: only the draws are measured
            },
        }
    )
    clock = Clock()
    params = {k: torch.zeros(s) for k, s in SHAPES.items()}
    shards = [f"{i:064x}" for i in range(10)]
    # a run's secret, as a coordinator draws it (`Coordinator._secret`): one per trial
    p = RoundProtocol(cfg, params, shards, clock, secret=secrets.randbits(62))
    gen = torch.Generator().manual_seed(seed)
    for peer in PEERS:
        p.handle(_joined(peer))
    for r in range(rounds):
        for peer in PEERS:
            (o,) = p.handle(WorkRequested(peer))
            assert isinstance(o, WorkOrder), o
        for peer in PEERS:
            delta = {k: torch.randn(s, generator=gen) * 0.01 for k, s in SHAPES.items()}
            p.handle(_submission(p, peer, delta))
        if any(c.order.target == "cheater" for c in p.checks.values()):
            return r
        clock.now += 1.0
    return None


def _joined(peer: str) -> Any:
    from crowdtrain.protocol import PeerJoined

    return PeerJoined(peer, peer)


def _submission(p: RoundProtocol, peer: str, delta: dict[str, torch.Tensor]) -> Any:
    return ContributionSubmitted(
        peer_id=peer,
        round=p.round,
        base_version=p.version,
        delta=DictSource(delta),
        samples=10,
        tokens=80,
        steps=5,
        train_loss=2.0,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trials", type=int, nargs="?", default=2000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--p-new", type=float, default=DefenceConfig().check_p_new)
    args = ap.parse_args()
    draws = [first_draw(args.rounds, args.p_new, seed) for seed in range(args.trials)]
    rows = []
    for k in range(1, args.rounds + 1):
        escaped = sum(1 for d in draws if d is None or d >= k) / args.trials
        rule = (1 - args.p_new) ** k
        rows.append({"rounds": k, "escaped": escaped, "rule": round(rule, 4)})
        print(f"k = {k:2d}: escaped every draw in {escaped:.3f} of trials (rule {rule:.3f})")
    print(json.dumps({"trials": args.trials, "p_new": args.p_new, "rows": rows}))


if __name__ == "__main__":
    main()
