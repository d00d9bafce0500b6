"""What every benchmark script here shares: where results go and how they are written (atomically)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_json(path: Path, document) -> None:
    """Written atomically, so an interrupted run leaves the old results intact."""
    from vitpool.errors import write_atomically

    write_atomically(path, json.dumps(document, indent=2) + "\n")
    print(f"wrote {path}")


def run_environment(device: str = "cpu") -> dict:
    """vitpool.bench's environment record for `device`, plus vitpool's version."""
    import torch

    import vitpool
    from vitpool.bench import environment

    return {**environment(device, torch.get_num_threads()), "vitpool": vitpool.__version__}
