"""How near can batch 1 in ONNX Runtime on this CPU come to the MAC speed-up, and how much of the gap is pooling?

DeiT-S (random weights: latency does not depend on them), batch 1, one ONNX Runtime session per model, all
timed in turns in one run (vitpool.bench.time_in_turns), at MAC budgets 0.75, 0.6 and 0.5 (pooling included):
the default (vitpool preset, no clustering iteration), the default with 2 (the earlier default) or 1 iterations, with
two pooling layers (after attention in blocks 4 and 8) instead of one in every block from 3 to 10, where it differs
the default without `budget.FLOOR_SNAP` (at 0.5, a last layer that removes two tokens), the default before
(blocks 3, 5, 7, 9, 11, 2 iterations, the last block's MLP on every token), ToMe as published
(tome preset), and the default's blocks at the same token counts with free pooling (each pooling layer keeps
the first K tokens and reads nothing: bench_deit_small_cpu.free_pooling). The free row is the ceiling any
pooling method at that schedule can reach: what is left below it is the cost of the blocks' smaller matrix
products, not of the pooling. Efficiency is speed-up / MAC speed-up, the MACs of the model as timed (free
pooling counts almost none). Median of `--runs` runs of `--rounds` rounds each. Writes
benchmarks/results/batch1_ceiling_deit_small.json.

    .venv/bin/python benchmarks/batch1_ceiling_deit_small.py [--runs 3] [--rounds 40]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from unittest import mock

import torch
from _common import RESULTS, run_environment, write_json
from bench_deit_small_cpu import SCHEDULES, free_pooling

import vitpool
from vitpool import budget as budget_module
from vitpool.bench import Timer, onnx_runner, time_in_turns
from vitpool.export import to_onnx
from vitpool.flops import total_macs
from vitpool.models import create_model


def variants(base, budget: float) -> dict:
    default = vitpool.convert(base, budget=budget)
    with mock.patch.object(budget_module, "FLOOR_SNAP", 0.0):
        unsnapped = vitpool.convert(base, budget=budget)
    differs = unsnapped.vitpool_config != default.vitpool_config
    return {"vitpool preset (the default)": default,
            **({"the default without FLOOR_SNAP (a last layer near the floor)": unsnapped} if differs else {}),
            "the earlier default (2 iterations)": vitpool.convert(base, budget=budget, iters=2),
            "the default with 1 iteration": vitpool.convert(base, budget=budget, iters=1),
            "the default in blocks 4, 8": vitpool.convert(base, budget=budget, layers=(4, 8)),
            "the default before (blocks 3, 5, 7, 9, 11, 2 iterations, last block not trimmed)":
                vitpool.convert(base, budget=budget, layers=(3, 5, 7, 9, 11), iters=2, trim_last=False),
            "tome preset (ToMe as published)": vitpool.convert(base, budget=budget, preset="tome"),
            "the default's blocks, free pooling (the ceiling)": free_pooling(default)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = create_model("deit_small", pretrained=False).eval()
    models = {("baseline", 1.0): base}
    for budget in SCHEDULES.values():
        models |= {(label, budget): model.eval() for label, model in variants(base, budget).items()}
    macs = {key: total_macs(model) for key, model in models.items()}
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as workdir:
        calls = {}
        for number, (key, model) in enumerate(models.items()):
            path = Path(workdir) / f"{number}.onnx"
            to_onnx(model, path)
            calls[key] = onnx_runner(path, images, "cpu", threads)
        for call in calls.values():
            for _ in range(3):
                call()
        runs = [time_in_turns(calls, args.rounds, Timer("cpu")) for _ in range(args.runs)]
    baseline = ("baseline", 1.0)
    rows = []
    for key in models:
        p50s = [statistics.median(run[key]) for run in runs]
        efficiencies = [(statistics.median(run[baseline]) / p50) / (macs[baseline] / macs[key])
                        for run, p50 in zip(runs, p50s)]
        rows.append({"model": key[0], "budget": key[1], "mac_ratio": macs[key] / macs[baseline],
                     "p50_ms": statistics.median(p50s), "efficiency": statistics.median(efficiencies),
                     "efficiency_runs": efficiencies, "config": getattr(models[key], "vitpool_config", None)
                     and models[key].vitpool_config.to_dict()})
        print(f"{key[1]} {key[0]}: p50 {rows[-1]['p50_ms']:.1f} ms, efficiency {rows[-1]['efficiency']:.3f}", flush=True)
    write_json(RESULTS / "batch1_ceiling_deit_small.json", {
        "model": "deit_small_patch16_224 (random weights)", "runtime": "onnxruntime", "batch_size": 1,
        "runs": args.runs, "rounds": args.rounds, "env": run_environment(), "rows": rows})


if __name__ == "__main__":
    main()
