"""The `crowdtrain` command: happy paths and one-sentence errors (never a traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crowdtrain.cli import app

runner = CliRunner()


def one_line_error(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert "Traceback" not in output
    assert len(lines) == 1, output
    return lines[0]


def test_simulate_scenario_file_writes_json(corpus_file: Path, tmp_path: Path) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(
        f"""
[swarm]
peers = 2
eval_batches = 2
eval_batch_size = 4

[run.model]
width = 32
depth = 1
heads = 2
context = 32

[run.data]
source = "{corpus_file}"
dir = "{tmp_path / "data"}"
shard_bytes = 8192
val_fraction = 0.1
batch_size = 4

[run.inner]
steps = 4

[run.rounds]
total = 2
quorum = 2
"""
    )
    out = tmp_path / "out" / "result.json"
    result = runner.invoke(app, ["simulate", "--scenario", str(scenario), "--json", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert [r["round"] for r in doc["rounds"]] == [0, 1]
    assert {"train_loss", "eval_loss", "contributions", "bytes_up"} <= set(doc["rounds"][0])
    assert isinstance(doc["final_eval_loss"], float)
    # --seed reruns the same scenario from another seed: another start, another loss
    again = tmp_path / "seed1.json"
    args = ["simulate", "--scenario", str(scenario), "--json", str(again), "--seed", "1"]
    assert runner.invoke(app, args).exit_code == 0
    assert json.loads(again.read_text())["final_eval_loss"] != doc["final_eval_loss"]
    bad = runner.invoke(app, [*args[:5], "--seed", "-1"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output


def test_unknown_scenario_is_one_sentence() -> None:
    result = runner.invoke(app, ["simulate", "--scenario", "nope"])
    assert result.exit_code == 2
    assert "unknown scenario 'nope'" in one_line_error(result.output)
    assert "smoke" in result.output


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("[model]\nfoo = 1\n", "unknown config key 'model.foo'"),
        ('[codec]\nname = "int3"\n', "config key 'codec.name'"),
        ("[inner]\nlr = -1.0\n", "config key 'inner.lr'"),
        ("[inner\n", "not valid TOML"),
    ],
)
def test_config_check_rejects_bad_configs(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "run.toml"
    path.write_text(body)
    result = runner.invoke(app, ["config", "check", str(path)])
    assert result.exit_code == 2
    assert needle in one_line_error(result.output)


def test_config_check_prints_hash(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[inner]\nlr = 0.001\n")
    result = runner.invoke(app, ["config", "check", str(path)])
    assert result.exit_code == 0 and "config hash" in result.output


def test_data_pack_file_and_missing_source(corpus_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "packed"
    result = runner.invoke(
        app, ["data", "pack", str(corpus_file), "--out", str(out), "--shard-bytes", "8192"]
    )
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file()
    result = runner.invoke(app, ["data", "pack", str(tmp_path / "missing"), "--out", str(out)])
    assert result.exit_code == 2
    one_line_error(result.output)


def test_export_and_sample_errors_are_one_sentence(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["export", "--state", str(tmp_path / "nothing"), "--out", str(tmp_path / "m")]
    )
    assert result.exit_code == 2
    assert "nothing" in one_line_error(result.output)
    assert not (tmp_path / "m").exists()
    result = runner.invoke(app, ["sample", "--model", str(tmp_path / "nothing")])
    assert result.exit_code == 2
    assert "nothing" in one_line_error(result.output)


def test_serve_without_a_tracker_package_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    monkeypatch.chdir(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("wandb", "tensorboard") else real(name, *a),
    )
    for command in (["serve", "--state", str(tmp_path / "s")], ["demo"]):
        for flag in (["--wandb"], ["--tensorboard", str(tmp_path / "tb")]):
            result = runner.invoke(app, [*command, *flag])
            assert result.exit_code == 2
            line = one_line_error(result.output)
            assert "pip install 'crowdtrain[" in line
    assert not (tmp_path / "runs").exists()  # the demo stopped before it started anything
