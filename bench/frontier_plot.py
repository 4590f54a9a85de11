"""Redraw the frontier PNG from a `crowdtrain bench algo --frontier --json` document.

Usage:
  .venv/bin/python bench/frontier_plot.py bench/results/algo-frontier-quick.json \\
      docs/algo-frontier.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from crowdtrain.benchmarks.algo import plot_frontier

if __name__ == "__main__":
    print(f"wrote {plot_frontier(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))}")
