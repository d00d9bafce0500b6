"""Does the clustering converge? Weighted K-Medoids on the real DeiT-Tiny at K = 128, 88, 56 after blocks
2, 5, 8 with 0 to 10 iterations, on the 500 shared photos. Writes benchmarks/results/iters_deit_tiny.json.

    .venv/bin/python benchmarks/iters_deit_tiny.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import EARLIER_DEFAULTS, FIXED_LAYERS, FORTY_PERCENT, RESULTS, SHARED_DATA, deit_tiny_weights, imagenet_sample, write_json

import vitpool
from vitpool.evaluate import evaluate
from vitpool.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--out", type=Path, default=RESULTS / "iters_deit_tiny.json")
    args = parser.parse_args()
    base = create_model("deit_tiny", checkpoint=deit_tiny_weights(args.data))
    rows = []
    for iters in (0, 1, 2, 3, 5, 10):
        pooled = vitpool.convert(base, k=FORTY_PERCENT, layers=FIXED_LAYERS, iters=iters, **EARLIER_DEFAULTS)
        result = evaluate(pooled, imagenet_sample(args.data), baseline=base, batch_size=50)
        rows.append({"iters": iters, "top1": result.top1, "agreement": result.agreement, "kl": result.kl, "n": result.n})
        print(json.dumps(rows[-1]), flush=True)
    write_json(args.out, {"method": EARLIER_DEFAULTS["method"], "k": FORTY_PERCENT, "layers": FIXED_LAYERS, "rows": rows})


if __name__ == "__main__":
    main()
