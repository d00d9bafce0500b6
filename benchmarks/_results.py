"""What every benchmark script here shares: where results go and how they are written (atomically)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_json(path: Path, document) -> None:
    """Write through a temporary file and rename, so an interrupted run leaves the old results intact."""
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(document, indent=2) + "\n")
    staging.replace(path)
    print(f"wrote {path}")


def cpu_environment() -> dict:
    """vitpool.bench's environment record on the CPU, plus vitpool's version."""
    import torch

    import vitpool
    from vitpool.bench import environment

    return {**environment("cpu", torch.get_num_threads()), "vitpool": vitpool.__version__}
