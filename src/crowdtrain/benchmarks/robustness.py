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
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from crowdtrain.adversary import ATTACKS
from crowdtrain.config import ConfigError, parse_config
from crowdtrain.data import ensure_packed_for


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
FULL = RobustSetting(peers=10, rounds=10, steps=20, width=64, depth=2, context=64, batch_size=16)

#: Attacks run at 20% attackers (all of them), and those also run at 40%.
AT_20 = ATTACKS
AT_40 = ("alie", "ipm0.1", "ipm100", "minmax", "minsum", "edge", "drift", "collude")
#: Sybil floods: this many fresh identities per honest peer join the honest peers of the
#: setting (who stay as many as in the clean run), sending tiny updates (`free_rider`: they
#: pull the round's median norm down, so honest updates look too large) or a coordinated
#: −mean just under the norm limit (`edge`).
SYBIL_MULTIPLES = (1, 2, 10)
SYBIL_ATTACKS = ("free_rider", "edge")


def scenario(
    s: RobustSetting, defended: bool, data_dir: str, peers: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """The scenario document of one run (validated as a RunConfig here)."""
    run: dict[str, Any] = {
        "name": "bench-robustness",
        "seed": seed,
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
    swarm = {"peers": peers or s.peers, "eval_batches": 8, "eval_batch_size": 32}
    return {"swarm": swarm, "run": run}


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
    attack: str,
    k: int,
    peers: int,
    defended: Mapping[str, Any],
    plain: Mapping[str, Any],
    honest_only: Mapping[str, Any],
) -> dict[str, Any]:
    """One row of the JSON: what the defences did against one attack."""
    bad = set(defended["attackers"])
    return {
        "attack": attack,
        "fraction": k / peers,
        "defended_eval_loss": defended["final_eval_loss"],
        "undefended_eval_loss": plain["final_eval_loss"],
        "undefended_diverged": plain.get("diverged"),  # why training stopped early, if it did
        "defended_diverged": defended.get("diverged"),
        "honest_only_eval_loss": honest_only["final_eval_loss"],
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


#: Data-order seeds of the extra clean runs that show the run-to-run spread.
SPREAD_SEEDS = (1, 2)
#: The long clean run that measures the spot-check overhead once peers are past newcomer status.
LONG_ROUNDS_FACTOR = 5


def run_robustness_bench(
    *,
    quick: bool,
    jobs: int = 2,
    runs_dir: Path | None = None,
    log: Callable[[str], None] = print,
    attacks: Collection[str] | None = None,
) -> dict[str, Any]:
    """Run the clean, defended and undefended swarms; return the benchmark's JSON document.
    `attacks` keeps only those attacks' rows (at every fraction, and their sybil floods).

    Besides one defended and one plain run per attack, it runs: the clean run with the
    defences on and with a plain mean; the honest peers alone (what perfect exclusion of the
    attackers gives); the clean run with other data-order seeds (the run-to-run spread that
    any difference must exceed to mean something); and a clean run `LONG_ROUNDS_FACTOR` times
    longer, for the spot-check overhead after the newcomer phase. With `runs_dir`, every run's
    own JSON (per-round losses, every verdict with its reason) is kept there for audit.
    """
    s = QUICK if quick else FULL
    k20 = max(1, round(0.2 * s.peers))
    k40 = max(1, round(0.4 * s.peers))
    if attacks is not None and not attacks:
        raise ConfigError("--attacks names no attack; leave it out to run them all")
    if attacks is not None and (unknown := set(attacks) - set(ATTACKS)):
        raise ConfigError(
            f"unknown attack {sorted(unknown)[0]!r}; the attacks are {', '.join(ATTACKS)}"
        )
    keep = set(ATTACKS if attacks is None else attacks)
    cases = [(a, k20) for a in AT_20 if a in keep] + [(a, k40) for a in AT_40 if a in keep]
    data_dir = str(Path("data/stdlib").resolve())
    defended, plain = scenario(s, True, data_dir), scenario(s, False, data_dir)
    long = replace(s, rounds=s.rounds * LONG_ROUNDS_FACTOR)
    runs: list[tuple[str, dict[str, Any], str | None, int]] = [
        ("clean-defended", defended, None, 0),
        ("clean-plain", plain, None, 0),
        ("clean-long", scenario(long, True, data_dir), None, 0),
    ]
    for seed in SPREAD_SEEDS:
        runs.append((f"clean-seed{seed}", scenario(s, True, data_dir, seed=seed), None, 0))
    for k in sorted({k20, k40}):
        runs.append((f"honest-only-{k}", scenario(s, True, data_dir, s.peers - k), None, 0))
    for attack, k in cases:
        runs.append((f"{attack}-{k}-defended", defended, attack, k))
        runs.append((f"{attack}-{k}-plain", plain, attack, k))
    sybils = [(a, m * s.peers) for a in SYBIL_ATTACKS if a in keep for m in SYBIL_MULTIPLES]
    for attack, k in sybils:
        for tag, on in (("defended", True), ("plain", False)):
            doc = scenario(s, on, data_dir, peers=s.peers + k)
            runs.append((f"sybil-{attack}-{k}-{tag}", doc, attack, k))
    # Pack the corpus once, before the parallel runs race to do it.
    ensure_packed_for(parse_config(defended["run"]).data)
    with tempfile.TemporaryDirectory(prefix="crowdtrain-robust-") as tmp:
        folder = Path(tmp)

        def go(spec: tuple[str, dict[str, Any], str | None, int]) -> tuple[str, dict[str, Any]]:
            tag, doc, attack, k = spec
            result = _run_one(folder, tag, doc, attack, k)
            log(f"{tag}: eval loss {result['final_eval_loss']:.4f}")
            return tag, result

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = dict(pool.map(go, runs))
    if runs_dir is not None:
        runs_dir.mkdir(parents=True, exist_ok=True)
        for tag, result in results.items():
            (runs_dir / f"{tag}.json").write_text(json.dumps(result, indent=1))
    clean = results["clean-defended"]
    attacks = {
        attack if k == k20 else f"{attack}@{k / s.peers:.0%}": summarize(
            attack,
            k,
            s.peers,
            results[f"{attack}-{k}-defended"],
            results[f"{attack}-{k}-plain"],
            results[f"honest-only-{k}"],
        )
        for attack, k in cases
    }
    for attack, k in sybils:
        row = summarize(
            attack,
            k,
            s.peers + k,
            results[f"sybil-{attack}-{k}-defended"],
            results[f"sybil-{attack}-{k}-plain"],
            clean,  # the honest peers alone: as many as in the clean run
        )
        attacks[f"{attack} sybils x{k // s.peers}"] = {**row, "sybils_per_honest": k // s.peers}
    defended_overheads = [overhead(results[f"{a}-{k}-defended"]) for a, k in cases]
    return {
        "setting": {**s.__dict__, "quick": quick},
        "clean_eval_loss": clean["final_eval_loss"],
        "clean_plain_eval_loss": results["clean-plain"]["final_eval_loss"],
        "clean_seed_eval_loss": {
            "0": clean["final_eval_loss"],
            **{str(n): results[f"clean-seed{n}"]["final_eval_loss"] for n in SPREAD_SEEDS},
        },
        "honest_only_eval_loss": {
            str(k): results[f"honest-only-{k}"]["final_eval_loss"] for k in sorted({k20, k40})
        },
        "initial_eval_loss": clean["initial_eval_loss"],
        "attacks": attacks,
        "spot_check_overhead": overhead(clean),
        "spot_check_overhead_long": overhead(results["clean-long"]),
        "long_rounds": long.rounds,
        "spot_check_overhead_median_attacked": statistics.median(defended_overheads),
        "usefulness_scored_clean": clean["scored"],
    }
