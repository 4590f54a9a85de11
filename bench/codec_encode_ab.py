"""The int8/int4 encoder of a source tree: payload and residual digests, and its speed.

Usage: .venv/bin/python bench/codec_encode_ab.py SRC_DIR [SRC_DIR ...]

For each source tree (e.g. a worktree's ``src`` at another commit), in a fresh interpreter:
one line of payload:residual sha256 prefixes over int8 and int4, error-feedback decay 1 and
0.95, three rounds with a residual (two trees encode identically iff their lines are equal),
then the best of three int8 encodes of 20M parameters with a residual, in ns per parameter.
Trees alternate over `--repeats` passes (default 3) so that a busy machine slows both alike.
"""

from __future__ import annotations

import subprocess
import sys

CHILD = r"""
import hashlib, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from crowdtrain import codec
from crowdtrain.config import CodecConfig
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
digests = []
for name in ("int8", "int4"):
    for decay in (1.0, 0.95):
        spec = CodecConfig(name=name, ef_decay=decay)
        shapes = {"a": (1000, 1001), "b": (37,), "c": (3, 5, 7)}
        res = {}
        for r in range(3):
            d = {k: torch.randn(s, generator=g) * 10 ** (-r) for k, s in shapes.items()}
            p = codec.encode(d, spec, residual=res)
            rb = b"".join(res[k].numpy().tobytes() for k in sorted(res))
            pair = (hashlib.sha256(p).hexdigest()[:12], hashlib.sha256(rb).hexdigest()[:12])
            digests.append(":".join(pair))
n = 20_000_000
step = {"w": torch.randn(n // 1000, 1000, generator=g) * 1e-3}
res = {"w": torch.zeros(n // 1000, 1000)}
spec = CodecConfig(name="int8")
codec.encode(step, spec, residual=res)
best = float("inf")
for _ in range(3):
    t = time.perf_counter()
    codec.encode(step, spec, residual=res)
    best = min(best, time.perf_counter() - t)
print(" ".join(digests))
print(f"{best / n * 1e9:.2f}")
"""


def main(trees: list[str], repeats: int = 3) -> None:
    speeds: dict[str, list[float]] = {t: [] for t in trees}
    digests: dict[str, str] = {}
    for _ in range(repeats):
        for tree in trees:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, tree], capture_output=True, text=True, check=True
            ).stdout.splitlines()
            digests[tree] = out[0]
            speeds[tree].append(float(out[1]))
    for tree in trees:
        runs = sorted(speeds[tree])
        print(f"{tree}: encode {runs[len(runs) // 2]:.2f} ns/param (median of {len(runs)}: {runs})")
        print(f"  digests {digests[tree]}")
    print("identical bytes and residuals:", len(set(digests.values())) == 1)


if __name__ == "__main__":
    args = sys.argv[1:]
    reps = 3
    if "--repeats" in args:
        i = args.index("--repeats")
        reps = int(args[i + 1])
        del args[i : i + 2]
    main(args, reps)
