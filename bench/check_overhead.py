"""The spot-check overhead of `defence.check_p_new` values, side by side on one machine.

    .venv/bin/python bench/check_overhead.py [--p-new 0.15 0.37] [--rounds 8 40] [--json OUT]

Runs the robustness benchmark's clean defended swarm (`bench robustness --quick`'s setting: 5
honest volunteers, every one a newcomer at the start) for each number of rounds and each
`check_p_new`, as `crowdtrain simulate` processes, and prints for each the spot-check overhead
(replayed steps / all training steps, as the benchmark counts it), the checks passed and
expired, and the final eval loss. The escape probability of the same values is
bench/escape_probability.py's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from crowdtrain.benchmarks.robustness import QUICK, _run_one, overhead, scenario


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--p-new", type=float, nargs="+", default=[0.15, 0.37])
    ap.add_argument("--rounds", type=int, nargs="+", default=[8, 40])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    data_dir = str(Path("data/stdlib").resolve())
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rounds in args.rounds:
            for p_new in args.p_new:
                s = replace(QUICK, rounds=rounds)
                doc = scenario(s, True, data_dir)
                doc["run"]["defence"]["check_p_new"] = p_new
                result = _run_one(Path(tmp), f"r{rounds}-p{p_new}", doc, None, 0)
                verdicts = [v["outcome"] for v in result["verdicts"]]
                row = {
                    "rounds": rounds,
                    "check_p_new": p_new,
                    "overhead": round(overhead(result), 4),
                    "checks_passed": verdicts.count("check_passed"),
                    "checks_expired": verdicts.count("check_expired"),
                    "checks_failed": verdicts.count("check_failed"),
                    "final_eval_loss": round(result["final_eval_loss"], 4),
                }
                rows.append(row)
                print(
                    f"{rounds:3d} rounds, check_p_new {p_new:.2f}: overhead "
                    f"{row['overhead']:.1%}, checks passed {row['checks_passed']}, expired "
                    f"{row['checks_expired']}, failed {row['checks_failed']}, final eval loss "
                    f"{row['final_eval_loss']:.4f}",
                    flush=True,
                )
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
