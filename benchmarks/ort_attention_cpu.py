"""Would fused attention make ONNX Runtime faster on this CPU? One DeiT-S attention (6 heads, 197 tokens, head
width 64) as the exporter writes it (Transpose, MatMul, Mul, Softmax, MatMul, Transpose, Reshape) against ONNX
Runtime's fused `com.microsoft.MultiHeadAttention` on the same query, keys and values (the query reshaped to
[B, N, C] as the op takes it) and against ONNX's own `Attention` (opset 23, what `--opset 23` exports), the
last also with its softmax probabilities as a second output (`qk_matmul_output_mode=3`: what a pooling layer's
significance would read) next to the explicit form with its probabilities as an output; batch 1 and 32, median
of `--rounds` calls on 2 threads. Writes benchmarks/results/ort_attention_cpu.json.

    .venv/bin/python benchmarks/ort_attention_cpu.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime
from _common import RESULTS, run_environment, write_json
from onnx import TensorProto, helper

HEADS, TOKENS, WIDTH = 6, 197, 64


def graphs() -> dict:
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", HEADS, TOKENS, WIDTH]) for name in "qkv"]
    output = [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)]
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [0, TOKENS, HEADS * WIDTH])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [WIDTH ** -0.5])
    explicit = helper.make_graph([
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]), helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probabilities"], axis=-1),
        helper.make_node("MatMul", ["probabilities", "v"], ["heads"]),
        helper.make_node("Transpose", ["heads"], ["tokens"], perm=[0, 2, 1, 3]), helper.make_node("Reshape", ["tokens", "shape"], ["out"]),
    ], "explicit", inputs, output, [scale, shape])
    fused = helper.make_graph([
        helper.make_node("Transpose", ["q"], ["q_tokens"], perm=[0, 2, 1, 3]), helper.make_node("Reshape", ["q_tokens", "shape"], ["query"]),
        helper.make_node("MultiHeadAttention", ["query", "k", "v"], ["out"], domain="com.microsoft", num_heads=HEADS),
    ], "fused", inputs, output, [shape])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    probabilities = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, None)
    explicit_with = helper.make_graph(list(explicit.node), "explicit_with", inputs, output + [probabilities], [scale, shape])
    return {"exported": helper.make_model(explicit, opset_imports=opsets),
            "MultiHeadAttention": helper.make_model(fused, opset_imports=opsets),
            "exported, probabilities out": helper.make_model(explicit_with, opset_imports=opsets),
            "Attention (opset 23)": onnx_attention(inputs, output, shape, with_probabilities=False),
            "Attention (opset 23), probabilities out": onnx_attention(inputs, output + [probabilities], shape, with_probabilities=True)}


def onnx_attention(inputs: list, outputs: list, shape, with_probabilities: bool):
    """ONNX's Attention on [B, H, N, D] inputs, its output back to [B, N, C] as the exported graph's."""
    returned = ["heads", "", "", "probabilities"] if with_probabilities else ["heads"]
    graph = helper.make_graph([
        helper.make_node("Attention", ["q", "k", "v"], returned, qk_matmul_output_mode=3),
        helper.make_node("Transpose", ["heads"], ["tokens"], perm=[0, 2, 1, 3]), helper.make_node("Reshape", ["tokens", "shape"], ["out"]),
    ], "onnx_attention", inputs, outputs, [shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    sessions = {name: onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
                for name, model in graphs().items()}
    rows = []
    for batch in (1, 32):
        feed = {name: np.random.RandomState(seed).randn(batch, HEADS, TOKENS, WIDTH).astype(np.float32) for seed, name in enumerate("qkv")}
        outputs = {name: session.run(None, feed)[0] for name, session in sessions.items()}
        rounds = args.rounds if batch == 1 else max(1, args.rounds // 10)
        for name, session in sessions.items():
            for _ in range(5):
                session.run(None, feed)
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                session.run(None, feed)
                times.append((time.perf_counter() - start) * 1e6)
            rows.append({"graph": name, "batch": batch, "p50_us": statistics.median(times),
                         "max_abs_diff": float(np.abs(outputs[name] - outputs["exported"]).max())})
            print(rows[-1], flush=True)
    write_json(RESULTS / "ort_attention_cpu.json", {"env": run_environment(), "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
