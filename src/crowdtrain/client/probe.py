"""Hardware probe: which device a volunteer trains on, with how many threads and how much memory.

Volunteer machines are heterogeneous (the design's objection 2): laptops next to gaming PCs,
CPU next to GPU. The client reports what it has when it registers, so the coordinator can size
its work (DiLoCo's time budgets let fast and slow machines fit the same round; Douillard et al.
2023, arXiv:2311.08105). `auto` picks CUDA, then Apple MPS, then the CPU.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from crowdtrain.client.transfer import ClientError

DeviceKind = Literal["cpu", "cuda", "mps"]
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
MAX_NAME = 64
_CPUINFO = Path("/proc/cpuinfo")
_CPU_KEYS = ("model name", "Hardware", "Processor")


@dataclass(frozen=True)
class DeviceInfo:
    """The device a volunteer trains on."""

    kind: DeviceKind
    name: str
    threads: int
    memory_bytes: int | None
    torch_version: str

    def to_json(self) -> dict[str, Any]:
        """The `device` object of `POST /v1/register`."""
        return {"kind": self.kind, "threads": self.threads, "name": self.name[:MAX_NAME]}


def default_threads() -> int:
    """CPU threads this process may use (its CPU affinity where the OS reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cpu_name(cpuinfo: Path = _CPUINFO) -> str:
    """The CPU's model name from /proc/cpuinfo when present, else what `platform` reports."""
    try:
        with cpuinfo.open("r", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in _CPU_KEYS and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def system_memory() -> int | None:
    """Physical memory in bytes, where the OS reports it."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * size if pages > 0 and size > 0 else None


def _mps_available(torch: Any) -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def probe_device(requested: str = "auto", threads: int | None = None) -> DeviceInfo:
    """Probe the device to train on: REQUESTED ("auto", "cpu", "cuda" or "mps") if available.

    Raises ClientError for an unknown choice, a device that is not available, or a thread
    count below 1.
    """
    if requested not in DEVICE_CHOICES:
        raise ClientError(f"unknown --device {requested!r}; use one of {', '.join(DEVICE_CHOICES)}")
    if threads is not None and threads < 1:
        raise ClientError(f"--threads must be at least 1, not {threads}")
    import torch

    n_threads = threads if threads is not None else default_threads()
    version = str(torch.__version__)
    cuda = bool(torch.cuda.is_available())
    if requested == "cuda" and not cuda:
        raise ClientError(
            "--device cuda was requested but CUDA is not available on this machine; "
            "use --device cpu"
        )
    mps = _mps_available(torch)
    if requested == "mps" and not mps:
        raise ClientError(
            "--device mps was requested but Apple MPS is not available on this machine; "
            "use --device cpu"
        )
    if requested == "cuda" or (requested == "auto" and cuda):
        props = torch.cuda.get_device_properties(0)
        return DeviceInfo("cuda", str(props.name), n_threads, int(props.total_memory), version)
    if requested == "mps" or (requested == "auto" and mps):
        memory: int | None = None
        recommended = getattr(getattr(torch, "mps", None), "recommended_max_memory", None)
        if recommended is not None:
            try:
                memory = int(recommended())
            except RuntimeError:
                memory = None
        return DeviceInfo("mps", "Apple GPU (MPS)", n_threads, memory or system_memory(), version)
    return DeviceInfo("cpu", cpu_name(), n_threads, system_memory(), version)
