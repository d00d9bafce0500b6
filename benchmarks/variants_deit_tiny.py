"""Proportional attention and weighted-mean outputs, off the shelf: the real DeiT-Tiny on the 500 shared
photos, K = 128, 88, 56 after blocks 2, 5, 8. Writes benchmarks/results/variants_deit_tiny.json.

    .venv/bin/python benchmarks/variants_deit_tiny.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import FIXED_LAYERS, FORTY_PERCENT, RESULTS, SHARED_DATA, deit_tiny_weights, imagenet_sample, run_environment, write_json

from vitpool.adapter import apply_pooling
from vitpool.config import make_config
from vitpool.evaluate import evaluate
from vitpool.flops import total_macs
from vitpool.models import create_model

VARIANTS = [(method, output, proportional)
            for method in ("wkmedoids", "kmedoids") for output in ("medoid", "mean") for proportional in (False, True)]
VARIANTS += [(method, "medoid", proportional) for method in ("wkmeans", "importance", "tome") for proportional in (False, True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--out", type=Path, default=RESULTS / "variants_deit_tiny.json")
    args = parser.parse_args()
    base = create_model("deit_tiny", checkpoint=deit_tiny_weights(args.data))
    baseline_macs = total_macs(base)
    rows = []
    for method, output, proportional in VARIANTS:
        config = make_config(method, FORTY_PERCENT, FIXED_LAYERS, 5, output=output, proportional=proportional, position="after-block")
        model = apply_pooling(base, config)
        result = evaluate(model, imagenet_sample(args.data), baseline=base, batch_size=50)
        rows.append({"method": method, "output": output, "proportional": proportional, "mac_ratio": total_macs(model) / baseline_macs,
                     "top1": result.top1, "agreement": result.agreement, "kl": result.kl, "n": result.n})
        print(json.dumps(rows[-1]), flush=True)
    write_json(args.out, {"model": "deit_tiny_patch16_224 (../shared/data/weights)", "k": FORTY_PERCENT, "layers": FIXED_LAYERS,
                          "env": run_environment(), "rows": rows})


if __name__ == "__main__":
    main()
