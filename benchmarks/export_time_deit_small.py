"""How long `vitpool export` takes to write DeiT-S, unpooled and at the default budgets, and what leaving out
onnxscript's SlicesSplit rewrite (`export._without_slices_split`) saves: each graph exported with the exporter's
every rule and with the rule left out, in turns, and the two files compared node for node. Random weights: the
time depends on the graph, not on the values. Writes benchmarks/results/export_time_deit_small.json.

    .venv/bin/python benchmarks/export_time_deit_small.py [--budgets 0.75,0.6,0.5] [--repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

from _common import RESULTS, run_environment, write_json

OUT = RESULTS / "export_time_deit_small.json"


def exported(model, path: Path, every_rule: bool) -> float:
    from vitpool import export

    start = time.perf_counter()
    if every_rule:
        original = export._without_slices_split
        export._without_slices_split = contextlib.nullcontext
        try:
            export.to_onnx(model, path)
        finally:
            export._without_slices_split = original
    else:
        export.to_onnx(model, path)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="0.75,0.6,0.5")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import onnx
    import torch

    import vitpool
    from vitpool.adapter import pooling_config
    from vitpool.models import create_model

    torch.manual_seed(0)
    base = create_model("deit_small_patch16_224", pretrained=False).eval()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        exported(base, Path(folder) / "warm-up.onnx", every_rule=True)  # the exporter's first run loads and caches more
        for budget in [None, *map(float, args.budgets.split(","))]:
            model = base if budget is None else vitpool.convert(base, budget=budget)
            times = {"every rule": [], "without SlicesSplit": []}
            for _ in range(args.repeats):
                for name in times:
                    times[name].append(exported(model, Path(folder) / f"{name}.onnx", name == "every rule"))
            graphs = [onnx.load(str(Path(folder) / f"{name}.onnx")).graph for name in times]
            row = {"budget": budget, "k": list(pooling_config(model).k) if budget else [],
                   "nodes": len(graphs[1].node), "same_graph": graphs[0].SerializeToString() == graphs[1].SerializeToString(),
                   **{f"{name} s": [round(t, 2) for t in runs] for name, runs in times.items()}}
            row["saved"] = round(1 - statistics.median(times["without SlicesSplit"]) / statistics.median(times["every rule"]), 3)
            print(row, flush=True)
            rows.append(row)
    write_json(OUT, {"command": "benchmarks/export_time_deit_small.py " + f"--budgets {args.budgets} --repeats {args.repeats}",
                     "model": "deit_small_patch16_224 (random weights)", "rows": rows, "env": run_environment()})


if __name__ == "__main__":
    main()
