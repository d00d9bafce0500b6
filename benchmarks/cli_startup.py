"""Wall time of `vitpool --help` (torch and timm must not be imported by it). Writes benchmarks/results/cli_startup.json.

    .venv/bin/python benchmarks/cli_startup.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

VITPOOL = Path(sys.executable).parent / "vitpool"
OUT = Path(__file__).resolve().parent / "results" / "cli_startup.json"

times = []
for _ in range(7):
    start = time.perf_counter()
    subprocess.run([str(VITPOOL), "--help"], check=True, capture_output=True)
    times.append(time.perf_counter() - start)
document = {"command": "vitpool --help", "runs": len(times), "median_s": statistics.median(times), "max_s": max(times),
            "python": sys.version.split()[0]}
OUT.with_suffix(".json.tmp").write_text(json.dumps(document, indent=2) + "\n")
OUT.with_suffix(".json.tmp").replace(OUT)
print(json.dumps(document))
