"""Chosen cases of the robustness benchmark, on `bench robustness --quick`'s setting.

    .venv/bin/python bench/robustness_cases.py OUT.json CASE [CASE ...] [--rounds R] [--jobs J]

A CASE is `ATTACK@K` (K of the setting's 5 volunteers attack: 1 is 20%, 2 is 40%) or
`ATTACK+K` (K fresh identities join the 5 honest volunteers: a sybil flood), optionally with
`/seeds=N` (the first N honest volunteers are seed volunteers). Each runs defended and with a
plain mean, as `crowdtrain simulate` processes, with the benchmark's own functions. The
references (the clean run, the honest peers alone) are run too, at the same number of rounds.
Prints a line per run and per case; JSON to OUT.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from crowdtrain.benchmarks.robustness import QUICK, _run_one, scenario, summarize

CASE = re.compile(r"^(?P<attack>[a-z0-9_.]+)(?P<kind>[@+])(?P<k>\d+)(/seeds=(?P<seeds>\d+))?$")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--rounds", type=int, default=QUICK.rounds)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    s = replace(QUICK, rounds=args.rounds)
    data_dir = str(Path("data/stdlib").resolve())
    runs: dict[str, tuple[dict[str, Any], str | None, int]] = {
        "clean": (scenario(s, True, data_dir), None, 0)
    }
    parsed = []
    for text in args.cases:
        m = CASE.match(text)
        if m is None:
            ap.error(f"not a case: {text}")
        attack, k, seeds = m["attack"], int(m["k"]), int(m["seeds"] or 0)
        sybils = m["kind"] == "+"
        peers = s.peers + k if sybils else s.peers
        if not sybils:
            runs[f"honest-only-{k}"] = (scenario(s, True, data_dir, s.peers - k), None, 0)
        for tag, on in (("defended", True), ("plain", False)):
            doc = scenario(s, on, data_dir, peers=peers)
            if seeds and on:
                doc["swarm"]["seeds"] = seeds
            runs[f"{text}-{tag}"] = (doc, attack, k)
        parsed.append((text, attack, k, sybils, peers))
    with tempfile.TemporaryDirectory() as tmp:

        def go(item: tuple[str, tuple[dict[str, Any], str | None, int]]) -> tuple[str, Any]:
            tag, (doc, attack, k) = item
            result = _run_one(Path(tmp), re.sub(r"[^a-z0-9_.-]", "_", tag), doc, attack, k)
            print(f"{tag}: eval loss {result['final_eval_loss']:.4f}", flush=True)
            return tag, result

        with ThreadPoolExecutor(args.jobs) as pool:
            results = dict(pool.map(go, runs.items()))
    clean = results["clean"]["final_eval_loss"]
    rows = {}
    for text, attack, k, sybils, peers in parsed:
        honest = results["clean"] if sybils else results[f"honest-only-{k}"]
        row = summarize(
            attack, k, peers, results[f"{text}-defended"], results[f"{text}-plain"], honest
        )
        rows[text] = row
        print(
            f"{text}: defended {row['defended_eval_loss']:.4f} "
            f"({row['defended_eval_loss'] / clean - 1:+.1%} of clean, "
            f"{row['defended_eval_loss'] / row['honest_only_eval_loss'] - 1:+.1%} of the honest "
            f"alone), plain {row['undefended_eval_loss']:.4g}, banned "
            f"{row['attackers_banned']}/{row['attackers_total']}, honest flagged "
            f"{row['honest_flagged']}, honest banned {row['honest_banned']}"
        )
    doc = {"rounds": s.rounds, "clean_eval_loss": clean, "rows": rows}
    args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
