"""Accuracy of every pooling method on the real DeiT-Tiny and the 500 shared ImageNet photos, no fine-tuning.

Writes benchmarks/results/accuracy_deit_tiny.json. One schedule that removes about 40% of the MACs:
K = 128, 88, 56 patch tokens after blocks 2, 5, 8 (grid needs K = a*b on the token grid: 121, 81, 49).

    .venv/bin/python benchmarks/accuracy_deit_tiny.py [--data ../shared/data] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import EARLIER_DEFAULTS, EARLIER_ITERS, FIXED_LAYERS, FORTY_PERCENT, RESULTS, SHARED_DATA, deit_tiny_weights, imagenet_sample, run_environment, write_json

import vitpool
from vitpool.evaluate import evaluate
from vitpool.flops import count_macs
from vitpool.methods import METHODS
from vitpool.models import create_model

SCHEDULE = {"k": FORTY_PERCENT, "layers": FIXED_LAYERS}
GRID_SCHEDULE = {"k": [121, 81, 49], "layers": FIXED_LAYERS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "accuracy_deit_tiny.json")
    args = parser.parse_args()
    base = create_model("deit_tiny", checkpoint=deit_tiny_weights(args.data))
    images = imagenet_sample(args.data)
    rows = []
    start = time.perf_counter()
    reference = evaluate(base, images, limit=args.limit)
    rows.append({"method": "unpooled", "k": [], "layers": [], "gmacs": count_macs(base).macs / 1e9, "mac_ratio": 1.0,
                 "pooling_gmacs": 0.0, **{key: reference.to_json()[key] for key in ("top1", "top5", "n")}, "agreement": 100.0, "kl": 0.0})
    for method in METHODS:
        schedule = GRID_SCHEDULE if method == "grid" else SCHEDULE
        model = vitpool.convert(base, **{**EARLIER_DEFAULTS, "method": method}, iters=EARLIER_ITERS, **schedule)
        macs = count_macs(model, baseline=base)
        result = evaluate(model, images, baseline=base, limit=args.limit)
        rows.append({"method": method, **schedule, "gmacs": macs.macs / 1e9, "mac_ratio": macs.ratio,
                     "pooling_gmacs": macs.pooling_macs / 1e9, "top1": result.top1, "top5": result.top5, "n": result.n,
                     "agreement": result.agreement, "kl": result.kl})
        print(json.dumps(rows[-1]), flush=True)
    document = {
        "model": "deit_tiny_patch16_224 (../shared/data/weights, real ImageNet weights)",
        "data": "../shared/data/imagenet-sample (500 photos, one per even ImageNet class)",
        "fine_tuned": False,
        "iters": EARLIER_ITERS,
        "env": run_environment(),
        "seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    write_json(args.out, document)


if __name__ == "__main__":
    main()
