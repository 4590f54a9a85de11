"""Robustness benchmark: every attack of crowdtrain.adversary, with the defences on and off.

For each attack at 20% attackers (ALIE and IPM also at 40%), the in-process swarm (the real
protocol core, trainer and codec) trains the same model twice: with the verification pipeline
of docs/SECURITY.md on (screening stages, centered clipping with bucketing, scoring, spot-checks,
reputation), and with a plain sample-weighted mean and no screening (the format check stays,
because the codec is the wire format). Both are compared with the clean run, which has no
attacker. Attacks follow the papers cited in crowdtrain.adversary (ALIE: Baruch et al. 2019;
IPM: Xie et al. 2019); centered clipping and bucketing follow Karimireddy, He and Jaggi (ICML
2021, ICLR 2022).

Runs are separate `crowdtrain simulate` processes (one torch thread each, `jobs` at a time) that
hand back JSON files, so nothing crosses a process boundary but JSON.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowdtrain.config import parse_config


@dataclass(frozen=True)
class RobustSetting:
    """The size of one benchmark run."""

    peers: int
    rounds: int
    steps: int
    width: int
    depth: int
    context: int
    batch_size: int


QUICK = RobustSetting(peers=5, rounds=8, steps=20, width=64, depth=2, context=64, batch_size=16)
FULL = RobustSetting(peers=10, rounds=12, steps=30, width=96, depth=3, context=64, batch_size=16)

#: Attacks run at 20% attackers, and those also run at 40%.
AT_20 = (
    "sign_flip",
    "scale100",
    "scale1000",
    "noise",
    "alie",
    "ipm0.1",
    "ipm100",
    "poison",
    "free_rider",
    "copycat",
    "stale",
    "nan",
    "inflate",
)
AT_40 = ("alie", "ipm0.1", "ipm100")


def scenario(s: RobustSetting, defended: bool, data_dir: str) -> dict[str, Any]:
    """The scenario document of one run (validated as a RunConfig here)."""
    run: dict[str, Any] = {
        "name": "bench-robustness",
        "seed": 0,
        "model": {"arch": "gpt", "width": s.width, "depth": s.depth, "heads": 4},
        "data": {"source": "stdlib", "dir": data_dir, "batch_size": s.batch_size},
        "inner": {
            "lr": 3e-3,
            "steps": s.steps,
            "total_steps": s.steps * s.rounds,
            "warmup_steps": max(1, s.steps // 2),
            "threads": 1,
        },
        "codec": {"name": "int8"},
        "aggregation": {"method": "centered_clip" if defended else "mean"},
        "defence": {"enabled": defended},
        "rounds": {"total": s.rounds, "quorum": 1},
    }
    run["model"]["context"] = s.context
    parse_config(run)  # fail here, not in a child process
    return {"swarm": {"peers": s.peers, "eval_batches": 8, "eval_batch_size": 32}, "run": run}


def _toml(doc: Mapping[str, Any], prefix: str = "") -> str:
    """TOML for nested tables of str, int, float and bool (all a scenario needs)."""
    scalars, tables = [], []
    for key, value in doc.items():
        if isinstance(value, Mapping):
            tables.append(_toml(value, f"{prefix}{key}."))
        else:
            scalars.append(f"{key} = {json.dumps(value)}")
    head = f"[{prefix[:-1]}]\n" if prefix and scalars else ""
    return head + "".join(line + "\n" for line in scalars) + "\n" + "".join(tables)


def _run_one(
    folder: Path, tag: str, doc: dict[str, Any], attack: str | None, k: int
) -> dict[str, Any]:
    """One `crowdtrain simulate` process; returns its JSON document."""
    path = folder / f"{tag}.toml"
    path.write_text(_toml(doc))
    out = folder / f"{tag}.json"
    cmd = [sys.executable, "-m", "crowdtrain.cli", "simulate", "--scenario", str(path)]
    cmd += ["--json", str(out)]
    if attack is not None:
        cmd += ["--attack", attack, "--attackers", str(k)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"run {tag} failed: {proc.stdout[-800:]} {proc.stderr[-800:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def caught_in_round(result: Mapping[str, Any], attackers: set[str], attack: str) -> float:
    """Fraction of the attackers' malicious uploads refused in the round they were sent.

    A `stale` attacker is honest in its first round (it has nothing old to replay yet), so
    that upload does not count.
    """
    caught = {
        (v["peer_id"], v["round"])
        for v in result["verdicts"]
        if v["outcome"] in ("rejected", "flagged")
    }
    first: dict[str, int] = {}
    acts = []
    for peer, rnd in result["submissions"]:
        if peer not in attackers:
            continue
        first.setdefault(peer, rnd)
        if attack == "stale" and rnd == first[peer]:
            continue
        acts.append((peer, rnd))
    return sum((a in caught) for a in acts) / len(acts) if acts else 1.0


def summarize(
    attack: str, k: int, peers: int, defended: Mapping[str, Any], plain: Mapping[str, Any]
) -> dict[str, Any]:
    """One row of the JSON: what the defences did against one attack."""
    bad = set(defended["attackers"])
    return {
        "attack": attack,
        "fraction": k / peers,
        "defended_eval_loss": defended["final_eval_loss"],
        "undefended_eval_loss": plain["final_eval_loss"],
        "attackers_banned": sum(p in bad for p in defended["banned"]),
        "attackers_total": k,
        "honest_flagged": sum(p not in bad for p in defended["flagged"]),
        "honest_banned": sum(p not in bad for p in defended["banned"]),
        "caught_in_round": caught_in_round(defended, bad, attack),
        "spot_checks": sum(v["outcome"].startswith("check_") for v in defended["verdicts"]),
    }


def overhead(result: Mapping[str, Any]) -> float:
    """Spot-check replay steps as a fraction of all training steps (replays included)."""
    total = result["train_steps"] + result["verify_steps"]
    return float(result["verify_steps"] / total) if total else 0.0


def run_robustness_bench(
    *, quick: bool, jobs: int = 2, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the clean, defended and undefended swarms; return the benchmark's JSON document."""
    s = QUICK if quick else FULL
    k20 = max(1, round(0.2 * s.peers))
    k40 = max(1, round(0.4 * s.peers))
    cases = [(a, k20) for a in AT_20] + [(a, k40) for a in AT_40]
    with tempfile.TemporaryDirectory(prefix="crowdtrain-robust-") as tmp:
        folder = Path(tmp)
        data_dir = str(Path("data/stdlib").resolve())
        docs = {d: scenario(s, d, data_dir) for d in (True, False)}
        runs: list[tuple[str, bool, str | None, int]] = [
            ("clean-defended", True, None, 0),
            ("clean-plain", False, None, 0),
        ]
        for attack, k in cases:
            runs.append((f"{attack}-{k}-defended", True, attack, k))
            runs.append((f"{attack}-{k}-plain", False, attack, k))
        # Pack the corpus once, before the parallel runs race to do it.
        from crowdtrain.data import ensure_packed_for

        ensure_packed_for(parse_config(docs[True]["run"]).data)

        def go(spec: tuple[str, bool, str | None, int]) -> tuple[str, dict[str, Any]]:
            tag, defended, attack, k = spec
            result = _run_one(folder, tag, docs[defended], attack, k)
            log(f"{tag}: eval loss {result['final_eval_loss']:.4f}")
            return tag, result

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = dict(pool.map(go, runs))
    clean = results["clean-defended"]
    attacks = {
        f"{attack}@{k}": summarize(
            attack, k, s.peers, results[f"{attack}-{k}-defended"], results[f"{attack}-{k}-plain"]
        )
        for attack, k in cases
    }
    defended_overheads = [overhead(results[f"{a}-{k}-defended"]) for a, k in cases]
    return {
        "setting": {**s.__dict__, "quick": quick},
        "clean_eval_loss": clean["final_eval_loss"],
        "clean_plain_eval_loss": results["clean-plain"]["final_eval_loss"],
        "initial_eval_loss": clean["initial_eval_loss"],
        "attacks": attacks,
        "spot_check_overhead": overhead(clean),
        "spot_check_overhead_median_attacked": statistics.median(defended_overheads),
        "usefulness_scored_clean": clean["scored"],
    }
