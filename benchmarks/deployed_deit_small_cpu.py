"""DeiT-S speed as deployed on this CPU: ONNX Runtime on the graphs as exported, after ONNX Runtime's transformer
optimizer (`--optimize`), after dynamic int8 quantization (`--quantize int8`) and after both, and with `--graphs`
exported at opset 23 (`--opset 23`, where timm's fused attention becomes ONNX's own Attention node), at MAC budgets 0.75, 0.6 and
0.5 (the defaults), batch 1 and 32. Every pooled graph is timed against the unpooled graph that went
through the same passes (vitpool.export.GraphPasses), all four models of a pass in turns in one run
(vitpool.bench.time_in_turns); `--runs` runs, the median efficiency reported, all kept. Efficiency = speed-up /
MAC speed-up, the MACs counted in float (int8 does the same multiply-accumulates). Random weights: latency does
not depend on them. Writes benchmarks/results/deployed_deit_small_cpu.json (or `--out`).

    .venv/bin/python benchmarks/deployed_deit_small_cpu.py [--runs 3] [--rounds-1 40] [--rounds-32 4] [--graphs LABELS] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from _common import RESULTS, run_environment, write_json

import vitpool
from vitpool.bench import Timer, onnx_runner, time_in_turns
from vitpool.export import DEFAULT_OPSET, GraphPasses, to_onnx
from vitpool.flops import total_macs
from vitpool.models import create_model

BUDGETS = (0.75, 0.6, 0.5)
# label -> (opset, passes); labels have no comma, since --graphs is a comma list
PASSES = {"as exported": (DEFAULT_OPSET, GraphPasses()), "optimized": (DEFAULT_OPSET, GraphPasses(optimize=True)),
          "int8": (DEFAULT_OPSET, GraphPasses(quantize="int8")),
          "optimized+int8": (DEFAULT_OPSET, GraphPasses(optimize=True, quantize="int8")),
          "opset 23": (23, GraphPasses())}
DEPLOYED = ("as exported", "optimized", "int8", "optimized+int8")  # the default run: the passes of `vitpool export`


def timed(paths: dict[str, Path], batch: int, rounds: int, runs: int) -> dict[str, list[float]]:
    """p50 ms of every file in each of `runs` runs, the files timed in turns."""
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    calls = {name: onnx_runner(path, images, "cpu", torch.get_num_threads()) for name, path in paths.items()}
    for call in calls.values():
        call(), call()
    medians: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(runs):
        for name, times in time_in_turns(calls, rounds, Timer("cpu")).items():
            medians[name].append(statistics.median(times))
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds-1", type=int, default=40)
    parser.add_argument("--rounds-32", type=int, default=4)
    parser.add_argument("--graphs", default=",".join(DEPLOYED), help=f"the labels of the graphs to time, comma-separated: {', '.join(PASSES)}")
    parser.add_argument("--out", type=Path, default=RESULTS / "deployed_deit_small_cpu.json")
    args = parser.parse_args()
    labels = args.graphs.split(",")
    if unknown := set(labels) - set(PASSES):
        parser.error(f"unknown --graphs {sorted(unknown)}: choose from {', '.join(PASSES)}")
    torch.manual_seed(0)
    unpooled = create_model("deit_small", pretrained=False).eval()
    models = {"unpooled": unpooled, **{f"budget {budget}": vitpool.convert(unpooled, budget=budget) for budget in BUDGETS}}
    macs = {name: total_macs(model) for name, model in models.items()}
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        exported: dict[int, dict[str, Path]] = {}  # opset -> model -> file
        for label in labels:
            opset, passes = PASSES[label]
            if opset not in exported:
                exported[opset] = {name: Path(workdir) / f"{index}-opset{opset}.onnx" for index, name in enumerate(models)}
                for name, model in models.items():
                    to_onnx(model, exported[opset][name], opset=opset)
            paths = {name: path.with_name(f"{path.stem}-{len(rows)}.onnx") for name, path in exported[opset].items()}
            for name, path in paths.items():
                shutil.copy(exported[opset][name], path)
                passes.apply(path, models[name])
            for batch, rounds in ((1, args.rounds_1), (32, args.rounds_32)):
                medians = timed(paths, batch, rounds, args.runs)
                for name in BUDGETS:
                    key = f"budget {name}"
                    efficiencies = [(base / pooled) / (macs["unpooled"] / macs[key])
                                    for base, pooled in zip(medians["unpooled"], medians[key])]
                    middle = efficiencies.index(statistics.median_low(efficiencies))
                    rows.append({"graphs": label, "opset": opset, "budget": name, "batch": batch, "efficiency": round(efficiencies[middle], 3),
                                 "unpooled_p50_ms": medians["unpooled"][middle], "pooled_p50_ms": medians[key][middle],
                                 "mac_speedup": macs["unpooled"] / macs[key], "runs": efficiencies})
                    print(f"{label}, batch {batch}, budget {name}: unpooled {medians['unpooled'][middle]:.1f} ms, "
                          f"pooled {medians[key][middle]:.1f} ms, efficiency {efficiencies[middle]:.2f}", flush=True)
    write_json(args.out, {"env": run_environment(), "runs": args.runs, "rows": rows})


if __name__ == "__main__":
    main()
