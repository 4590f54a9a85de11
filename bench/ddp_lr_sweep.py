"""Sweep the learning rate of the data-parallel reference (DDP) for a discrete-event scenario.

The DDP reference of issue 5 trains on a global batch of ``peers × batch_size`` sequences, 16×
a volunteer's batch in consumer-1b, so its best peak learning rate may differ from the run's
``inner.lr``. This runs `crowdtrain.sim.ddp.train_ddp` at each learning rate on the scenario's
run config and prints the held-out loss at each evaluation, so that the reference is compared at
its best learning rate (synchronous data parallelism: Li et al. 2020, arXiv:2006.15704).

Usage:
  .venv/bin/python bench/ddp_lr_sweep.py --scenario consumer-1b --steps 300 \\
      --lrs 3e-3,6e-3,1e-2,2e-2 --json bench/results/ddp-lr-sweep.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from crowdtrain.config import ConfigError
from crowdtrain.sim.ddp import train_ddp
from crowdtrain.sim.scenario import load_scenario


def parse_lrs(text: str) -> list[float]:
    """Comma-separated positive learning rates."""
    try:
        lrs = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--lrs must be numbers separated by commas, not {text!r}"
        ) from None
    if not lrs or not all(math.isfinite(lr) and lr > 0 for lr in lrs):
        raise argparse.ArgumentTypeError(f"--lrs must be positive numbers, not {text!r}")
    return lrs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="consumer-1b", help="a discrete-event scenario")
    parser.add_argument("--lrs", type=parse_lrs, default=parse_lrs("3e-3,6e-3,1e-2"))
    parser.add_argument("--steps", type=int, default=300, help="proxy steps per learning rate")
    parser.add_argument("--eval-every", type=int, default=0, help="default: steps / 6")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    try:
        scenario = load_scenario(args.scenario)
    except ConfigError as exc:
        parser.error(str(exc))
    # A discrete-event scenario's volunteers are its population; an in-process one's its swarm.
    peers = scenario.swarm.peers if scenario.population is None else scenario.population.peers
    every = args.eval_every or max(1, args.steps // 6)
    run = scenario.run
    print(
        f"scenario {scenario.name}: {peers} ranks × batch {run.data.batch_size} = global batch "
        f"{peers * run.data.batch_size}; schedule warmup {run.inner.warmup_steps}, total "
        f"{run.inner.total_steps} steps; run's inner.lr {run.inner.lr:g}",
        flush=True,
    )

    results: list[dict[str, Any]] = []
    for lr in args.lrs:
        started = time.monotonic()
        row: dict[str, Any] = {"lr": lr, "steps": [], "eval_loss": [], "diverged": False}

        def report(step: int, loss: float, row: dict[str, Any] = row) -> None:
            row["steps"].append(step)
            row["eval_loss"].append(loss if math.isfinite(loss) else None)  # JSON has no nan
            print(f"  lr {row['lr']:g} step {step}: {loss:.4f}", flush=True)

        try:
            curve = train_ddp(
                run,
                peers,
                max_steps=args.steps,
                eval_every=every,
                eval_batches=scenario.swarm.eval_batches,
                eval_batch_size=scenario.swarm.eval_batch_size,
                lr=lr,
                on_eval=report,
            )
            row["global_batch"] = curve.global_batch
        except FloatingPointError as exc:  # the loss became inf or nan: this lr is too high
            row["diverged"] = True
            row["error"] = str(exc)
            print(f"  lr {lr:g}: {exc}", flush=True)
        row["wall_s"] = time.monotonic() - started
        results.append(row)

    columns: list[int] = max((r["steps"] for r in results), key=len)
    print()
    print("lr        " + "".join(f"{'step ' + str(s):>12}" for s in columns) + "      wall s")
    for r in results:
        cells = ["nan".rjust(12) if loss is None else f"{loss:12.4f}" for loss in r["eval_loss"]]
        cells += ["diverged".rjust(12)] * (len(columns) - len(cells))
        print(f"{r['lr']:<10g}" + "".join(cells) + f"{r['wall_s']:12.0f}")
    done = [r for r in results if not r["diverged"] and r["eval_loss"][-1] is not None]
    best = min(done, key=lambda r: r["eval_loss"][-1]) if done else None
    if best is not None:
        print(f"best lr: {best['lr']:g} (final eval loss {best['eval_loss'][-1]:.4f})")
    if args.json is not None:
        doc = {
            "scenario": scenario.name,
            "peers": peers,
            "steps": args.steps,
            "eval_every": every,
            "runs": results,
            "best_lr": best["lr"] if best is not None else None,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
