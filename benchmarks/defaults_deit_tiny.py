"""How the default (`--budget R` with no other flag: the vitpool preset) was chosen, and what it beats.

The real DeiT-Tiny on the 500 shared photos, no fine-tuning, at MAC budgets 0.5, 0.6, 0.75 and 0.9 (pooling
layers counted). The photos are split into two halves (even and odd positions in the folder's order, each
spread over the classes): settings were compared on half A and confirmed on half B, and a setting is kept
only where both halves agree. Rows: the three presets (vitpool, paper, tome = ToMe as published), ToMe at its
own r = 8, 12, 16, the earlier defaults, and the default with one thing changed at a time (seeds, clustering
iterations, position, method, outputs and their norm, size weighting, placement of the pooling layers). Every row has its MAC ratio with the pooling layers and their own
share (`pooling_mac_ratio`), so that ratios without them compare with ToMe's papers, which leave the merge out.
Writes benchmarks/results/defaults_deit_tiny.json; `--variants 0,1` reruns those rows of VARIANTS only (by
position) and keeps the file's other rows, each with the configuration it was measured with.

    .venv/bin/python benchmarks/defaults_deit_tiny.py [--budgets 0.5,0.6,0.75,0.9] [--variants 0,1]
"""

from __future__ import annotations

import argparse
import json
import time

from _common import RESULTS, deit_tiny_weights, imagenet_sample, run_environment, write_json

from vitpool.adapter import apply_pooling
from vitpool.budget import solve, tome_schedule
from vitpool.config import LATE, PRESETS, make_config
from vitpool.errors import VitpoolError
from vitpool.flops import count_macs
from vitpool.models import create_model
from vitpool.evaluate import ImageSet, load_images, score

WEIGHTS = deit_tiny_weights()
# label -> (make_config arguments, family, layers); None: the preset's
VARIANTS = {
    "vitpool preset (the default)": ({}, None, None),
    "default, plain cluster means (`--output mean`)": ({"output": "mean"}, None, None),
    "paper preset": ({"preset": "paper"}, None, None),
    "tome preset (ToMe as published)": ({"preset": "tome"}, None, None),
    "tome preset with the last block trimmed": ({"preset": "tome", "trim_last": True}, None, None),
    "default, top-K seeds (no spread seeds; the default before 2026-12-06 night)": ({"spread": 0}, None, None),
    "earlier default (2 K-Medoids iterations)": ({"iters": 2, "spread": 0}, None, None),
    "default, last block not trimmed": ({"trim_last": False}, None, None),
    "default before that (every other block from 3, 2 iterations, not trimmed)": ({"trim_last": False, "iters": 2, "spread": 0}, None,
                                                                                 (3, 5, 7, 9, 11)),
    "default, after the block": ({"position": "after-block"}, None, None),
    "default, weighted K-Medoids": ({"method": "wkmedoids", "iters": 0}, None, None),
    "default, medoid outputs": ({"output": "medoid"}, None, None),
    "default, no proportional attention or size weights": ({"proportional": False}, None, None),
    "default, tome's matching": ({"method": "tome"}, None, None),
    "default, pooling in blocks 3, 6, 9": ({}, None, (3, 6, 9)),
    "default, pooling in blocks 4, 8": ({}, None, (4, 8)),
    "default, pooling in blocks 2, 5, 8": ({}, None, (2, 5, 8)),
    "default, pooling in every other block from 3": ({}, None, (3, 5, 7, 9)),
    "default, pooling in every other block from 1": ({}, None, (1, 3, 5, 7, 9, 11)),
}


def halves(images: ImageSet) -> dict[str, ImageSet]:
    n = len(images.labels)
    return {"A": images.subset(list(range(0, n, 2))), "B": images.subset(list(range(1, n, 2))), "all": images}


def scored(model, config, parts: dict[str, ImageSet], baseline_macs: int) -> dict:
    pooled = apply_pooling(model, config)
    macs = count_macs(pooled)
    row = {"k": list(config.k), "layers": list(config.layers), "config": config.to_dict(),
           "mac_ratio": macs.macs / baseline_macs, "pooling_mac_ratio": macs.pooling_macs / baseline_macs}
    for name, part in parts.items():
        result = score(pooled, part)
        row[name] = {"agreement": result.agreement, "top1": result.top1, "kl": result.kl, "n": result.n}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="0.5,0.6,0.75,0.9")
    parser.add_argument("--variants", default=None, help="positions in VARIANTS to rerun (default: every row)")
    args = parser.parse_args()
    chosen = list(VARIANTS) if args.variants is None else [list(VARIANTS)[int(i)] for i in args.variants.split(",")]
    model = create_model("deit_tiny", checkpoint=WEIGHTS)
    parts = halves(load_images(model, imagenet_sample(), None))
    baseline_macs = count_macs(model).macs
    reference = {name: float((p.reference.argmax(-1) == p.labels).float().mean() * 100) for name, p in parts.items()}
    rows, started = [], time.perf_counter()
    for r in (8, 12, 16) if args.variants is None else ():  # ToMe's own schedules, as in its paper's tables
        config = make_config(k=tome_schedule(r, 196, 12), layers=range(12), preset="tome")
        rows.append({"variant": f"ToMe r={r}", "budget": None, **scored(model, config, parts, baseline_macs)})
        print(json.dumps(rows[-1]["all"] | {"variant": rows[-1]["variant"]}), flush=True)
    for label in chosen:
        arguments, family, layers = VARIANTS[label]
        template = make_config(layers=(), **arguments)
        family = family or PRESETS[arguments.get("preset", "vitpool")].family
        for budget in (float(b) for b in args.budgets.split(",")):
            row = {"variant": label, "budget": budget}
            try:
                config = solve(model, template, budget, layers=layers, family=family if layers is None else LATE)[0]
            except VitpoolError as error:
                rows.append({**row, "error": str(error)})
                continue
            rows.append({**row, **scored(model, config, parts, baseline_macs)})
            print(f"[{time.perf_counter() - started:.0f} s] {label} at {budget}: "
                  f"A {rows[-1]['A']['agreement']:.1f}, B {rows[-1]['B']['agreement']:.1f}, "
                  f"KL {rows[-1]['all']['kl']:.4f}", flush=True)
    if args.variants is not None:
        rows = kept_rows(rows)
    write_json(RESULTS / "defaults_deit_tiny.json", {
        "model": "deit_tiny_patch16_224 (../shared/data/weights)", "images": "../shared/data/imagenet-sample",
        "halves": "A: even positions in the folder's sorted order, B: odd", "unpooled_top1": reference,
        "env": run_environment(), "rows": rows})


def kept_rows(rows: list[dict]) -> list[dict]:
    """`rows` with the other rows of the file, in the order ToMe's r, then VARIANTS, then budget."""
    earlier = json.loads((RESULTS / "defaults_deit_tiny.json").read_text())["rows"]
    rerun = {row["variant"] for row in rows}
    order = {label: i for i, label in enumerate(VARIANTS)}
    merged = [row for row in earlier if row["variant"] not in rerun] + rows
    return sorted(merged, key=lambda row: (order.get(row["variant"], -1), row["budget"] or 0))


if __name__ == "__main__":
    main()
