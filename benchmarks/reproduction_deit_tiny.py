"""The reproduction report: every method at budgets 0.5, 0.6, 0.75 and 0.9 on the real DeiT-Tiny and photos,
no fine-tuning, with the budget family's schedules and with searched ones (`vitpool schedule`).

This is `vitpool sweep --search 100`: the schedules are searched on 100 of the 500 photos and every point,
the family's included, is scored on the other 400. Writes benchmarks/results/reproduction_deit_tiny/
(results.json, results.csv, tradeoff.png); resumable like any sweep.

    .venv/bin/python benchmarks/reproduction_deit_tiny.py [--methods ...] [--output medoid|mean]
"""

from __future__ import annotations

import argparse
import time

from _results import RESULTS, SHARED_DATA

from vitpool.config import METHODS, PoolingConfig
from vitpool.models import create_model
from vitpool.sweep import parse_budgets, parse_methods, sweep, sweep_settings

WEIGHTS = SHARED_DATA / "weights" / "deit_tiny_patch16_224.pth"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--budgets", default="0.5,0.6,0.75,0.9")
    parser.add_argument("--output", default="medoid", help="K-Medoids outputs (medoid or mean)")
    parser.add_argument("--calibration", type=int, default=100)
    args = parser.parse_args()
    model = create_model("deit_tiny", checkpoint=WEIGHTS).eval()
    data = SHARED_DATA / "imagenet-sample"
    name = "reproduction_deit_tiny" + ("" if args.output == "medoid" else f"_{args.output}")
    settings = sweep_settings("deit_tiny_patch16_224", WEIGHTS, False, data, None, PoolingConfig(output=args.output),
                              args.calibration)
    started = time.perf_counter()
    results = sweep(model, settings, RESULTS / name, parse_methods(args.methods), parse_budgets(args.budgets),
                    calibration=args.calibration,
                    on_progress=lambda text, done, total: print(f"[{done}/{total}] {text} ({time.perf_counter() - started:.0f} s)", flush=True))
    print(f"{len(results.rows)} points in {RESULTS / name}")


if __name__ == "__main__":
    main()
