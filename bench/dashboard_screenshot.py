"""Screenshot the dashboard during a real demo run: docs/dashboard.png.

Starts `crowdtrain demo --keep-serving` (with its arguments: by default 4 volunteers, one of
them a `scale1000` attacker so that the rejections table has something in it), waits until
ROUNDS rounds have closed, opens the dashboard in headless chromium (Debian's, through
Playwright) and saves a full-page screenshot; then stops the demo with Ctrl-C (SIGINT).

    .venv/bin/python bench/dashboard_screenshot.py [--rounds 6] [--out docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def newest_server(runs: Path, since: float) -> dict[str, str] | None:
    for path in sorted(runs.glob("demo-*/server.json"), key=os.path.getmtime, reverse=True):
        if path.stat().st_mtime >= since:
            return dict(json.loads(path.read_text()))
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="closed rounds before the shot")
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument("--attack", default="scale1000")
    args = parser.parse_args()
    started = time.time()
    cmd = [sys.executable, "-m", "crowdtrain.cli", "demo", "--keep-serving"]
    if args.attack:
        cmd += ["--attack", args.attack]
    demo = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server = None
        while server is None:
            assert demo.poll() is None, "the demo exited before its coordinator started"
            time.sleep(0.5)
            server = newest_server(Path("runs"), started)
        url = server["url"]
        while True:
            assert demo.poll() is None, "the demo exited early"
            rounds = httpx.get(f"{url}/v1/status", timeout=10).json()["rounds"]
            if len(rounds) >= args.rounds:
                break
            time.sleep(1.0)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{url}/")
            page.wait_for_function("Number(document.body.dataset.polls || 0) >= 2")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
        print(f"saved {args.out} after {len(rounds)} rounds ({url})")
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(timeout=60)
        except subprocess.TimeoutExpired:
            demo.kill()


if __name__ == "__main__":
    main()
