"""What one protocol snapshot costs the coordinator as the number of peers grows.

Usage: .venv/bin/python bench/snapshot_cost.py [PEERS ...]   (default 100 1000 2000)

Every new work order and every accepted contribution persists the protocol snapshot under the
coordinator's lock (docs/RELIABILITY.md, "The control plane under load"). For each count, a
coordinator of the tiny benchmark model with that many registered peers, each holding a work
order of the open round; prints the median of 5 of: building the snapshot document
(`RoundProtocol.snapshot`), encoding it as JSON, and the whole persist (`_persist_snapshot`,
with its SQLite write), in milliseconds, and the document's size.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from crowdtrain.benchmarks.coordinator import bench_config
from crowdtrain.server.admission import AdmissionConfig
from crowdtrain.server.coordinator import Coordinator


def measure(peers: int) -> dict[str, float]:
    config = bench_config("tiny", peers, 1)
    with tempfile.TemporaryDirectory(prefix="crowdtrain-snapshot-") as tmp:
        coord = Coordinator(
            config,
            Path(tmp) / "state",
            admission=AdmissionConfig(address_burst=0, global_burst=0),
            eval_batch_count=1,
        )
        try:
            ids = [coord.register(f"peer-{i}", {})["peer_id"] for i in range(peers)]
            for peer_id in ids:
                coord.work(peer_id)  # one order each: what a round holds at its busiest
            build, encode, persist = [], [], []
            size = 0
            for _ in range(5):
                t0 = time.perf_counter()
                doc = coord.protocol.snapshot()
                t1 = time.perf_counter()
                size = len(json.dumps(doc))
                t2 = time.perf_counter()
                coord._persist_snapshot()
                t3 = time.perf_counter()
                build.append(t1 - t0)
                encode.append(t2 - t1)
                persist.append(t3 - t2)
        finally:
            coord.shutdown()
    return {
        "peers": peers,
        "snapshot_ms": statistics.median(build) * 1e3,
        "json_ms": statistics.median(encode) * 1e3,
        "persist_ms": statistics.median(persist) * 1e3,
        "bytes": size,
    }


def main(counts: list[int]) -> None:
    for n in counts:
        r = measure(n)
        print(
            f"{r['peers']:>6} peers: snapshot {r['snapshot_ms']:.1f} ms, json "
            f"{r['json_ms']:.1f} ms, persist {r['persist_ms']:.1f} ms, {r['bytes']:,} bytes",
            flush=True,
        )


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [100, 1000, 2000])
