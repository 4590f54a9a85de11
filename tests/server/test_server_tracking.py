"""Tests of `crowdtrain.server.tracking`: install hints when a package is missing, trackers
driven through fake modules (no wandb or tensorboard needed), and a tracker that raises never
stopping the others. Real TensorBoard event files are checked only where tensorboard is installed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import math
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest

from crowdtrain.server import tracking
from crowdtrain.server.tracking import (
    MultiTracker,
    TensorBoardTracker,
    Tracker,
    TrackerUnavailable,
    WandbTracker,
    open_trackers,
)


def missing(*names: str) -> Any:
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name in names else real(name, package)

    return find_spec


def present(*names: str) -> Any:
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        if name in names:
            return importlib.machinery.ModuleSpec(name, None)
        return real(name, package)

    return find_spec


def test_no_trackers_requested() -> None:
    assert open_trackers(wandb=False, tensorboard=None, run_name="r", config={}) == []


def test_missing_wandb_gives_a_one_line_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking, "find_spec", missing("wandb"))
    with pytest.raises(TrackerUnavailable) as info:
        open_trackers(wandb=True, tensorboard=None, run_name="r", config={})
    message = str(info.value)
    assert "\n" not in message
    assert message == "--wandb needs the wandb package: pip install 'crowdtrain[wandb]'"
    assert isinstance(info.value, RuntimeError)


def test_missing_tensorboard_gives_a_one_line_install_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tracking, "find_spec", missing("tensorboard"))
    with pytest.raises(TrackerUnavailable) as info:
        open_trackers(wandb=False, tensorboard=tmp_path, run_name="r", config={})
    message = str(info.value)
    assert "\n" not in message
    assert "pip install 'crowdtrain[tensorboard]'" in message
    assert message.startswith("--tensorboard needs the tensorboard package")
    assert not any(tmp_path.iterdir())  # nothing opened


def test_broken_tensorboard_install_gives_a_one_line_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tracking, "find_spec", present("tensorboard"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(TrackerUnavailable) as info:
        open_trackers(wandb=False, tensorboard=tmp_path, run_name="r", config={})
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("--tensorboard could not load tensorboard (")


def test_wandb_failing_closes_the_trackers_already_open(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr(tracking, "find_spec", present("tensorboard", "wandb"))
    FakeWriter.instances.clear()
    with pytest.raises(TrackerUnavailable, match=r"^--wandb could not load wandb"):
        open_trackers(wandb=True, tensorboard=tmp_path, run_name="r", config={})
    (writer,) = FakeWriter.instances
    assert writer.closed


class FakeWandbRun:
    def __init__(self, calls: list[tuple[str, Any]]) -> None:
        self.calls = calls

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append(("log", (metrics, step)))

    def finish(self) -> None:
        self.calls.append(("finish", None))


def test_wandb_tracker_through_a_fake_module(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Any]] = []
    fake = types.ModuleType("wandb")

    def init(**kwargs: Any) -> FakeWandbRun:
        calls.append(("init", kwargs))
        return FakeWandbRun(calls)

    fake.init = init  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(tracking, "find_spec", present("wandb"))
    config = {"lr": 0.7, "model": {"name": "gpt"}}
    (tracker,) = open_trackers(wandb=True, tensorboard=None, run_name="run-1", config=config)
    assert isinstance(tracker, WandbTracker)
    assert isinstance(tracker, Tracker)
    tracker.log({"eval_loss": 2.5}, step=3)
    tracker.close()
    assert calls == [
        ("init", {"project": "crowdtrain", "name": "run-1", "config": config}),
        ("log", ({"eval_loss": 2.5}, 3)),
        ("finish", None),
    ]


class FakeWriter:
    instances: ClassVar[list[FakeWriter]] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.scalars: list[tuple[str, float, int]] = []
        self.flushes = 0
        self.closed = False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.scalars.append((tag, value, global_step))

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


def test_tensorboard_tracker_through_a_fake_writer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    monkeypatch.setattr(tracking, "find_spec", present("tensorboard"))
    FakeWriter.instances.clear()
    (tracker,) = open_trackers(wandb=False, tensorboard=tmp_path, run_name="r", config={})
    assert isinstance(tracker, TensorBoardTracker)
    tracker.log({"eval_loss": 2.5, "train_loss": math.nan, "bytes": math.inf, "n": 4}, step=7)
    tracker.close()
    (writer,) = FakeWriter.instances
    assert writer.log_dir == str(tmp_path)
    assert writer.scalars == [("eval_loss", 2.5, 7), ("n", 4.0, 7)]  # non-finite skipped
    assert writer.flushes == 1
    assert writer.closed


class Recorder:
    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, float], int]] = []
        self.closed = False

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.logged.append((dict(metrics), step))

    def close(self) -> None:
        self.closed = True


class Broken:
    def log(self, metrics: Mapping[str, float], step: int) -> None:
        raise ConnectionError("tracker server unreachable")

    def close(self) -> None:
        raise OSError("disk full")


def test_multitracker_survives_a_raising_tracker_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = Recorder()
    multi = MultiTracker([Broken(), good])
    assert isinstance(multi, Tracker)
    with caplog.at_level(logging.WARNING, logger="crowdtrain.server.tracking"):
        for step in range(3):
            multi.log({"loss": 1.0 + step}, step)
        multi.close()
    assert good.logged == [({"loss": 1.0}, 0), ({"loss": 2.0}, 1), ({"loss": 3.0}, 2)]
    assert good.closed
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per tracker, not once per call
    assert "Broken" in warnings[0].getMessage()
    assert "tracker server unreachable" in warnings[0].getMessage()


@pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None,
    reason="the tensorboard package is not installed (the crowdtrain[tensorboard] extra)",
)
def test_real_tensorboard_writes_event_files(tmp_path: Path) -> None:
    log_dir = tmp_path / "tb"
    (tracker,) = open_trackers(wandb=False, tensorboard=log_dir, run_name="r", config={})
    tracker.log({"eval_loss": 2.5, "train_loss": math.nan}, step=1)
    tracker.log({"eval_loss": 2.25}, step=2)
    tracker.close()
    events = list(log_dir.glob("events.out.tfevents.*"))
    assert events
    assert events[0].stat().st_size > 0
