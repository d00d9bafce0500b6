"""Where a pooling layer's batch-1 time goes in ONNX Runtime: one pooling layer of the default (`PoolingConfig()`:
K-Medoids, spread seeds, outputs, proportional sizes) exported alone at DeiT-S's width, N = 196 patch tokens to
K = 161 (the first layer of `--budget 0.6` on DeiT-S), with 2, 1 and 0 (the default) clustering iterations; its
latency at batch 1 (median of `--rounds` calls on 2 threads), its ONNX nodes, and ONNX Runtime's node profile
summed by operator type. Random tokens: the graph runs every iteration, so its time does not depend on them.
Writes benchmarks/results/pool_layer_ops_onnx.json.

    .venv/bin/python benchmarks/pool_layer_ops_onnx.py [--rounds 300]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime
import torch
from _common import RESULTS, run_environment, write_json

from vitpool.adapter import TokenPool
from vitpool.config import PoolingConfig, PoolingStage

TOKENS, KEPT, WIDTH = 196, 161, 384
DEFAULT = PoolingConfig()


class OneLayer(torch.nn.Module):
    def __init__(self, iters: int) -> None:
        super().__init__()
        self.pool = TokenPool(DEFAULT.method, PoolingStage(3, TOKENS, KEPT), 1, iters, 0, output=DEFAULT.output,
                              proportional=DEFAULT.proportional, spread=DEFAULT.spread)

    def forward(self, x, size, significance):
        pooled, sizes, _, _ = self.pool(x, size, significance)
        return pooled, sizes


def profile(path: Path, feed: dict, rounds: int) -> tuple[float, dict]:
    """(median ms per call, operator -> [microseconds per call, nodes])."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    times = []
    for round_ in range(rounds + 20):
        start = time.perf_counter()
        session.run(None, feed)
        if round_ >= 20:
            times.append((time.perf_counter() - start) * 1e3)
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(".profile"))  # in the run's temporary folder, not the working one
    profiled = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(rounds):
        profiled.run(None, feed)
    spent, count = collections.Counter(), collections.Counter()
    for event in json.loads(Path(profiled.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            spent[event["args"]["op_name"]] += event["dur"]
            count[event["args"]["op_name"]] += 1
    return statistics.median(times), {op: [round(us / rounds, 1), count[op] // rounds] for op, us in spent.most_common()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    example = (torch.randn(2, TOKENS + 1, WIDTH), torch.ones(2, TOKENS), torch.rand(2, TOKENS))  # batch 2: see export.py
    batch = torch.export.Dim("batch")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for iters in (2, 1, 0):
            path = Path(workdir) / f"layer{iters}.onnx"
            torch.onnx.export(OneLayer(iters).eval(), example, str(path), dynamo=True, input_names=["x", "size", "significance"],
                              dynamic_shapes=({0: batch}, {0: batch}, {0: batch}), verbose=False)
            feed = {name: tensor[:1].numpy() for name, tensor in zip(("x", "size", "significance"), example)}
            ms, ops = profile(path, feed, args.rounds)
            rows.append({"iters": iters, "p50_ms": ms, "nodes": len(onnx.load(str(path)).graph.node), "ops_us_per_call": ops})
            print(json.dumps(rows[-1])[:300], flush=True)
    write_json(RESULTS / "pool_layer_ops_onnx.json", {
        "layer": f"{DEFAULT.method}, {DEFAULT.output} outputs, spread {DEFAULT.spread}, "
                 f"{TOKENS} -> {KEPT} patch tokens (+1 prefix), width {WIDTH}, batch 1",
        "rounds": args.rounds, "env": run_environment(), "rows": rows})


if __name__ == "__main__":
    main()
