"""Why vitpool.bench runs ONNX Runtime with `session.force_spinning_stop`: DeiT-S at batch 1 on this CPU,
baseline and pooled (the three schedules of bench_deit_small_cpu.py), timed in turns under three settings
and alone under ONNX Runtime's defaults, which is what a deployed session sees.

- default: worker threads busy-wait after a run, so each session is timed against the other's spinning;
- no spinning (`session.intra_op.allow_spinning` 0): no busy-waiting at all, within runs either;
- stop after run (`session.force_spinning_stop` 1): busy-waiting within a run only, what vitpool.bench uses.

Each way is timed in blocks, every way in turn, and its figures are the medians over blocks. Random
weights. Writes benchmarks/results/ort_spinning_deit_small.json.

    .venv/bin/python benchmarks/ort_spinning_deit_small.py [--rounds 20] [--blocks 5]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
from pathlib import Path

import torch
from _common import EARLIER_DEFAULTS, EARLIER_ITERS, FIXED_LAYERS, FIXED_SCHEDULES, RESULTS, run_environment, write_json

import vitpool
from vitpool.bench import Timer, time_in_turns
from vitpool.export import INPUT_NAME, to_onnx
from vitpool.models import create_model

SETTINGS = {
    "default": {},
    "no_spinning": {"session.intra_op.allow_spinning": "0"},
    "stop_after_run": {"session.force_spinning_stop": "1"},
}


def open_session(path: Path, entries: dict[str, str]):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads()
    for key, value in entries.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def p50_ms(sessions: dict, feed: dict, rounds: int, warmup: int = 3) -> dict[str, float]:
    """Median latency of each session, timed in turns as vitpool.bench times models."""
    calls = {name: functools.partial(session.run, None, feed) for name, session in sessions.items()}
    for call in calls.values():
        for _ in range(warmup):
            call()
    return {name: statistics.median(times) for name, times in time_in_turns(calls, rounds, Timer("cpu")).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="rounds per block")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "ort_spinning_deit_small.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = create_model("deit_small", pretrained=False)
    feed = {INPUT_NAME: torch.randn(1, 3, 224, 224).numpy()}
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        baseline_path = Path(workdir) / "baseline.onnx"
        to_onnx(base, baseline_path)
        for name, k in FIXED_SCHEDULES.items():
            pooled_path = Path(workdir) / f"{name}.onnx"
            to_onnx(vitpool.convert(base, k=k, layers=FIXED_LAYERS, iters=EARLIER_ITERS, **EARLIER_DEFAULTS), pooled_path)
            paths = {"baseline": baseline_path, "pooled": pooled_path}
            blocks = {f"in_turns_{setting}": [] for setting in SETTINGS} | {"alone_default": []}
            # Blocks of each way in turn, repeated: this host has slower spells of some seconds (both models'
            # p50 up by about 30%), which then fall on every way alike rather than on one.
            for _ in range(args.blocks):
                for setting, entries in SETTINGS.items():
                    sessions = {model: open_session(path, entries) for model, path in paths.items()}
                    blocks[f"in_turns_{setting}"].append(p50_ms(sessions, feed, args.rounds))
                blocks["alone_default"].append(
                    {model: p50_ms({model: open_session(path, {})}, feed, args.rounds)[model] for model, path in paths.items()})
            row = {"schedule": name, "k": k, "layers": FIXED_LAYERS}
            for way, found in blocks.items():
                for block in found:
                    block["speedup"] = block["baseline"] / block["pooled"]
                row[way] = {key: statistics.median(block[key] for block in found) for key in ("baseline", "pooled", "speedup")}
                row[way]["blocks"] = found
            print({way: {key: round(v, 3) for key, v in row[way].items() if key != "blocks"} for way in blocks}, flush=True)
            results.append(row)
    write_json(args.out, {"model": "deit_small_patch16_224 (random weights)", "batch_size": 1, "rounds_per_block": args.rounds,
                          "blocks": args.blocks, "env": run_environment("cpu"), "results": results})


if __name__ == "__main__":
    main()
