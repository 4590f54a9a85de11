"""The in-process swarm under real attacks: the verification pipeline catches each attacker.

A tiny GPT, 4 volunteers of which the last attacks (crowdtrain.adversary), 3 rounds, centered
clipping: the attacker is refused or flagged in every round it acts and banned by the end, no
honest peer is harmed, and without the defence the same attack wrecks the model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from crowdtrain.config import ConfigError, RunConfig
from crowdtrain.sim.swarm import SwarmResult, run_swarm
from crowdtrain_testing import tiny_config

PEERS = 4
ATTACKER = f"peer-{PEERS - 1}"
HONEST = {f"peer-{i}" for i in range(PEERS - 1)}
ROUNDS = 3
CAUGHT = ("rejected", "flagged")

Run = Callable[..., SwarmResult]


def swarm_config(corpus: Path, data: Path, **overrides: dict[str, object]) -> RunConfig:
    return tiny_config(
        corpus,
        data,
        rounds={"total": ROUNDS, "quorum": 1},
        aggregation={
            "method": "centered_clip",
            "bucket_size": 2,
            **overrides.pop("aggregation", {}),
        },
        **overrides,
    )


@pytest.fixture(scope="module")
def run(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Runs a swarm with one attacker (memoised: several tests read the same run)."""
    data = tmp_path_factory.mktemp("swarm-attacks-data")
    cache: dict[tuple[str, bool], SwarmResult] = {}

    def go(attack: str, *, defended: bool = True) -> SwarmResult:
        key = (attack, defended)
        if key not in cache:
            undefended: dict[str, dict[str, object]] = {
                "defence": {"enabled": False},
                "aggregation": {"method": "mean"},
            }
            cfg = swarm_config(corpus_file, data, **({} if defended else undefended))
            cache[key] = run_swarm(
                cfg, PEERS, attack=attack, attackers=1, eval_batch_count=4, eval_batch_size=8
            )
        return cache[key]

    return go


def caught_in(result: SwarmResult, peer: str) -> dict[int, set[str]]:
    """The stages that refused or flagged `peer`, by round."""
    out: dict[int, set[str]] = {}
    for v in result.verdicts:
        if v["peer_id"] == peer and v["outcome"] in CAUGHT:
            out.setdefault(v["round"], set()).add(v["stage"])
    return out


def submitted_rounds(result: SwarmResult, peer: str) -> list[int]:
    return sorted(r for p, r in result.submissions if p == peer)


def assert_honest_unharmed(result: SwarmResult) -> None:
    assert result.attackers == [ATTACKER]
    assert not HONEST & set(result.banned)
    assert not HONEST & set(result.flagged)
    for v in result.verdicts:
        if v["peer_id"] in HONEST:
            assert v["outcome"] in ("check_passed", "check_expired"), v


@pytest.mark.parametrize(
    ("attack", "stage"),
    [("scale1000", "norm"), ("nan", "format"), ("inflate", "claims"), ("free_rider", "norm")],
)
def test_attacker_is_caught_every_round_and_banned(run: Run, attack: str, stage: str) -> None:
    result = run(attack)
    assert submitted_rounds(result, ATTACKER) == list(range(ROUNDS))
    assert caught_in(result, ATTACKER) == {r: {stage} for r in range(ROUNDS)}
    assert list(result.banned) == [ATTACKER]
    (ban,) = [v for v in result.verdicts if v["outcome"] == "banned"]
    assert (ban["peer_id"], ban["round"], ban["stage"]) == (ATTACKER, ROUNDS - 1, "reputation")
    assert result.flagged == [ATTACKER]
    assert [r.contributions for r in result.rounds] == [PEERS - 1] * ROUNDS
    assert_honest_unharmed(result)
    assert result.final_eval_loss < result.initial_eval_loss - 1.0


@pytest.mark.parametrize(("attack", "first"), [("copycat", 0), ("stale", 1)])
def test_copies_and_replays_are_caught_from_the_round_they_act(
    run: Run, attack: str, first: int
) -> None:
    result = run(attack)
    assert submitted_rounds(result, ATTACKER) == list(range(ROUNDS))
    assert caught_in(result, ATTACKER) == {r: {"copy"} for r in range(first, ROUNDS)}
    contributions = [r.contributions for r in result.rounds]
    assert contributions == [PEERS] * first + [PEERS - 1] * (ROUNDS - first)
    assert_honest_unharmed(result)


