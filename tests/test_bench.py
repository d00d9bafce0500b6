"""vitpool bench: its JSON rows on a tiny model, and its refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_user_error, run_in_process

VITPOOL = Path(sys.executable).parent / "vitpool"
SMALL = ["deit_tiny", "--no-pretrained", "--k", "100,50", "--layers", "3,6"]


def _vitpool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VITPOOL), *args], capture_output=True, text=True, timeout=900)


def test_bench_json_rows():
    run = _vitpool("bench", *SMALL, "--batch-size", "1,2", "--runtime", "torch,onnxruntime", "--warmup", "1",
                   "--repeats", "3", "--json")
    assert run.returncode == 0, run.stderr
    assert "profiler" not in run.stderr, run.stderr  # the memory pass's profiler logs nothing
    rows = json.loads(run.stdout)
    assert [(r["runtime"], r["batch_size"], r["model"]) for r in rows] == [
        (runtime, batch, model) for runtime in ("torch", "onnxruntime") for batch in (1, 2) for model in ("baseline", "pooled")
    ]
    for row in rows:
        assert row["device"] == "cpu" and row["precision"] == "fp32"
        assert 0 < row["p50_ms"] <= row["p90_ms"]
        assert row["images_per_s"] == pytest.approx(1e3 * row["batch_size"] / row["p50_ms"])
        if Path("/proc/self/clear_refs").exists():  # ONNX Runtime read 0 MB when measured on its warmed session
            assert row["peak_mem_mb"] > 0, row
        assert {"torch", "timm", "onnxruntime", "device_name", "threads", "cpu_capability"} <= set(row["env"])
    baseline, pooled = rows[0], rows[1]
    assert baseline["speedup"] is None and baseline["efficiency"] is None
    counted = json.loads(run_in_process(["flops", *SMALL, "--json"]).stdout)  # the MACs bench reports are the models'
    assert (baseline["gmacs"], pooled["gmacs"]) == pytest.approx((counted["baseline_gmacs"], counted["gmacs"]))
    assert pooled["mac_speedup"] == pytest.approx(1 / counted["ratio"])


def test_bench_times_int8_optimized_graphs_of_both_models():
    run = _vitpool("bench", *SMALL, "--batch-size", "2", "--runtime", "torch,onnxruntime", "--warmup", "1",
                   "--repeats", "2", "--optimize", "--quantize", "int8", "--json")
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert [(r["runtime"], r["model"], r["precision"], r["optimized"]) for r in rows] == [
        ("torch", "baseline", "fp32", False), ("torch", "pooled", "fp32", False),
        ("onnxruntime", "baseline", "int8", True), ("onnxruntime", "pooled", "int8", True)]


@pytest.mark.parametrize("args, words", [
    ((*SMALL, "--device", "cuda"), ("no CUDA GPU",)),
    ((*SMALL, "--runtime", "tensorrt"), ("unknown runtime tensorrt",)),
    (("deit_tiny", "--no-pretrained"), ("converted model",)),
    ((*SMALL, "--amp", "bf16"), ("--amp bf16 is for CUDA",)),
    ((*SMALL, "--batch-size", "0"), ("--batch-size",)),
    ((*SMALL, "--runtime", "torch", "--stop-at-fixed-point"), ("--stop-at-fixed-point", "onnxruntime")),
    ((*SMALL, "--runtime", "torch", "--quantize", "int8"), ("--quantize", "onnxruntime")),
    ((*SMALL, "--quantize", "int4"), ("--quantize int4", "int8")),
])
def test_bench_refusals(args, words):
    import torch

    if args[-1] == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert_user_error(run_in_process(["bench", *args]), words)


def test_sessions_timed_in_turns_stop_spinning_between_runs_only(tmp_path):
    # Spinning idle workers of one session would steal the 2 cores from the other's timed run; within a
    # run they spin as ONNX Runtime does by default.
    import onnx
    from onnx import TensorProto, helper

    from vitpool.export import session

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "identity.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    timed = session(path, spin_after_run=False).get_session_options()
    assert timed.get_session_config_entry("session.force_spinning_stop") == "1"
    for options, key in ((timed, "session.intra_op.allow_spinning"),
                         (session(path).get_session_options(), "session.force_spinning_stop")):
        with pytest.raises(RuntimeError, match="does not have configuration"):  # ONNX Runtime's default
            options.get_session_config_entry(key)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_resident_peak_sees_a_real_allocation_and_no_phantom_one():
    from vitpool.bench import resident_peak_mb

    size = 200 * 2**20
    assert resident_peak_mb(lambda: b"\x01" * size, repeats=1) >= 150
    assert all(resident_peak_mb(lambda: None) < 20 for _ in range(20))  # nothing allocated reads near nothing


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_resident_peak_counts_memory_that_earlier_calls_freed():
    # glibc keeps freed memory resident, so without handing it back a warmed-up call read as using 0 MB.
    from vitpool.bench import resident_peak_mb

    def call():
        return bytearray(16 * 2**20)  # zero-filled, so every page is touched; freed on return

    for _ in range(3):
        call()
    assert all(14 <= resident_peak_mb(call) <= 40 for _ in range(3))


def test_cpu_tensor_peak_is_the_most_held_at_once():
    import torch

    from vitpool.bench import tensor_peak_mb

    megabytes_4 = 2**20  # float32 elements

    def one_at_a_time():
        return [torch.ones(megabytes_4).sum() for _ in range(3)]

    def two_at_once():
        first, second = torch.ones(megabytes_4), torch.ones(megabytes_4)
        return (first + second).sum()  # and the sum's 4 MB: three held at once

    assert tensor_peak_mb(one_at_a_time, "cpu") == pytest.approx(4, abs=0.01)
    assert tensor_peak_mb(two_at_once, "cpu") == pytest.approx(12, abs=0.01)
