"""The robustness benchmark's new cases alone: adaptive attackers and sybil floods.

    .venv/bin/python bench/robustness_adaptive.py OUT.json [JOBS]

Runs, on `bench robustness --quick`'s setting and with its functions: min-max, min-sum and
−mean at the norm limit (`edge`) at 20% and 40% (one identity each), defended and plain; sybil
floods of `free_rider` and `edge` at 1×, 2× and 10× the honest peers, defended and plain; and
the 10× floods again with two of the honest peers joining as seed volunteers (`swarm.seeds`).
The clean and honest-only references are those of the full quick run
(`bench/results/robustness-quick.json`: the runs are deterministic, and its clean loss was
reproduced at this commit). Prints one line per run and the summary rows; JSON to OUT.
"""

from __future__ import annotations

import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from crowdtrain.benchmarks.robustness import (
    QUICK,
    SYBIL_ATTACKS,
    SYBIL_MULTIPLES,
    _run_one,
    scenario,
    summarize,
)

ADAPTIVE = ("minmax", "minsum", "edge")


def main() -> None:
    out, jobs = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2
    s = QUICK
    ref = json.loads(Path("bench/results/robustness-quick.json").read_text())
    data_dir = str(Path("data/stdlib").resolve())
    runs: list[tuple[str, dict[str, Any], str, int]] = []
    for attack in ADAPTIVE:
        for k in (1, 2):
            for tag, on in (("defended", True), ("plain", False)):
                runs.append((f"{attack}-{k}-{tag}", scenario(s, on, data_dir), attack, k))
    for attack in SYBIL_ATTACKS:
        for m in SYBIL_MULTIPLES:
            k = m * s.peers
            for tag, on in (("defended", True), ("plain", False)):
                doc = scenario(s, on, data_dir, peers=s.peers + k)
                runs.append((f"sybil-{attack}-{k}-{tag}", doc, attack, k))
            if m == max(SYBIL_MULTIPLES):
                doc = scenario(s, True, data_dir, peers=s.peers + k)
                doc["swarm"]["seeds"] = 2
                runs.append((f"sybil-{attack}-{k}-seeds", doc, attack, k))
    with tempfile.TemporaryDirectory() as tmp:

        def go(spec: tuple[str, dict[str, Any], str, int]) -> tuple[str, dict[str, Any]]:
            tag, doc, attack, k = spec
            result = _run_one(Path(tmp), tag, doc, attack, k)
            print(f"{tag}: eval loss {result['final_eval_loss']:.4f}", flush=True)
            return tag, result

        with ThreadPoolExecutor(jobs) as pool:
            results = dict(pool.map(go, runs))
    clean = {"final_eval_loss": ref["clean_eval_loss"]}
    only = {k: {"final_eval_loss": v} for k, v in ref["honest_only_eval_loss"].items()}
    rows: dict[str, Any] = {}
    for attack in ADAPTIVE:
        for k in (1, 2):
            rows[f"{attack}@{k / s.peers:.0%}"] = summarize(
                attack,
                k,
                s.peers,
                results[f"{attack}-{k}-defended"],
                results[f"{attack}-{k}-plain"],
                only[str(k)],
            )
    for attack in SYBIL_ATTACKS:
        for m in SYBIL_MULTIPLES:
            k = m * s.peers
            d, p = results[f"sybil-{attack}-{k}-defended"], results[f"sybil-{attack}-{k}-plain"]
            rows[f"{attack} sybils x{m}"] = summarize(attack, k, s.peers + k, d, p, clean)
            if f"sybil-{attack}-{k}-seeds" in results:
                seeded = results[f"sybil-{attack}-{k}-seeds"]
                rows[f"{attack} sybils x{m}, 2 seeds"] = summarize(
                    attack, k, s.peers + k, seeded, p, clean
                )
    for name, row in rows.items():
        print(
            f"{name}: defended {row['defended_eval_loss']:.4f} "
            f"({row['defended_eval_loss'] / ref['clean_eval_loss'] - 1:+.1%} of clean), "
            f"plain {row['undefended_eval_loss']:.4g}, banned {row['attackers_banned']}/"
            f"{row['attackers_total']}, honest flagged {row['honest_flagged']}, "
            f"honest banned {row['honest_banned']}"
        )
    out.write_text(json.dumps({"clean_eval_loss": ref["clean_eval_loss"], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
