"""DeiT-S latency on this CPU: a preset (default: vitpool, the defaults) at budgets 0.75, 0.6 and 0.5 of the
MACs (`--budget`, pooling included), batch 1 and 32, eager PyTorch and ONNX Runtime, baseline and pooled interleaved in one run (vitpool.bench). Batch 1 is timed
in three such runs, and the one with the median efficiency is reported (all three are kept).

Also measures the pooling layers' share of the pooled model's latency in two ways:
- their own time: in eager PyTorch by timing, with hooks, the TokenPool modules during extra calls and their
  `read` of the attention probabilities inside the block; in ONNX Runtime from its node profile (the nodes
  the exporter tagged with the TokenPool module or with the `attn_drop` scope where the read runs, fused
  ones too);
- at batch 1, the latency they add: the pooled model against a copy whose pooling layers read nothing and
  keep the first K patch tokens (the same blocks at the same token counts, pooling at almost no cost),
  interleaved by vitpool.bench, in three runs whose median is reported (all are kept). The profiler adds
  its own cost to every node, so for the many small pooling nodes of a batch-1 run its figure runs high.
ONNX Runtime is measured twice: with the default graphs, which run every clustering iteration, and, under
`onnxruntime_stopping_at_fixed_point`, with graphs exported with `stop_at_fixed_point` (If nodes skip the
iterations after a fixed point).
Random weights and random images: the default graphs' latency does not depend on them. Eager PyTorch's and
the stopping graphs' do, as clustering stops at a fixed point there: with these inputs a layer runs 1.0 to
1.55 of its 5 K-Medoids iterations on average, the real DeiT-Tiny on real photos 1.5 to 2.7
(fixed_point_iterations.py), so their batch-1 pooling figures here are optimistic; onnx_stop_deit_tiny.py
measures the stopping graphs on real weights and photos. Writes benchmarks/results/bench_deit_small_cpu.json.

    .venv/bin/python benchmarks/bench_deit_small_cpu.py [--preset vitpool] [--blocks-1 3] [--repeats-1 60]
        [--repeats-32 10] [--repeats-added 100] [--blocks-added 3]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import RESULTS, write_json

import vitpool
from vitpool.adapter import pooled_layers
from vitpool.bench import bench, environment, rows_to_json
from vitpool.export import INPUT_NAME, to_onnx
from vitpool.models import create_model

SCHEDULES = {"minus25": 0.75, "minus40": 0.6, "minus50": 0.5}  # name -> MAC budget
RUNTIMES = ("torch", "onnxruntime")


def eager_pool_share(model, images, calls: int = 5) -> float:
    """Fraction of eager forward time spent inside the TokenPool modules and their reads: the hooks that
    deliver each read run after the tapped module's forward, so a hook put before them and one after them
    time the read."""
    spent = [0.0]
    started = {}

    def before(module, *_):
        started[module] = time.perf_counter()

    def after(module, *_):
        spent[0] += time.perf_counter() - started.pop(module)

    handles = []
    for layer, pool in pooled_layers(model).items():
        handles += [pool.register_forward_pre_hook(before), pool.register_forward_hook(after)]
        for tapped, _heads in pool.tap(model.blocks[layer]):
            handles += [tapped.register_forward_hook(before, prepend=True), tapped.register_forward_hook(after)]
    try:
        with torch.inference_mode():
            model(images)
            spent[0] = 0.0
            begin = time.perf_counter()
            for _ in range(calls):
                model(images)
            total = time.perf_counter() - begin
    finally:
        for handle in handles:
            handle.remove()
    return spent[0] / total


def free_pooling(model):
    """A copy of `model` whose pooling layers read nothing and keep the first K patch tokens: nearly free pooling."""
    free = copy.deepcopy(model)
    for pool in pooled_layers(free).values():
        pool.read = _read_nothing
        pool.forward = functools.partial(_keep_first_tokens, pool)
    return free


def _read_nothing(_tapped, _heads=1):
    return None


def _keep_first_tokens(pool, x, size, seen=None, positions=None):
    kept = size[:, : pool.k]
    return x[:, : pool.num_prefix_tokens + pool.k], kept, torch.zeros_like(size, dtype=torch.long), None


def added_latency(pooled, rounds: int, runtimes=RUNTIMES, batches=(1,), device: str = "cpu",
                  precision: str = "fp32", warmup: int = 3, stop_at_fixed_point: bool = False) -> dict[str, float]:
    """1 - p50(free pooling) / p50(pooled) per runtime and batch, interleaved. On the CPU only at batch 1: at
    batch 32 the profile is accurate, and a difference of a few percent is below the noise of 10 rounds."""
    rows, _ = bench(free_pooling(pooled), pooled, list(runtimes), list(batches), device, precision, warmup, rounds,
                    stop_at_fixed_point=stop_at_fixed_point)
    # (pooled - free) / pooled
    return {f"{row.runtime}_batch{row.batch_size}": 1 - row.speedup for row in rows if row.model == "pooled"}


def median_block_rows(blocks: list[list[dict]], runtimes=RUNTIMES) -> list[dict]:
    """Per runtime, the baseline and pooled rows of the block whose efficiency is the median.

    This host has slower spells of some seconds (both models' batch-1 p50 up by about 30%, the pooled one's a
    little more); several short runs of bench, each interleaved, keep one spell from deciding the figure."""
    rows = []
    for runtime in runtimes:
        ranked = sorted(blocks, key=lambda block: _pooled(block, runtime)["efficiency"])
        rows += [row for row in ranked[len(ranked) // 2] if row["runtime"] == runtime]
    return rows


def block_efficiencies(blocks: list[list[dict]], runtimes=RUNTIMES) -> dict[str, list[float]]:
    return {runtime: [_pooled(block, runtime)["efficiency"] for block in blocks] for runtime in runtimes}


def _pooled(block: list[dict], runtime: str) -> dict:
    return next(row for row in block if row["runtime"] == runtime and row["model"] == "pooled")


def onnx_pool_share(model, images, workdir: str, calls: int = 5, stop_at_fixed_point: bool = False) -> float:
    """Fraction of ONNX Runtime node time spent in nodes exported from the TokenPool modules and their reads.

    An If node's time includes the nodes of the branch it ran, which the profile also lists under their own
    names; only the If, a node of the main graph, is counted."""
    import onnx
    import onnxruntime as ort

    path = Path(workdir) / "pooled.onnx"
    to_onnx(model, path, stop_at_fixed_point=stop_at_fixed_point)
    graph = onnx.load(str(path), load_external_data=False).graph
    # In eval mode Dropout exports nothing, so the nodes in a pooled block's attn_drop scope are the pooling
    # layer's read of the attention probabilities.
    pool_nodes = {n.name for n in graph.node
                  if any("TokenPool" in p.value or ".attn.attn_drop:" in p.value for p in n.metadata_props)}
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(workdir) / "profile")
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.force_spinning_stop", "1")  # as vitpool.bench times it
    runtime = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {INPUT_NAME: images.numpy()}
    for _ in range(calls):
        runtime.run(None, feed)
    events = json.loads(Path(runtime.end_profiling()).read_text())
    node_time = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            # ONNX Runtime names a fused node after the first node it replaced: "node_matmul_2/MatmulTransposeFusion/"
            name = event["name"].removesuffix("_kernel_time").split("/")[0]
            node_time[name] = node_time.get(name, 0) + event["dur"]
    total = sum(node_time.values())
    return sum(t for name, t in node_time.items() if name in pool_nodes) / total


def measure(base, pooled, runtimes, args, stop_at_fixed_point: bool) -> dict:
    """Rows (batch 1: the median of `args.blocks_1` runs), pooling shares and added latency for `runtimes`, with
    the ONNX graphs exported as `stop_at_fixed_point` says."""
    runtimes = list(runtimes)
    blocks = [rows_to_json(*bench(base, pooled, runtimes, [1], warmup=3, rounds=args.repeats_1,
                                  stop_at_fixed_point=stop_at_fixed_point))
              for _ in range(args.blocks_1)]
    rows = median_block_rows(blocks, runtimes)
    rows += rows_to_json(*bench(base, pooled, runtimes, [32], warmup=3, rounds=args.repeats_32,
                                stop_at_fixed_point=stop_at_fixed_point))
    shares = {}
    with tempfile.TemporaryDirectory() as workdir:
        for batch in (1, 32):
            images = torch.randn(batch, 3, 224, 224)
            calls = 5 if batch == 1 else 2
            if "torch" in runtimes:
                shares[f"torch_batch{batch}"] = eager_pool_share(pooled, images, calls)
            shares[f"onnxruntime_batch{batch}"] = onnx_pool_share(pooled, images, workdir, calls, stop_at_fixed_point)
    added_blocks = [added_latency(pooled, args.repeats_added, runtimes, stop_at_fixed_point=stop_at_fixed_point)
                    for _ in range(args.blocks_added)]
    added = {key: statistics.median(block[key] for block in added_blocks) for key in added_blocks[0]}
    return {"rows": rows, "batch1_block_efficiency": block_efficiencies(blocks, runtimes),
            "pooling_share_of_latency": shares, "pooling_added_latency": added,
            "pooling_added_latency_blocks": added_blocks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats-1", type=int, default=60)
    parser.add_argument("--blocks-1", type=int, default=3, help="batch-1 runs of bench; the median one is reported")
    parser.add_argument("--repeats-32", type=int, default=10)
    parser.add_argument("--repeats-added", type=int, default=100, help="rounds for the latency pooling adds")
    parser.add_argument("--blocks-added", type=int, default=3, help="runs of those rounds; the median is reported")
    parser.add_argument("--preset", default="vitpool", help="vitpool (the defaults), paper or tome")
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="comma list of " + ", ".join(SCHEDULES))
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_deit_small_cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = create_model("deit_small", pretrained=False)
    results = []
    start = time.perf_counter()
    for name in args.schedules.split(","):
        pooled = vitpool.convert(base, budget=SCHEDULES[name], preset=args.preset)
        config = pooled.vitpool_config
        every = measure(base, pooled, RUNTIMES, args, stop_at_fixed_point=False)
        stopping = measure(base, pooled, ("onnxruntime",), args, stop_at_fixed_point=True)
        result = {"schedule": name, "budget": SCHEDULES[name], "preset": args.preset, "pooling": config.to_dict(),
                  **every, "onnxruntime_stopping_at_fixed_point": stopping}
        results.append(result)
        progress = {graph: {"shares": part["pooling_share_of_latency"], "added": part["pooling_added_latency"],
                            "efficiency": {f"{r['runtime']}_b{r['batch_size']}": round(r["efficiency"], 3)
                                           for r in part["rows"] if r["model"] == "pooled"}}
                    for graph, part in (("every_iteration", result), ("stopping", stopping))}
        print(json.dumps({"schedule": name, **progress}), flush=True)
    document = {"model": "deit_small_patch16_224 (random weights)", "device": "cpu", "env": environment("cpu", torch.get_num_threads()),
                "seconds": round(time.perf_counter() - start), "results": results}
    write_json(args.out, document)


if __name__ == "__main__":
    main()