def test_without_the_defence_scale1000_wrecks_the_model(run: Run) -> None:
    defended, undefended = run("scale1000"), run("scale1000", defended=False)
    assert undefended.verdicts == [] and undefended.banned == {}
    assert [r.contributions for r in undefended.rounds] == [PEERS] * ROUNDS
    assert defended.initial_eval_loss == undefended.initial_eval_loss
    assert defended.final_eval_loss < defended.initial_eval_loss - 1.0
    # the attack is real: undefended, the model ends far worse than where it started
    assert undefended.final_eval_loss > undefended.initial_eval_loss + 10.0
    assert undefended.final_eval_loss > 10 * defended.final_eval_loss


@pytest.mark.parametrize("attackers", [PEERS, PEERS + 1, 0])
def test_run_swarm_needs_an_honest_peer_and_an_attacker(
    corpus_file: Path, tmp_path: Path, attackers: int
) -> None:
    cfg = swarm_config(corpus_file, tmp_path / "data")
    with pytest.raises(ValueError, match="attackers"):
        run_swarm(cfg, PEERS, attack="nan", attackers=attackers)
    assert not (tmp_path / "data").exists()  # refused before any work


def test_a_quorum_that_refusals_make_unreachable_is_a_clear_error(
    corpus_file: Path, tmp_path: Path
) -> None:
    """Every volunteer is needed for the quorum; once the attacker's upload is refused the round
    cannot close: one sentence that says why and what to change, not an internal error."""
    cfg = tiny_config(corpus_file, tmp_path / "data", rounds={"total": ROUNDS, "quorum": PEERS})
    with pytest.raises(ConfigError, match="quorum is 4 contributions, but only 3 of the 4"):
        run_swarm(cfg, PEERS, attack="nan", attackers=1)


def test_volunteers_score_contributions_and_catch_a_sign_flip(
    corpus_file: Path, tmp_path: Path
) -> None:
    """`defence.scoring = "peer"`: usefulness scores come from score orders that trusted
    volunteers answer (two must agree on a failure), not from the coordinator."""
    rounds = 5
    cfg = tiny_config(
        corpus_file,
        tmp_path / "data",
        rounds={"total": rounds, "quorum": 1},
        aggregation={"method": "centered_clip", "bucket_size": 2},
        defence={
            "scoring": "peer",
            "spot_check": "off",
            "score_per_round": PEERS,
            "reputation_initial": 0.5,
            "trust_threshold": 0.5,
            "probation_rounds": 1,
        },
    )
    result = run_swarm(
        cfg, PEERS, attack="sign_flip", attackers=1, eval_batch_count=4, eval_batch_size=8
    )
    flagged = {
        v["round"]
        for v in result.verdicts
        if v["peer_id"] == ATTACKER and v["stage"] == "usefulness" and v["outcome"] == "flagged"
    }
    assert flagged, result.verdicts
    passed = [v for v in result.verdicts if v["outcome"] == "score_passed"]
    assert {v["peer_id"] for v in passed} >= HONEST
    # from random weights even −Δ lowers the loss: only its first update may pass
    assert all(v["round"] == 0 for v in passed if v["peer_id"] == ATTACKER)
    assert not HONEST & set(result.banned) and not HONEST & set(result.flagged)


def test_a_run_whose_training_diverges_stops_with_a_result(
    corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When θ no longer trains (an undefended attack drove it to NaN) the simulation ends with
    what it has and says why, instead of an internal error."""
    from crowdtrain.train import LocalTrainer

    real = LocalTrainer.train
    calls = 0

    def train(self: LocalTrainer, *args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls > PEERS:  # round 1's first step
            raise FloatingPointError("training diverged: the loss became nan at step 20")
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(LocalTrainer, "train", train)
    cfg = swarm_config(corpus_file, tmp_path / "data")
    result = run_swarm(cfg, PEERS, eval_batch_count=2, eval_batch_size=8)
    assert len(result.rounds) == 1 and result.diverged is not None
    assert result.diverged.startswith("round 1: training diverged")
    assert result.to_json()["diverged"] == result.diverged
