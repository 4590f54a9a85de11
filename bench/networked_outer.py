"""The outer-step rule checked on the networked system: the demo's run (coordinator and 4
volunteer processes behind the WAN proxy, one volunteer 3× slower, int8, seconds-budgeted
rounds) with the derived outer settings and with fixed alternatives, one after the other.

Usage: .venv/bin/python bench/networked_outer.py ROUNDS ROUND_SECONDS '[null, [0.7, 0.9]]'
Each variant is null (the derived lr and momentum) or [lr, momentum]. Prints one JSON line per
variant: its settings, eval loss at the start and end, rounds, wall seconds, samples trained.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from crowdtrain.config import parse_config
from crowdtrain.demo import demo_config, demo_volunteers, run_network


def main(rounds: int, round_seconds: float, variants: list[list[float] | None]) -> None:
    specs, honest = demo_volunteers(4)
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the script
    for v in variants:
        raw = demo_config(rounds, round_seconds, quorum=min(2, honest)).model_dump(mode="json")
        raw["outer"] = {"optimizer": "nesterov"}
        if v is not None:
            raw["outer"].update(lr=v[0], momentum=v[1])
        config = parse_config(raw)
        with tempfile.TemporaryDirectory(prefix="crowdtrain-outer-") as tmp:
            doc = run_network(config, specs, Path(tmp) / "state", console=quiet, live=False)
        print(
            json.dumps(
                {
                    "outer": "derived" if v is None else v,
                    "lr": config.outer.lr,
                    "momentum": config.outer.momentum,
                    "eval_loss_start": round(doc["eval_loss_start"], 4),
                    "eval_loss_end": round(doc["eval_loss_end"], 4),
                    "rounds": doc["rounds_completed"],
                    "wall_s": doc["wall_s"],
                    "samples": sum(x["samples"] for x in doc["volunteers"]),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3]))
