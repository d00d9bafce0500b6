"""What the ONNX graphs that stop at the fixed point save on real weights and real photos, in ONNX Runtime on
this CPU: the real DeiT-Tiny (K 128, 88, 56 after blocks 2, 5, 8; weighted K-Medoids, 5 iterations) exported
three ways: running every iteration (the default), stopping at the fixed point (`--stop-at-fixed-point`), and
a copy whose pooling is nearly free (bench_deit_small_cpu.free_pooling: the same blocks at the same token
counts). Timed in turns by vitpool.bench, each round on the next of the shared photos (the same photo for all
three), at batch 1 and 32, in several blocks whose median is reported (all are kept).

The added latency of pooling is 1 - p50(free) / p50(graph). DeiT-S with random weights, which
bench_deit_small_cpu.py times, reaches its fixed point sooner than a real model on photos
(fixed_point_iterations.py), so this is the realistic figure for the stopping graphs.
Writes benchmarks/results/onnx_stop_deit_tiny.json.

    .venv/bin/python benchmarks/onnx_stop_deit_tiny.py [--images 64] [--blocks 3] [--rounds-1 200] [--rounds-32 10]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import EARLIER_DEFAULTS, FIXED_LAYERS, FORTY_PERCENT, RESULTS, deit_tiny_weights, imagenet_sample, run_environment, write_json
from bench_deit_small_cpu import free_pooling

import vitpool
from vitpool.bench import Timer, time_in_turns
from vitpool.export import INPUT_NAME, check_batches, session, to_onnx
from vitpool.models import create_model

POOLED_GRAPHS = ("every_iteration", "stopping")
GRAPHS = (*POOLED_GRAPHS, "free_pooling")


def photo_batches(model, images: int, batch: int) -> list:
    """Full batches of `images` shared photos spread over the classes, read as `vitpool export` checks on them."""
    _, loaded = check_batches(model, imagenet_sample(), images, batch)
    return [photos.numpy() for photos in loaded if len(photos) == batch]


def cycling_runner(path: Path, batches: list, threads: int):
    """Runs `path` on the next batch at each call; every runner walks the same sequence."""
    runtime = session(path, threads=threads, spin_after_run=False)  # sessions run in turns, as in vitpool.bench
    feeds = itertools.cycle([{INPUT_NAME: photos} for photos in batches])
    return lambda: runtime.run(None, next(feeds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="shared photos to cycle through")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks per batch size; the median is reported")
    parser.add_argument("--rounds-1", type=int, default=200)
    parser.add_argument("--rounds-32", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS / "onnx_stop_deit_tiny.json")
    args = parser.parse_args()
    weights = deit_tiny_weights()
    if not weights.is_file():
        raise SystemExit(f"the real DeiT-Tiny weights are not at {weights} (see ../shared/data/README.md)")
    start = time.perf_counter()
    pooled = vitpool.convert(create_model("deit_tiny", checkpoint=weights), k=FORTY_PERCENT, layers=FIXED_LAYERS, iters=5, **EARLIER_DEFAULTS)
    threads = torch.get_num_threads()
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        paths = {graph: Path(workdir) / f"{graph}.onnx" for graph in GRAPHS}
        to_onnx(pooled, paths["every_iteration"])
        to_onnx(pooled, paths["stopping"], stop_at_fixed_point=True)
        to_onnx(free_pooling(pooled), paths["free_pooling"])
        for batch, rounds in ((1, args.rounds_1), (32, args.rounds_32)):
            batches = photo_batches(pooled, max(args.images, batch), batch)
            blocks = []
            for _ in range(args.blocks):
                calls = {graph: cycling_runner(path, batches, threads) for graph, path in paths.items()}
                for call in calls.values():
                    for _ in range(3):
                        call()
                times = time_in_turns(calls, rounds, Timer("cpu"))
                p50 = {graph: statistics.median(times[graph]) for graph in GRAPHS}
                blocks.append({"p50_ms": p50, "added_latency": {graph: 1 - p50["free_pooling"] / p50[graph]
                                                                for graph in POOLED_GRAPHS}})
            median = {graph: statistics.median(block["added_latency"][graph] for block in blocks)
                      for graph in POOLED_GRAPHS}
            results.append({"batch_size": batch, "photos": len(batches) * batch, "added_latency": median,
                            "blocks": blocks})
            print(f"batch {batch}: pooling adds {median['every_iteration']:.3f} (every iteration), "
                  f"{median['stopping']:.3f} (stopping)", flush=True)
    write_json(args.out, {"model": "deit_tiny (real weights)", "k": FORTY_PERCENT, "layers": FIXED_LAYERS, "method": EARLIER_DEFAULTS["method"],
                          "iters": 5, "env": run_environment("cpu"), "seconds": round(time.perf_counter() - start),
                          "results": results})


if __name__ == "__main__":
    main()
