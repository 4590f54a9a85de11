"""The in-process swarm: real protocol core, trainer and codec; the loss falls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crowdtrain.sim.swarm import run_swarm
from crowdtrain_testing import tiny_config


@pytest.mark.parametrize("codec", ["int8", "topk2bit"])
def test_swarm_loss_falls_and_reports_each_round(
    corpus_file: Path, tmp_path: Path, codec: str
) -> None:
    cfg = tiny_config(
        corpus_file, tmp_path / "data", codec={"name": codec, "chunk_size": 256, "topk": 32}
    )
    rows = []
    result = run_swarm(cfg, 3, eval_batch_count=4, eval_batch_size=8, on_round=rows.append)
    assert [r.round for r in result.rounds] == [0, 1, 2, 3]
    assert rows == result.rounds
    assert all(r.contributions == 3 and r.bytes_up > 0 for r in result.rounds)
    assert result.final_eval_loss < result.initial_eval_loss - 0.3
    doc = json.loads(json.dumps(result.to_json()))
    assert set(doc["rounds"][0]) == {
        "round",
        "train_loss",
        "eval_loss",
        "contributions",
        "bytes_up",
    }
    assert doc["final_eval_loss"] == result.final_eval_loss


def test_swarm_is_deterministic(corpus_file: Path, tmp_path: Path) -> None:
    cfg = tiny_config(corpus_file, tmp_path / "data", rounds={"total": 2, "quorum": 2})
    a = run_swarm(cfg, 2, eval_batch_count=2, eval_batch_size=4)
    b = run_swarm(cfg, 2, eval_batch_count=2, eval_batch_size=4)
    assert a.to_json() == b.to_json()
