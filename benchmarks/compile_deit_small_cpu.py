"""DeiT-S under torch.compile on this CPU: the defaults at MAC budgets 0.75, 0.6 and 0.5, batch 1 and 32, eager
and compiled (inductor), each pooled model against the unpooled one in the same run (vitpool.bench: `--repeats`
interleaved rounds), with the graphs torch._dynamo.explain finds in each model and the first call's seconds
(the compilation, per batch size, with inductor's on-disk caches off so that an earlier run's graphs are not
reused). Random weights: latency does not depend on them. Writes
benchmarks/results/compile_deit_small_cpu.json.

    .venv/bin/python benchmarks/compile_deit_small_cpu.py [--repeats 20]
"""

from __future__ import annotations

import argparse

import torch
import torch._inductor.config
from _common import RESULTS, run_environment, write_json

import vitpool
from vitpool.bench import bench, rows_to_json
from vitpool.models import create_model

BUDGETS = (0.75, 0.6, 0.5)


def graphs(model) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(torch.randn(2, 3, 224, 224)).graph_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch._inductor.config.force_disable_caches = True
    torch.manual_seed(0)
    unpooled = create_model("deit_small", pretrained=False).eval()
    document = {"env": run_environment(), "graphs": {"unpooled": graphs(unpooled)}, "rows": []}
    for budget in BUDGETS:
        pooled = vitpool.convert(unpooled, budget=budget)
        document["graphs"][f"budget {budget}"] = graphs(pooled)
        torch._dynamo.reset()
        rows, _ = bench(unpooled, pooled, ["torch", "torch-compile"], [1, 32], rounds=args.repeats)
        for row in rows_to_json(rows, {}):
            del row["env"]
            document["rows"].append({"budget": budget, **row})
            if row["model"] == "pooled":
                print(f"budget {budget}, {row['runtime']}, batch {row['batch_size']}: efficiency {row['efficiency']:.2f}, "
                      f"first call {row['first_call_s']:.1f} s", flush=True)
    write_json(RESULTS / "compile_deit_small_cpu.json", document)


if __name__ == "__main__":
    main()
