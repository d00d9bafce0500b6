"""What fewer clustering iterations and fewer pooling layers cost the default in accuracy, the two levers on
its batch-1 pooling time (each iteration and each layer is a fixed run of small graph nodes).

The vitpool preset on the real DeiT-Tiny and the 500 shared photos (halves A and B as in
defaults_deit_tiny.py), no fine-tuning, at MAC budgets 0.5, 0.6 and 0.75 (pooling included, so fewer
iterations leave a little more for the tokens), with 0 to 5 K-Medoids iterations and the pooling layers in
the preset's blocks (every block from 3 to 10) or in fewer. Writes benchmarks/results/iters_layers_deit_tiny.json.

    .venv/bin/python benchmarks/iters_layers_deit_tiny.py [--budgets 0.5,0.6,0.75] [--iters 0,1,2,3,5]
"""

from __future__ import annotations

import argparse
import time

from _common import RESULTS, imagenet_sample, run_environment, write_json
from defaults_deit_tiny import WEIGHTS, halves, scored

from vitpool.budget import solve
from vitpool.config import make_config
from vitpool.flops import count_macs
from vitpool.models import create_model
from vitpool.evaluate import load_images

PLACEMENTS = (None, (4, 7, 10), (4, 8))  # None: the preset's blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="0.5,0.6,0.75")
    parser.add_argument("--iters", default="0,1,2,3,5")
    args = parser.parse_args()
    model = create_model("deit_tiny", checkpoint=WEIGHTS)
    parts = halves(load_images(model, imagenet_sample(), None))
    baseline_macs = count_macs(model).macs
    rows, started = [], time.perf_counter()
    for layers in PLACEMENTS:
        for iters in (int(i) for i in args.iters.split(",")):
            template = make_config(layers=(), iters=iters)
            for budget in (float(b) for b in args.budgets.split(",")):
                config = solve(model, template, budget, layers=layers)[0]
                rows.append({"iters": iters, "budget": budget, **scored(model, config, parts, baseline_macs)})
                print(f"[{time.perf_counter() - started:.0f} s] blocks {config.layers}, {iters} iterations, {budget}: "
                      f"A {rows[-1]['A']['agreement']:.1f}, B {rows[-1]['B']['agreement']:.1f}, "
                      f"all {rows[-1]['all']['agreement']:.1f}, KL {rows[-1]['all']['kl']:.4f}", flush=True)
    write_json(RESULTS / "iters_layers_deit_tiny.json", {
        "model": "deit_tiny_patch16_224 (../shared/data/weights)", "images": "../shared/data/imagenet-sample",
        "halves": "A: even positions in the folder's sorted order, B: odd", "env": run_environment(), "rows": rows})


if __name__ == "__main__":
    main()
