"""The robustness benchmark's plumbing: scenario files, and how its table is computed."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from crowdtrain.benchmarks.robustness import (
    QUICK,
    _toml,
    caught_in_round,
    overhead,
    scenario,
    summarize,
)
from crowdtrain.cli import app
from crowdtrain.sim.scenario import parse_scenario


def test_the_scenario_files_parse_back_to_what_was_meant(tmp_path: Path) -> None:
    for defended in (True, False):
        doc = scenario(QUICK, defended, str(tmp_path / "data"), peers=4)
        parsed = parse_scenario("x", tomllib.loads(_toml(doc)))
        assert parsed.swarm.peers == 4
        assert parsed.run.defence.enabled is defended
        assert parsed.run.aggregation.method == ("centered_clip" if defended else "mean")
        assert parsed.run.inner.steps == QUICK.steps and parsed.run.rounds.total == QUICK.rounds


def run_doc(
    verdicts: list[tuple[str, int, str]], submissions: list[tuple[str, int]]
) -> dict[str, Any]:
    return {
        "final_eval_loss": 2.5,
        "attackers": ["peer-4"],
        "banned": {"peer-4": "why"},
        "flagged": ["peer-1", "peer-4"],
        "verdicts": [
            {"peer_id": p, "round": r, "outcome": o, "stage": "norm", "reason": "", "time": 0}
            for p, r, o in verdicts
        ],
        "submissions": [list(s) for s in submissions],
        "train_steps": 90,
        "verify_steps": 10,
    }


def test_caught_in_round_counts_only_refusals_in_the_round_of_the_upload() -> None:
    doc = run_doc(
        [("peer-4", 0, "flagged"), ("peer-4", 2, "rejected"), ("peer-1", 1, "flagged")],
        [("peer-4", 0), ("peer-4", 1), ("peer-4", 2), ("peer-1", 1)],
    )
    assert caught_in_round(doc, {"peer-4"}, "scale100") == 2 / 3
    # A stale attacker's first upload is honest (it has nothing to replay yet).
    assert caught_in_round(doc, {"peer-4"}, "stale") == 1 / 2
    assert caught_in_round(run_doc([], []), {"peer-4"}, "nan") == 1.0


def test_a_row_names_bans_false_flags_and_losses() -> None:
    defended = run_doc([("peer-4", 0, "flagged")], [("peer-4", 0)])
    plain = {**defended, "final_eval_loss": 9.0}
    row = summarize("noise", 1, 5, defended, plain, {"final_eval_loss": 2.4})
    assert row["fraction"] == 0.2
    assert (row["defended_eval_loss"], row["undefended_eval_loss"]) == (2.5, 9.0)
    assert row["honest_only_eval_loss"] == 2.4
    assert (row["attackers_banned"], row["attackers_total"]) == (1, 1)
    assert (row["honest_flagged"], row["honest_banned"]) == (1, 0)
    assert overhead(defended) == 0.1


def test_simulate_refuses_a_bad_attack_in_one_sentence() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["simulate", "--attack", "gremlins"])
    assert result.exit_code != 0
    assert "unknown attack 'gremlins'" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["simulate", "--attack", "noise", "--attackers", "4"])
    assert result.exit_code != 0 and "between 1 and 3" in result.output


def test_the_attacks_option_refuses_unknown_or_no_attacks() -> None:
    import pytest

    from crowdtrain.benchmarks.robustness import run_robustness_bench
    from crowdtrain.config import ConfigError

    with pytest.raises(ConfigError, match="unknown attack 'nope'"):
        run_robustness_bench(quick=True, attacks=["sign_flip", "nope"])
    with pytest.raises(ConfigError, match="names no attack"):
        run_robustness_bench(quick=True, attacks=[])
