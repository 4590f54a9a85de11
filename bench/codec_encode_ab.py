"""The int8/int4 encoder of a source tree: payload and residual digests, and its speed.

Usage: .venv/bin/python bench/codec_encode_ab.py SRC_DIR   (e.g. a worktree's src at another commit)

Prints one line of payload:residual sha256 prefixes over int8 and int4, error-feedback decay 1
and 0.95, three rounds with a residual (two trees encode identically iff the lines are equal),
and on stderr the best of three encodes of 20M parameters with a residual, in ns per parameter.
"""

import sys, hashlib, torch, time

sys.path.insert(0, sys.argv[1])
from crowdtrain import codec
from crowdtrain.config import CodecConfig

torch.set_num_threads(1)
out = []
g = torch.Generator().manual_seed(0)
for name in ("int8", "int4"):
    for decay in (1.0, 0.95):
        spec = CodecConfig(name=name, ef_decay=decay)
        shapes = {"a": (1000, 1001), "b": (37,), "c": (3, 5, 7)}
        res = {}
        for r in range(3):
            d = {k: torch.randn(s, generator=g) * 10 ** (-r) for k, s in shapes.items()}
            p = codec.encode(d, spec, residual=res)
            out.append(
                hashlib.sha256(p).hexdigest()[:12]
                + ":"
                + hashlib.sha256(
                    b"".join(res[k].numpy().tobytes() for k in sorted(res))
                ).hexdigest()[:12]
            )
print(" ".join(out))
n = 20_000_000
step = {"w": torch.randn(n // 1000, 1000) * 1e-3}
res = {"w": torch.zeros(n // 1000, 1000)}
spec = CodecConfig(name="int8")
codec.encode(step, spec, residual=res)
ts = []
for _ in range(3):
    t = time.perf_counter()
    codec.encode(step, spec, residual=res)
    ts.append(time.perf_counter() - t)
print("encode ns/param", round(min(ts) / n * 1e9, 1), file=sys.stderr)
