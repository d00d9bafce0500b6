"""The reproduction report: every method at budgets 0.5, 0.6, 0.75 and 0.9 on the real DeiT-Tiny and photos,
no fine-tuning, at one position of the pooling layers, with the budget family's schedules, ToMe as published,
and (with --calibration N) searched schedules (`vitpool schedule`).

This is `vitpool sweep`: every method in the default preset's setting (mean outputs for the K-Medoids methods,
proportional attention, the late family; 5 clustering iterations, as when it was recorded) at the position given; with --calibration N the schedules are
searched on N of the 500 photos and every point, the family's included, is scored on the others. Writes
benchmarks/results/reproduction_deit_tiny_<position>/ (results.json, results.csv, tradeoff.png); resumable
like any sweep.

    .venv/bin/python benchmarks/reproduction_deit_tiny.py --position after-attention --calibration 100
    .venv/bin/python benchmarks/reproduction_deit_tiny.py --position after-block --calibration 100
"""

from __future__ import annotations

import argparse
import time

from _common import EARLIER_ITERS, RESULTS, deit_tiny_weights, imagenet_sample

from vitpool.config import POSITIONS, make_config
from vitpool.methods import METHODS
from vitpool.models import create_model
from vitpool.sweep import parse_budgets, parse_methods, sweep, sweep_settings

WEIGHTS = deit_tiny_weights()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--budgets", default="0.5,0.6,0.75,0.9")
    parser.add_argument("--position", choices=POSITIONS, default="after-attention")
    parser.add_argument("--calibration", type=int, default=100, help="0: family schedules only, scored on all photos")
    args = parser.parse_args()
    model = create_model("deit_tiny", checkpoint=WEIGHTS).eval()
    data = imagenet_sample()
    calibration = args.calibration or None
    settings = sweep_settings("deit_tiny_patch16_224", WEIGHTS, False, data, None, "vitpool",
                              make_config(layers=(), position=args.position, iters=EARLIER_ITERS), calibration)
    started = time.perf_counter()
    out = RESULTS / f"reproduction_deit_tiny_{args.position}"
    results = sweep(model, settings, out, parse_methods(args.methods), parse_budgets(args.budgets), calibration=calibration,
                    on_progress=lambda text, done, total: print(f"[{done}/{total}] {text} ({time.perf_counter() - started:.0f} s)", flush=True))
    print(f"{len(results.rows)} points in {out}")


if __name__ == "__main__":
    main()
