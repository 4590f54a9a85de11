"""Optional experiment trackers (Weights & Biases, TensorBoard) for the coordinator's run.

After every closed round the coordinator logs a few numbers (losses, accepted contributions,
bytes moved) with the round as the step, so a run of DiLoCo rounds (Douillard et al. 2023,
arXiv:2311.08105) can be followed in the tools people already use. Both trackers are optional
extras and are imported only when asked for:

- `--wandb` needs `pip install 'crowdtrain[wandb]'`. The run goes to the W&B project
  "crowdtrain"; `WANDB_MODE` is honoured from the environment, and `WANDB_MODE=offline` works
  without an account (sync later with `wandb sync`).
- `--tensorboard DIR` needs `pip install 'crowdtrain[tensorboard]'` and writes event files
  through `torch.utils.tensorboard.SummaryWriter`.

A tracker must never stop the run: `MultiTracker` catches each tracker's
exceptions, warns once per tracker, and keeps going.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Iterable, Mapping
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "MultiTracker",
    "TensorBoardTracker",
    "Tracker",
    "TrackerUnavailable",
    "WandbTracker",
    "open_trackers",
]

log = logging.getLogger(__name__)


@runtime_checkable
class Tracker(Protocol):
    """Somewhere to send a run's numbers, step by step."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record `metrics` at `step` (the round number)."""

    def close(self) -> None:
        """Flush and release the tracker."""


class TrackerUnavailable(RuntimeError):
    """A requested tracker's package is not installed; the message says how to install it."""


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _installed(package: str) -> bool:
    try:
        return find_spec(package) is not None
    except (ImportError, ValueError):
        return False


class WandbTracker:
    """Logs to a Weights & Biases run (`WANDB_MODE=offline` works without an account)."""

    def __init__(self, run_name: str, config: Mapping[str, Any]) -> None:
        wandb = importlib.import_module("wandb")
        self._run: Any = wandb.init(project="crowdtrain", name=run_name, config=dict(config))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._run.log(dict(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


class TensorBoardTracker:
    """Writes TensorBoard event files under `log_dir`, one scalar per metric."""

    def __init__(self, log_dir: Path) -> None:
        module = importlib.import_module("torch.utils.tensorboard")
        self._writer: Any = module.SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            number = float(value)
            if math.isfinite(number):
                self._writer.add_scalar(name, number, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def check_installed(*, wandb: bool, tensorboard: bool) -> None:
    """Raise `TrackerUnavailable` (a one-line install hint) when a requested package is missing."""
    if wandb and not _installed("wandb"):
        raise TrackerUnavailable("--wandb needs the wandb package: pip install 'crowdtrain[wandb]'")
    if tensorboard and not _installed("tensorboard"):
        raise TrackerUnavailable(
            "--tensorboard needs the tensorboard package: pip install 'crowdtrain[tensorboard]'"
        )


def open_trackers(
    *, wandb: bool, tensorboard: Path | None, run_name: str, config: Mapping[str, Any]
) -> list[Tracker]:
    """Open the requested trackers (none, one or both).

    Raises `TrackerUnavailable`, with a one-line install hint, when a requested package is
    missing; nothing is opened in that case.
    """
    check_installed(wandb=wandb, tensorboard=tensorboard is not None)
    trackers: list[Tracker] = []
    try:
        if tensorboard is not None:
            try:
                trackers.append(TensorBoardTracker(tensorboard))
            except ImportError as e:
                raise TrackerUnavailable(
                    f"--tensorboard could not load tensorboard ({_first_line(e)}): "
                    "pip install 'crowdtrain[tensorboard]'"
                ) from e
        if wandb:
            try:
                trackers.append(WandbTracker(run_name, config))
            except ImportError as e:
                raise TrackerUnavailable(
                    f"--wandb could not load wandb ({_first_line(e)}): "
                    "pip install 'crowdtrain[wandb]'"
                ) from e
    except BaseException:
        MultiTracker(trackers).close()
        raise
    return trackers


class MultiTracker:
    """Several trackers as one; a tracker that raises is warned about once and never stops
    the others or the caller."""

    def __init__(self, trackers: Iterable[Tracker]) -> None:
        self.trackers = list(trackers)
        self._warned: set[int] = set()

    def _failed(self, index: int, what: str, error: Exception) -> None:
        if index in self._warned:
            return
        self._warned.add(index)
        name = type(self.trackers[index]).__name__
        log.warning("experiment tracker %s failed to %s (%s); the run goes on", name, what, error)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for i, tracker in enumerate(self.trackers):
            try:
                tracker.log(metrics, step)
            except Exception as e:
                self._failed(i, "log", e)

    def close(self) -> None:
        for i, tracker in enumerate(self.trackers):
            try:
                tracker.close()
            except Exception as e:
                self._failed(i, "close", e)
