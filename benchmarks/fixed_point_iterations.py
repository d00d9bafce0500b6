"""How many K-Medoids iterations eager PyTorch runs before it stops at a fixed point (an iteration that
changes no medoid), per pooling layer, one image at a time (at batch 1 the batch is the image):
- the real DeiT-Tiny on the shared ImageNet photos (K 128, 88, 56 after blocks 2, 5, 8);
- DeiT-S with random weights on random images, as bench_deit_small_cpu.py times it (its three schedules).
The count includes the iteration that found nothing to change; 5 means all of `--iters 5` ran. It shows
how far the random-weight latency figures of eager PyTorch are from real ones.
Writes benchmarks/results/fixed_point_iterations.json.

    .venv/bin/python benchmarks/fixed_point_iterations.py [--limit 200]
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import torch
from _common import EARLIER_DEFAULTS, FIXED_LAYERS, FIXED_SCHEDULES, FORTY_PERCENT, RESULTS, deit_tiny_weights, imagenet_sample, run_environment, write_json

import vitpool
from vitpool import data, iterate
from vitpool.adapter import pooled_layers
from vitpool.models import create_model

ITERS = 5


def iterations_per_layer(pooled, images) -> dict[int, dict[int, int]]:
    """Layer -> {iterations run: images}, as vitpool.iterate counts the steps each pooling layer runs."""
    runs: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    with iterate.counting() as steps, torch.inference_mode():
        for image in images:
            steps.clear()
            pooled(image.unsqueeze(0))
            for layer, count in zip(pooled_layers(pooled), steps):  # the layers run in block order
                runs[layer].update([count])
    return {layer: dict(sorted(counter.items())) for layer, counter in sorted(runs.items())}


def mean_iterations(counts: dict[int, int]) -> float:
    return sum(iters * images for iters, images in counts.items()) / sum(counts.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200, help="photos for DeiT-Tiny")
    parser.add_argument("--random-images", type=int, default=20, help="random images for DeiT-S")
    parser.add_argument("--out", type=Path, default=RESULTS / "fixed_point_iterations.json")
    args = parser.parse_args()
    results = []
    tiny = create_model("deit_tiny", pretrained=False, checkpoint=deit_tiny_weights())
    pooled = vitpool.convert(tiny, k=FORTY_PERCENT, layers=FIXED_LAYERS, iters=ITERS, **EARLIER_DEFAULTS).eval()
    samples = data.spread(data.scan(imagenet_sample(), tiny.num_classes).samples, args.limit)
    photos = torch.cat([batch for batch, _, _ in data.loader(samples, tiny, 50, 2)])
    runs = iterations_per_layer(pooled, photos)
    results.append({"model": "deit_tiny (real weights)", "inputs": f"{len(photos)} shared ImageNet photos", "k": FORTY_PERCENT,
                    "layers": FIXED_LAYERS, "iterations_run": runs, "mean": {i: mean_iterations(c) for i, c in runs.items()}})
    torch.manual_seed(0)
    small = create_model("deit_small", pretrained=False)
    noise = torch.randn(args.random_images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    for name, k in FIXED_SCHEDULES.items():
        runs = iterations_per_layer(vitpool.convert(small, k=k, layers=FIXED_LAYERS, iters=ITERS, **EARLIER_DEFAULTS).eval(),
                                    noise)
        results.append({"model": "deit_small (random weights)", "schedule": name, "inputs": f"{len(noise)} random images",
                        "k": k, "layers": FIXED_LAYERS, "iterations_run": runs, "mean": {i: mean_iterations(c) for i, c in runs.items()}})
    for row in results:
        print(row["model"], row["k"], {layer: round(mean, 2) for layer, mean in row["mean"].items()}, row["iterations_run"])
    write_json(args.out, {"iters": ITERS, "env": run_environment("cpu"), "results": results})


if __name__ == "__main__":
    main()
