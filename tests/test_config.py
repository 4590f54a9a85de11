"""Run configuration: validation messages name the key; the content hash is stable."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crowdtrain.config import (
    MOMENTUM_QUORUM,
    MOMENTUM_ROUNDS,
    SCORING_ON_COORDINATOR_MAX_PARAMS,
    ConfigError,
    RunConfig,
    allowed_values,
    config_hash,
    confirms_on_coordinator,
    derived_settings,
    load_config,
    parse_config,
    scores_on_peers,
)


def test_defaults_follow_design() -> None:
    cfg = RunConfig()
    assert (cfg.inner.beta1, cfg.inner.beta2, cfg.inner.weight_decay) == (0.9, 0.99, 0.1)
    # Outer lr and momentum are derived (derived inner moments, 20 rounds: momentum 0.5).
    assert (cfg.outer.optimizer, cfg.outer.lr, cfg.outer.momentum) == ("nesterov", 0.7, 0.5)
    assert cfg.broadcast.codec == "int8"
    assert cfg.inner.optimizer_state == "derived"
    assert cfg.codec.name == "int8"
    assert cfg.aggregation.method == "centered_clip" and cfg.aggregation.bucket_size > 1


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"model": {"foo": 1}}, "unknown config key 'model.foo'; allowed keys here are: arch"),
        ({"bogus": 1}, "unknown config key 'bogus'"),
        ({"codec": {"name": "int3"}}, "'int8'"),
        ({"aggregation": {"method": "avg"}}, "config key 'aggregation.method'"),
        ({"inner": {"lr": 0}}, "config key 'inner.lr' is 0"),
        ({"model": {"width": 10, "heads": 4}}, "model.width (10) must be a multiple"),
        ({"codec": {"topk": 100, "chunk_size": 64}}, "codec.topk (100)"),
        ({"rounds": {"total": "many"}}, "config key 'rounds.total'"),
        ({"outer": {"optimizer": "lamb"}}, "allowed values are 'nesterov', 'sgd', 'adam'"),
        (
            {"outer": {"optimizer": "adam", "betas": [0.9, 1.0]}},
            "config key 'outer.betas.1' is 1.0",
        ),
        ({"outer": {"optimizer": "adam", "eps": 0}}, "config key 'outer.eps' is 0"),
        (
            {"outer": {"betas": [0.8, 0.9]}},
            "outer.betas and outer.eps apply only to outer.optimizer 'adam', not 'nesterov'",
        ),
    ],
)
def test_bad_values_give_one_sentence(raw: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_hash_is_stable_and_sensitive(tmp_path: Path) -> None:
    a = config_hash(RunConfig())
    assert a == config_hash(parse_config({}))
    path = tmp_path / "run.toml"
    path.write_text("[inner]\nlr = 0.003\n")  # the default, written out
    assert config_hash(load_config(path)) == a
    assert config_hash(parse_config({"inner": {"lr": 0.002}})) != a


@given(st.floats(min_value=1e-6, max_value=1.0), st.integers(min_value=1, max_value=1000))
def test_hash_depends_on_every_value(lr: float, steps: int) -> None:
    cfg = parse_config({"inner": {"lr": lr, "steps": steps}})
    again = parse_config(cfg.model_dump(mode="json"))
    assert config_hash(cfg) == config_hash(again)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.toml")


def test_outer_optimizers_and_adam_settings() -> None:
    assert set(allowed_values("outer")) == {"nesterov", "sgd", "adam", "error_feedback"}
    averaging = parse_config({"outer": {"optimizer": "sgd", "lr": 1.0, "momentum": 0.0}}).outer
    assert (averaging.optimizer, averaging.lr, averaging.momentum) == ("sgd", 1.0, 0.0)
    adam = parse_config({"outer": {"optimizer": "adam", "lr": 1e-3}}).outer
    assert (adam.betas, adam.eps) == ((0.9, 0.99), 1e-8)
    tuned = parse_config({"outer": {"optimizer": "adam", "betas": [0.8, 0.95], "eps": 1e-6}})
    assert (tuned.outer.betas, tuned.outer.eps) == ((0.8, 0.95), 1e-6)
    assert config_hash(parse_config(tuned.model_dump(mode="json"))) == config_hash(tuned)
    assert config_hash(tuned) != config_hash(parse_config({"outer": {"optimizer": "adam"}}))


def test_adam_settings_stay_out_of_other_configs_and_their_hash() -> None:
    # Configs written before Adam existed keep their hash: state directories and manifests
    # pinned by it still match.
    for raw in ({}, {"outer": {"optimizer": "error_feedback", "lr": 1.0}}):
        dumped = parse_config(raw).model_dump(mode="json")
        assert set(dumped["outer"]) == {"optimizer", "lr", "momentum"}
    adam = parse_config({"outer": {"optimizer": "adam"}}).model_dump(mode="json")
    assert set(adam["outer"]) == {"optimizer", "lr", "momentum", "betas", "eps"}


#: Scoring placed explicitly, so that it is not among the derived settings.
SCORED_HERE = {"defence": {"scoring": "coordinator", "check_confirm": "coordinator"}}


def test_where_scoring_runs_is_derived_from_the_model_size_unless_set() -> None:
    (small,) = [line for line in derived_settings({}) if line.startswith("defence.scoring")]
    assert small.startswith("defence.scoring = coordinator (derived: the model has ")
    big = {"model": {"width": 1024, "depth": 8, "heads": 8}}
    (line,) = [line for line in derived_settings(big) if line.startswith("defence.scoring")]
    assert line.startswith("defence.scoring = peer") and "above 50,000,000" in line
    assert not [x for x in derived_settings(SCORED_HERE) if x.startswith("defence.scoring")]
    defence = parse_config({}).defence
    assert not scores_on_peers(defence, SCORING_ON_COORDINATOR_MAX_PARAMS)
    assert scores_on_peers(defence, SCORING_ON_COORDINATOR_MAX_PARAMS + 1)
    peer = parse_config({"defence": {"scoring": "peer"}}).defence
    assert scores_on_peers(peer, 1)
    assert not scores_on_peers(parse_config(SCORED_HERE).defence, 10**12)


def test_check_confirmation_is_derived_where_the_coordinator_scores() -> None:
    small = derived_settings({"defence": {"scoring": "peer"}})
    assert any(line.startswith("defence.check_confirm = off (derived") for line in small)
    here = derived_settings({})
    assert any(line.startswith("defence.check_confirm = coordinator (derived") for line in here)
    assert confirms_on_coordinator(parse_config({}).defence, 10**6)
    assert not confirms_on_coordinator(parse_config({}).defence, 10**12)
    off = parse_config({"defence": {"check_confirm": "off"}}).defence
    assert not confirms_on_coordinator(off, 1)


def test_outer_settings_are_derived_unless_set_and_show_says_which() -> None:
    fresh = parse_config({"inner": {"optimizer_state": "fresh"}})
    assert (fresh.outer.lr, fresh.outer.momentum) == (1.0, 0.5)
    kept = {"inner": {"keep_optimizer_state": True}}
    assert parse_config(kept).outer.momentum == 0.5  # 20 rounds: outer momentum
    short = {"rounds": {"total": MOMENTUM_ROUNDS - 1}}  # too few rounds for momentum
    assert (parse_config({**kept, **short}).outer.lr, parse_config(short).outer.momentum) == (
        1.0,
        0.0,
    )
    many = {"rounds": {"quorum": MOMENTUM_QUORUM + 1}}  # many contributions: plain averaging
    assert (parse_config(many).outer.lr, parse_config(many).outer.momentum) == (1.0, 0.0)
    assert "quorum" in derived_settings(many)[0]
    one = parse_config({"outer": {"lr": 0.9}, **short})  # an explicit value wins
    assert (one.outer.lr, one.outer.momentum) == (0.9, 0.0)
    window = {"rounds": {"join_window": 0.5}}
    both = {"outer": {"lr": 0.7, "momentum": 0.9}, **window, **SCORED_HERE}
    assert derived_settings(both) == [] and parse_config(both).outer.momentum == 0.9
    lines = derived_settings({"outer": {"lr": 0.7}, **window, **SCORED_HERE})
    assert len(lines) == 1 and lines[0].startswith("outer.momentum = 0.5 (derived: ")
    assert "beyond the" in derived_settings({"rounds": {"total": 500}})[0]
    adam = parse_config({"outer": {"optimizer": "adam"}})  # only Nesterov and SGD derive
    assert derived_settings({"outer": {"optimizer": "adam"}, **window, **SCORED_HERE}) == []
    assert adam.outer.lr == 0.7
    # The join window is derived per round unless set; show names what it is made of.
    (line,) = derived_settings(
        {"outer": {"optimizer": "adam"}, "inner": {"budget": "seconds"}, **SCORED_HERE}
    )
    assert line.startswith("rounds.join_window: derived") and "inner.seconds" in line
    # The resolved config holds the values, so it round-trips to the same hash.
    assert config_hash(parse_config(fresh.model_dump(mode="json"))) == config_hash(fresh)


def test_optimizer_state_and_its_older_name() -> None:
    assert parse_config({"inner": {"keep_optimizer_state": False}}).inner.optimizer_state == "fresh"
    assert parse_config({"inner": {"optimizer_state": "kept"}}).inner.keep_optimizer_state
    with pytest.raises(ConfigError, match="not both"):
        parse_config({"inner": {"keep_optimizer_state": True, "optimizer_state": "kept"}})
    with pytest.raises(ConfigError, match="true or false"):
        parse_config({"inner": {"keep_optimizer_state": "yes"}})
