"""What every benchmark script here shares: the real data, the fixed schedules of earlier measurements, where
results go and how they are written (atomically), and the environment record."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# The fixed schedules and the settings that the speed, iteration and fine-tuning measurements before the
# vitpool preset were made with (the defaults of the day: the paper preset with proportional attention), kept so
# that those scripts still measure what they recorded. The clustering now also weighs each token by its cluster
# size when proportional attention is on, so accuracy figures move within noise (wkmedoids at K 128, 88, 56
# after blocks 2, 5, 8: top-1 74.0 / agreement 83.8 / KL 0.175, recorded 74.8 / 84.2 / 0.173).
FIXED_SCHEDULES = {"minus25": [160, 128, 100], "minus40": [128, 88, 56], "minus50": [100, 64, 36]}
FIXED_LAYERS = [2, 5, 8]
FORTY_PERCENT = FIXED_SCHEDULES["minus40"]  # the DeiT-Tiny accuracy scripts' schedule too (0.594 of its MACs)
EARLIER_DEFAULTS = {"method": "wkmedoids", "output": "medoid", "position": "after-block", "proportional": True}
EARLIER_ITERS = 5  # the clustering iterations of those runs and of the reproduction report (the default is now 2)


def deit_tiny_weights(data: Path = SHARED_DATA) -> Path:
    """The real DeiT-Tiny's state dict in a data folder laid out as ../shared/data (see its README)."""
    return data / "weights" / "deit_tiny_patch16_224.pth"


def imagenet_sample(data: Path = SHARED_DATA) -> Path:
    """The 500 labelled ImageNet photos (one per even class) in a data folder laid out as ../shared/data."""
    return data / "imagenet-sample"


def write_json(path: Path, document) -> None:
    """Written atomically, so an interrupted run leaves the old results intact."""
    from vitpool.outputs import write_atomically

    write_atomically(path, json.dumps(document, indent=2) + "\n")
    print(f"wrote {path}")


def run_environment(device: str = "cpu") -> dict:
    """vitpool.bench's environment record for `device`, plus vitpool's version."""
    import torch

    import vitpool
    from vitpool.bench import environment

    return {**environment(device, torch.get_num_threads()), "vitpool": vitpool.__version__}
