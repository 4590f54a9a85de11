"""What a registration flood and an oversized register body cost a running coordinator.

    .venv/bin/python bench/register_flood.py [--body-mb 200] [--flood 300]

Starts `crowdtrain serve` (a tiny run on the standard library, state in a temporary
directory, port 0), then on 127.0.0.1: (1) POSTs one register body of BODY_MB megabytes
(streamed, no Content-Length) and reports the status, the seconds until the answer and the
coordinator's peak RSS before and after (sampled every 50 ms with psutil); (2) sends FLOOD
registrations from this one address as fast as it can and counts the answers by status; (3)
times `GET /v1/status` during the flood. Prints one line each and JSON last. Runs at an older
commit too (the same command line, for before/after).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from load_volunteers import Sampler

CONFIG = """
name = "flood"
[model]
arch = "gpt"
width = 32
depth = 1
heads = 2
context = 32
[data]
dir = "{data}"
[rounds]
total = 2
quorum = 2
deadline_s = 600.0
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--body-mb", type=int, default=200)
    ap.add_argument("--flood", type=int, default=300)
    args = ap.parse_args()
    doc: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "run.toml"
        config.write_text(CONFIG.format(data=Path("data/stdlib").resolve()))
        state = Path(tmp) / "state"
        cli = [sys.executable, "-m", "crowdtrain.cli", "serve", "--config", str(config)]
        server = subprocess.Popen(
            [*cli, "--state", str(state), "--port", "0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "COLUMNS": "200"},
        )
        try:
            deadline = time.monotonic() + 120
            while not (state / "server.json").exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the coordinator did not start")
                time.sleep(0.1)
            url = json.loads((state / "server.json").read_text())["url"]
            rss = Sampler(server.pid)
            time.sleep(0.5)
            doc["rss_idle_mb"] = rss.reset() / 2**20

            def body() -> Any:
                yield b'{"name": "big", "device": {"kind": "cpu"}, "pad": "'
                chunk = b"a" * (1 << 20)
                for _ in range(args.body_mb):
                    yield chunk
                yield b'"}'

            t0 = time.perf_counter()
            try:
                r = httpx.post(f"{url}/v1/register", content=body(), timeout=600)
                status: Any = r.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            doc["big_body"] = {
                "mb": args.body_mb,
                "status": status,
                "seconds": round(time.perf_counter() - t0, 2),
                "peak_rss_mb": round(rss.reset() / 2**20, 1),
            }
            print(f"{args.body_mb} MB register body: {doc['big_body']}", flush=True)
            statuses: Counter[Any] = Counter()
            status_ms: list[float] = []
            stop = threading.Event()

            def probe() -> None:
                with httpx.Client(timeout=30) as c:
                    while not stop.is_set():
                        t = time.perf_counter()
                        c.get(f"{url}/v1/status")
                        status_ms.append(1000 * (time.perf_counter() - t))
                        time.sleep(0.1)

            prober = threading.Thread(target=probe)
            prober.start()
            t0 = time.perf_counter()
            with httpx.Client(timeout=30) as c:
                for n in range(args.flood):
                    dev = {"kind": "cpu", "threads": 1, "name": "x"}
                    body_json = {"name": f"sybil-{n}", "device": dev}
                    statuses[c.post(f"{url}/v1/register", json=body_json).status_code] += 1
            seconds = time.perf_counter() - t0
            stop.set()
            prober.join()
            status_ms.sort()
            doc["flood"] = {
                "requests": args.flood,
                "seconds": round(seconds, 2),
                "answers": {str(k): v for k, v in sorted(statuses.items())},
                "status_p50_ms": round(status_ms[len(status_ms) // 2], 1) if status_ms else None,
                "status_max_ms": round(status_ms[-1], 1) if status_ms else None,
                "peak_rss_mb": round(rss.reset() / 2**20, 1),
            }
            print(f"{args.flood} registrations from one address: {doc['flood']}", flush=True)
            rss.stop()
        finally:
            server.kill()
            server.wait()
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
