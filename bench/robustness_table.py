"""Print the markdown table of docs/SECURITY.md from `crowdtrain bench robustness --json` output.

python bench/robustness_table.py bench/results/robustness-quick.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _relative(ratio: float) -> str:
    """+1.2% for small differences, ×140 for blow-ups."""
    return f"×{ratio:.3g}" if ratio >= 2 else f"{ratio - 1:+.1%}"


def main(path: str) -> None:
    doc = json.loads(Path(path).read_text())
    clean = doc["clean_eval_loss"]
    print(
        f"Clean run (no attacker, defences on): eval loss {clean:.4f}; with a plain mean "
        f"{doc['clean_plain_eval_loss']:.4f}; initial {doc['initial_eval_loss']:.4f}."
    )
    alone = ", ".join(
        f"{k} attacker(s) absent: {v:.4f}" for k, v in doc["honest_only_eval_loss"].items()
    )
    print(f"Honest peers alone (the attackers' slots empty): {alone}.")
    seeds = doc["clean_seed_eval_loss"]
    losses = list(seeds.values())
    print(
        "Clean run with other data-order seeds: "
        + ", ".join(f"seed {k}: {v:.4f}" for k, v in seeds.items())
        + f" (spread {max(losses) / min(losses) - 1:.1%} of the lowest)."
    )
    print()
    print(
        "| attack | attackers | defended | vs clean | vs honest alone | plain mean "
        "| plain vs clean plain | banned | caught in its round | honest flagged | honest banned |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in doc["attacks"].values():
        defended = row["defended_eval_loss"]
        plain = row["undefended_eval_loss"]
        if row.get("undefended_diverged"):  # the plain run's training hit NaN and stopped
            plain_cells = f"diverged ({plain:.4g}) | diverged"
        else:
            plain_cells = f"{plain:.4g} | {_relative(plain / doc['clean_plain_eval_loss'])}"
        sybils = row.get("sybils_per_honest")
        who = f"{row['fraction']:.0%}" if sybils is None else f"{sybils}× sybils"
        print(
            f"| {row['attack']} | {who} | {defended:.4f}"
            f"{' (diverged)' if row.get('defended_diverged') else ''} "
            f"| {defended / clean - 1:+.1%} | {defended / row['honest_only_eval_loss'] - 1:+.1%} "
            f"| {plain_cells} "
            f"| {row['attackers_banned']}/{row['attackers_total']} "
            f"| {row['caught_in_round']:.0%} | {row['honest_flagged']} | {row['honest_banned']} |"
        )
    print()
    print(
        f"Spot-check overhead (replayed steps / all training steps): "
        f"{doc['spot_check_overhead']:.1%} in the clean run "
        f"({doc['setting']['rounds']} rounds, every peer a newcomer), "
        f"{doc['spot_check_overhead_long']:.1%} in a clean run of {doc['long_rounds']} rounds; "
        f"median over the defended attack runs {doc['spot_check_overhead_median_attacked']:.1%}. "
        f"Usefulness evaluations in the clean run: {doc['usefulness_scored_clean']}."
    )


if __name__ == "__main__":
    main(sys.argv[1])
