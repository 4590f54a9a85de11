"""Aggregating 32 contributions to a 10.4M-parameter model must not hold them all in memory.

Naively stacking 32 float32 contributions of 10.4M parameters takes 32 × 42 MB ≈ 1.3 GB. The
contributions are written to disk one at a time and read back through SafetensorsFileSource;
each aggregation runs in a fresh Python process that reports its peak RSS (VmHWM) above
its RSS after imports, and that extra must stay far below what a naive implementation needs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

SHAPES = {"a": (2048, 2048), "b": (4096, 1024), "c": (2_000_000,)}  # 10,388,608 parameters
COUNT = 32
NAIVE_MIB = COUNT * 10_388_608 * 4 / 2**20  # ≈ 1268 MiB
LIMIT_MIB = 400

SCRIPT = r"""
import json, resource, sys
import torch

torch.set_num_threads(1)  # the test machine's cores are shared; one thread is steadiest
from crowdtrain.config import AggregationConfig
from crowdtrain.robust import SafetensorsFileSource, aggregate

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

folder, method, bucket = sys.argv[1], sys.argv[2], int(sys.argv[3])
shapes = {"a": (2048, 2048), "b": (4096, 1024), "c": (2_000_000,)}
sources = [SafetensorsFileSource(f"{folder}/c{i}.safetensors") for i in range(32)]
torch.zeros(8).add_(1)  # let torch set up its thread pool before the baseline
base = rss_mib()
cfg = AggregationConfig(method=method, bucket_size=bucket, fragment_numel=1 << 20)
result = aggregate(sources, [float(1 + i % 5) for i in range(32)], shapes, cfg, seed=3)
# VmHWM, this process's own peak: ru_maxrss survives fork and exec, so it would report the
# parent's (a pytest worker's) peak whenever that is larger.
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

# Spot-check a slice against a direct whole-slice computation.
x = torch.stack([s.read("b", 1000, 1100) for s in sources])
if method == "median" and bucket == 1:
    expected = x.sort(0).values[15:17].mean(0)
    assert torch.allclose(result.delta["b"].reshape(-1)[1000:1100], expected)
print(json.dumps({
    "extra_mib": peak - base,
    "distances": len(result.distances),
    "finite": all(torch.isfinite(t).all().item() for t in result.delta.values()),
    "tau": result.tau,
}))
"""


@pytest.fixture(scope="module")
def contribution_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("robust_memory")
    for i in range(COUNT):  # one at a time: only one contribution is ever in this process
        gen = torch.Generator().manual_seed(i)
        contribution = {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}
        save_file(contribution, str(folder / f"c{i}.safetensors"))
        del contribution
    yield folder
    shutil.rmtree(folder, ignore_errors=True)  # 1.3 GB: do not leave it for pytest to keep


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(("method", "bucket"), [("centered_clip", 2), ("median", 1)])
def test_peak_memory_does_not_grow_with_contributions(
    contribution_dir: Path, method: str, bucket: int
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(contribution_dir), method, str(bucket)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["distances"] == COUNT
    assert report["finite"]
    assert (report["tau"] is not None) == (method == "centered_clip")
    print(f"{method} bucket={bucket}: extra peak RSS {report['extra_mib']:.0f} MiB")
    assert report["extra_mib"] < LIMIT_MIB < NAIVE_MIB / 3
