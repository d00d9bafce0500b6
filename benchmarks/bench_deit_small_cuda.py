"""DeiT-S latency on a CUDA GPU: the CPU benchmark's budgets (0.75, 0.6, 0.5) with the default preset and the
paper's, fp32 and bf16 autocast, batch 1 and 256, eager PyTorch (and ONNX Runtime's CUDA execution provider where onnxruntime-gpu is installed), baseline
and pooled interleaved in one run (vitpool.bench, CUDA events).

The pooling layers' cost is measured as the latency they add, at both batch sizes: the pooled model against
a copy whose pooling layers keep the first K patch tokens (bench_deit_small_cpu.added_latency). Hooks with a
host clock, as the CPU benchmark uses for eager PyTorch, would time kernel launches, not kernels.
Random weights: latency does not depend on them. Writes benchmarks/results/bench_deit_small_cuda.json.

    python benchmarks/bench_deit_small_cuda.py [--repeats 50] [--runtimes torch,onnxruntime] [--presets vitpool,paper]

On a lent GPU machine whose image lacks fvcore (pure-Python wheels carried from here):
    pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl yacs==0.1.8 termcolor==3.3.0
    pip wheel --no-deps -w .whl fvcore==0.1.5.post20221221 iopath==0.1.10
and there: pip install --no-index --no-deps --target /tmp/site .whl/*.whl; PYTHONPATH=/tmp/site:$PWD.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import RESULTS, run_environment, write_json
from bench_deit_small_cpu import SCHEDULES, added_latency

import vitpool
from vitpool.bench import bench, rows_to_json
from vitpool.models import create_model

BATCHES = [1, 256]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50, help="timed rounds per model, runtime and batch")
    parser.add_argument("--presets", default="vitpool,paper", help="comma list of vitpool, paper, tome")
    parser.add_argument("--runtimes", default=None, help="comma list (default: torch, and onnxruntime where it has CUDA)")
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="comma list of " + ", ".join(SCHEDULES))
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_deit_small_cuda.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU; bench_deit_small_cpu.py measures the CPU")
    if args.runtimes is None:
        import onnxruntime

        has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        args.runtimes = "torch,onnxruntime" if has_cuda else "torch"
    runtimes = args.runtimes.split(",")
    torch.manual_seed(0)
    base = create_model("deit_small", pretrained=False)  # schedules are solved on the CPU, where MACs are counted
    results = []
    start = time.perf_counter()
    for preset, name in ((preset, name) for preset in args.presets.split(",") for name in args.schedules.split(",")):
        pooled = vitpool.convert(base, budget=SCHEDULES[name], preset=preset).cuda()
        base = base.cuda()
        for precision in ("fp32", "bf16"):
            # autocast applies to the torch runtimes only: ONNX Runtime runs the fp32 graph, once
            chosen = runtimes if precision == "fp32" else [r for r in runtimes if r != "onnxruntime"]
            rows, env = bench(base, pooled, chosen, BATCHES, "cuda", precision, warmup=10, rounds=args.repeats)
            added = added_latency(pooled, args.repeats, ["torch"], BATCHES, "cuda", precision, warmup=10)
            results.append({"schedule": name, "budget": SCHEDULES[name], "preset": preset,
                            "pooling": pooled.vitpool_config.to_dict(), "precision": precision,
                            "rows": rows_to_json(rows, env), "pooling_added_latency": added})
            print(json.dumps({"preset": preset, "schedule": name, "precision": precision, "added": added,
                              "efficiency": {f"{r.runtime}_b{r.batch_size}": round(r.efficiency, 3)
                                             for r in rows if r.model == "pooled"}}), flush=True)
        base = base.cpu()
    document = {"model": "deit_small_patch16_224 (random weights)", "device": "cuda",
                "env": run_environment("cuda"),
                "seconds": round(time.perf_counter() - start), "results": results}
    write_json(args.out, document)


if __name__ == "__main__":
    main()
