"""Wall time of `vitpool --help` (torch and timm must not be imported by it). Writes benchmarks/results/cli_startup.json.

    .venv/bin/python benchmarks/cli_startup.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, write_json

VITPOOL = Path(sys.executable).parent / "vitpool"
OUT = RESULTS / "cli_startup.json"


def main() -> None:
    times = []
    for _ in range(7):
        start = time.perf_counter()
        subprocess.run([str(VITPOOL), "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    document = {"command": "vitpool --help", "runs": len(times), "median_s": statistics.median(times), "max_s": max(times),
                "python": sys.version.split()[0]}
    write_json(OUT, document)


if __name__ == "__main__":
    main()
