"""Would the default schedule do better with another shape? `vitpool.budget.solve(..., shape=p, floor=f)` on two models.

The default preset pools in every block from depth/4 and keeps K_i = N r^((i+1)^p) patch tokens in its i-th
pooling layer, r solved to the MAC budget: p = 1 keeps the same fraction in every layer; p < 1 removes less in
each later layer (more tokens reach the last blocks), p > 1 more. No layer keeps fewer than f N tokens (or than
its first layer keeps), and layers that then keep every token are left out. The default's p follows the budget
(`budget.default_shape`) and its f is `budget.LATE_FLOOR`, chosen from these rows. On the real DeiT-Tiny: agreement, top-1 and KL on the two halves
of the 500 shared photos (even and odd positions, as defaults_deit_tiny.py); on CLIP ViT-B/16's image tower
(`--model clip`, built on demand as in clip_embeddings.py): cosine to the unpooled embedding and the share of
photos whose nearest neighbour is unchanged. A run replaces its own (model, shape, budget) rows and keeps the
file's others. Writes benchmarks/results/schedule_shape.json.

    .venv/bin/python benchmarks/schedule_shape.py [--model deit_tiny|clip] [--shapes 0.8,1,1.125,1.25] [--budgets 0.5,0.55,0.575,0.6,0.75,0.9]
        [--floors default,0]    # fractions of N; default: budget.LATE_FLOOR
"""

from __future__ import annotations

import argparse
import json
import time

from _common import RESULTS, deit_tiny_weights, imagenet_sample, run_environment, write_json
from clip_embeddings import clip_model, closeness, unpooled_neighbours
from defaults_deit_tiny import halves, scored

from vitpool.adapter import apply_pooling
from vitpool.budget import LATE_FLOOR, solve
from vitpool.config import make_config
from vitpool.evaluate import load_images
from vitpool.flops import total_macs
from vitpool.models import create_model

PATH = RESULTS / "schedule_shape.json"


def schedules(model, shapes: list[str], floors: list[float], budgets: list[float]):
    for shape in shapes:
        for floor in floors:
            for budget in budgets:
                yield shape, floor, budget, solve(model, make_config(layers=()), budget, shape=float(shape), floor=floor)[0]


def deit_tiny_rows(shapes: list[str], floors: list[float], budgets: list[float]):
    model = create_model("deit_tiny", checkpoint=deit_tiny_weights())
    parts = halves(load_images(model, imagenet_sample(), None))
    baseline = total_macs(model)
    for shape, floor, budget, config in schedules(model, shapes, floors, budgets):
        yield shape, floor, budget, scored(model, config, parts, baseline)


def clip_rows(shapes: list[str], floors: list[float], budgets: list[float]):
    model = clip_model()
    images = load_images(model, imagenet_sample(), None)
    reference, reference_neighbours = unpooled_neighbours(images)
    baseline = total_macs(model)
    for shape, floor, budget, config in schedules(model, shapes, floors, budgets):
        pooled = apply_pooling(model, config)
        yield shape, floor, budget, {"k": list(config.k), "layers": list(config.layers),
                                     "mac_ratio": total_macs(pooled) / baseline,
                                     **closeness(pooled, images, reference, reference_neighbours)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("deit_tiny", "clip"), default="deit_tiny")
    parser.add_argument("--shapes", default="0.8,1,1.125,1.25")
    parser.add_argument("--budgets", default="0.5,0.55,0.575,0.6,0.75,0.9")
    parser.add_argument("--floors", default="default", help="fractions of N, or default (budget.LATE_FLOOR)")
    args = parser.parse_args()
    shapes, budgets = args.shapes.split(","), [float(b) for b in args.budgets.split(",")]
    floors = [LATE_FLOOR if f == "default" else float(f) for f in args.floors.split(",")]
    measure = deit_tiny_rows if args.model == "deit_tiny" else clip_rows
    earlier = json.loads(PATH.read_text())["rows"] if PATH.is_file() else []
    earlier = [{**row, "floor": row.get("floor", 0.0)} for row in earlier]  # rows from before the floor had none
    rows = [row for row in earlier if not (row["model"] == args.model and row["shape"] in shapes
                                           and row["floor"] in floors and row["budget"] in budgets)]
    started = time.perf_counter()
    for shape, floor, budget, row in measure(shapes, floors, budgets):
        rows.append({"model": args.model, "shape": shape, "floor": floor, "budget": budget, **row,
                     "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps({key: value for key, value in rows[-1].items() if key != "config"}), flush=True)
        started = time.perf_counter()
    rows.sort(key=lambda row: (row["model"], row["budget"], row["shape"], row["floor"]))
    write_json(PATH, {"images": "../shared/data/imagenet-sample (500)", "env": run_environment(), "rows": rows})


if __name__ == "__main__":
    main()
