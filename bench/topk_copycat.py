"""How a copycat looks under the top-k codec with error feedback (docs/SECURITY.md).

Runs the quick robustness setting with the top-k + 2-bit codec and SparseLoCo's outer step,
one copycat among 5 volunteers, and prints for every contribution of every round the density
of its fingerprint's support and the largest Jaccard overlap of that support with the other
contributions of the round and with accepted ones of earlier rounds, then who was banned.

    python bench/topk_copycat.py > bench/results/topk-copycat.log
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import crowdtrain.protocol.screening as screening
from crowdtrain.benchmarks.robustness import QUICK, scenario
from crowdtrain.config import parse_config
from crowdtrain.sim.swarm import run_swarm

ROUNDS = 6


def main() -> None:
    run = scenario(QUICK, True, str(Path("data/stdlib").resolve()))["run"]
    run["codec"] = {"name": "topk2bit"}
    run["outer"] = {"optimizer": "error_feedback", "lr": 1.0}
    run["rounds"]["total"] = ROUNDS
    config = parse_config(run)
    detect = screening.detect_copies  # type: ignore[attr-defined]

    def measure(current: list[torch.Tensor], earlier: list[torch.Tensor], **kw: Any) -> Any:
        now = torch.stack([c != 0 for c in current]).float()
        old = torch.stack([e != 0 for e in earlier]).float() if earlier else now[:0]
        both = torch.cat([now, old])
        inter = now @ both.T
        union = now.sum(1, keepdim=True) + both.sum(1).unsqueeze(0) - inter
        jaccard = inter / union.clamp(min=1)
        count = now.shape[0]
        for i in range(count):
            row = jaccard[i].clone()
            row[i] = 0.0
            past = float(row[count:].max()) if row.numel() > count else 0.0
            print(
                f"contribution {i}: density {float(now[i].mean()):.4f}, max Jaccard in the round "
                f"{float(row[:count].max()):.3f}, with earlier rounds {past:.3f}"
            )
        return detect(current, earlier, **kw)

    screening.detect_copies = measure  # type: ignore[attr-defined,assignment]
    torch.set_num_threads(2)
    result = run_swarm(config, QUICK.peers, attack="copycat", attackers=1)
    print(f"final eval loss {result.final_eval_loss:.4f}; attacker {result.attackers}")
    print(f"flagged: {result.flagged}; banned: {result.banned}")


if __name__ == "__main__":
    main()
