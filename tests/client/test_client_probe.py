"""The hardware probe: auto picks the best available device; a missing one is a clear error."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from crowdtrain.client.probe import cpu_name, default_threads, probe_device
from crowdtrain.client.transfer import ClientError


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the probe see a machine without CUDA or MPS, wherever the test runs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.usefixtures("cpu_only")
def test_auto_picks_the_cpu_on_a_machine_without_accelerators() -> None:
    info = probe_device()
    assert info.kind == "cpu"
    assert info.threads == default_threads() >= 1
    assert info.name and info.torch_version == torch.__version__
    assert info.memory_bytes is None or info.memory_bytes > 0
    assert info.to_json() == {"kind": "cpu", "threads": info.threads, "name": info.name[:64]}


@pytest.mark.usefixtures("cpu_only")
def test_requested_cuda_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(ClientError) as info:
        probe_device("cuda")
    assert str(info.value) == (
        "--device cuda was requested but CUDA is not available on this machine; use --device cpu"
    )
    with pytest.raises(ClientError, match="--device mps was requested"):
        probe_device("mps")


@pytest.mark.usefixtures("cpu_only")
def test_threads_and_choices_are_checked() -> None:
    assert probe_device("cpu", threads=3).threads == 3
    with pytest.raises(ClientError, match="at least 1"):
        probe_device("cpu", threads=0)
    with pytest.raises(ClientError, match="unknown --device 'tpu'"):
        probe_device("tpu")


def test_auto_prefers_cuda_when_it_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    props = SimpleNamespace(name="Fake GPU", total_memory=8 << 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    info = probe_device("auto", threads=2)
    assert (info.kind, info.name, info.memory_bytes, info.threads) == (
        "cuda",
        "Fake GPU",
        8 << 30,
        2,
    )


def test_auto_takes_mps_when_there_is_no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert probe_device().kind == "mps"


def test_the_cpu_name_comes_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t:   Example  CPU @ 3.0GHz\nflags : x\n")
    assert cpu_name(info) == "Example CPU @ 3.0GHz"
    assert cpu_name(tmp_path / "missing")  # falls back to platform
