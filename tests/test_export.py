"""ONNX export: every method in the graph, parity with PyTorch in ONNX Runtime, a dynamic batch, atomic writes."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from conftest import assert_user_error, run_in_process

import vitpool
from vitpool import export as export_module
from vitpool.adapter import pooling_config
from vitpool.config import AFTER_ATTENTION, AFTER_BLOCK
from vitpool.errors import VitpoolError
from vitpool.methods import METHODS
from vitpool.models import create_model
from vitpool.outputs import normal_mode

SCHEDULE = {"k": [128, 88, 56], "layers": [2, 5, 8]}
GRID_SCHEDULE = {"k": [121, 81, 49], "layers": [2, 5, 8]}
# The tests of what `export` does around tracing (checks, graph passes, atomic writes, any batch) use the real DeiT-Tiny with
# the default method and SCHEDULE, traced once on one worker (`make test` runs pytest with --dist loadgroup).
SHARED_TRACE = pytest.mark.xdist_group("real-deit-tiny-kmedoids-trace")
# wkmedoids's graph, traced once for its parity test and the test of graphs that stop at the fixed point
WKMEDOIDS_TRACE = pytest.mark.xdist_group("real-deit-tiny-wkmedoids-trace")


@pytest.fixture(scope="module")
def traced_files(tmp_path_factory) -> tuple[dict, object]:
    return {}, tmp_path_factory.mktemp("traced")


@pytest.fixture(autouse=True)
def trace_each_graph_once(monkeypatch, traced_files):
    """`to_onnx` traces a model with given settings once in this module (10-30 s each) and copies that file after:
    tests that export the same model share one trace, and the copy is theirs to change."""
    files, folder = traced_files
    trace = export_module.to_onnx

    def to_onnx(model, path, opset=export_module.DEFAULT_OPSET, batch_size=2, stop_at_fixed_point=False):
        example = tuple(export_module._example_input(model, batch_size).shape)  # what is traced, not what was asked
        key = (graph_key(model), opset, example, stop_at_fixed_point)
        if key not in files:
            traced = folder / f"{len(files)}.onnx"
            trace(model, traced, opset, batch_size, stop_at_fixed_point)
            files[key] = traced
        shutil.copyfile(files[key], path)

    monkeypatch.setattr(export_module, "to_onnx", to_onnx)


def graph_key(model: torch.nn.Module) -> tuple:
    """What the traced graph depends on: the architecture, the pooling settings and every weight and buffer."""
    config = pooling_config(model)
    weights = sum(float(t.double().sum()) for t in model.state_dict().values() if t.is_floating_point())
    return model.default_cfg.get("architecture"), len(model.blocks), config and str(config.to_dict()), weights


# Every method after attention (the default place, the block run as two halves), and after the block the
# default method, a selection and tome: the pooling layer is the same module in both places.
SHARED = {"kmedoids": [SHARED_TRACE], "wkmedoids": [WKMEDOIDS_TRACE]}
EXPORTED = [pytest.param(method, AFTER_ATTENTION, marks=SHARED.get(method, [])) for method in METHODS] + [
    (method, AFTER_BLOCK) for method in ("kmedoids", "importance", "tome")]


@pytest.mark.parametrize("method, position", EXPORTED)
def test_every_method_exports_and_agrees_with_pytorch_on_real_images(method, position, real_deit_tiny, imagenet_sample, tmp_path):
    pooled = vitpool.convert(real_deit_tiny, method=method, position=position,
                             **(GRID_SCHEDULE if method == "grid" else SCHEDULE))
    result = export_module.export(pooled, tmp_path / "m.onnx", data=imagenet_sample, limit=16, min_agreement=90)
    check = result.check
    assert check.n == 16 and check.source == str(imagenet_sample)
    assert check.agreement >= 93.75, f"{method}: top-1 agreement {check.agreement}%"
    assert check.close >= 87.5, f"{method}: logits within 1e-3 on only {check.close}% of images"
    assert result.input_shape == ["batch", 3, 224, 224]
    graph = onnx.load(result.path, load_external_data=False).graph
    assert any("TokenPool" in prop.value for node in graph.node for prop in node.metadata_props), "pooling not in the graph"
    assert not any(node.op_type == "Loop" for node in graph.node)
    # No ScatterND: a plain one is undefined for repeated indices, and ONNX Runtime 1.32 runs one with reduction
    # add on several threads with a race between repeated indices (pooling.row_sums)
    assert not any(node.op_type == "ScatterND" for node in graph.node)


@SHARED_TRACE
def test_threaded_onnx_runtime_gives_the_same_logits_every_run(real_deit_tiny, tmp_path):
    import onnxruntime as ort

    pooled = vitpool.convert(real_deit_tiny, **SCHEDULE)
    path = export_module.export(pooled, tmp_path / "m.onnx", run_check=False).path
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    runtime = ort.InferenceSession(str(path), options)
    images = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = pooled(images).numpy()
    for _ in range(5):  # cluster sums that lost adds to a thread race differed by up to 0.2 in some runs
        np.testing.assert_allclose(runtime.run(None, {export_module.INPUT_NAME: images.numpy()})[0], expected, atol=1e-4)


@SHARED_TRACE
def test_one_file_runs_any_batch_size(real_deit_tiny, tmp_path):
    pooled = vitpool.convert(real_deit_tiny, **SCHEDULE)
    path = export_module.export(pooled, tmp_path / "m.onnx", run_check=False, batch_size=1).path
    runtime = export_module.session(path)
    generator = torch.Generator().manual_seed(3)
    for batch in (1, 3):
        images = torch.randn(batch, 3, 224, 224, generator=generator)
        logits = runtime.run(None, {export_module.INPUT_NAME: images.numpy()})[0]
        with torch.no_grad():
            expected = pooled(images).numpy()
        assert logits.shape == (batch, 1000)
        np.testing.assert_allclose(logits, expected, atol=1e-3)


@WKMEDOIDS_TRACE
def test_graph_that_stops_at_the_fixed_point_gives_every_iterations_outputs(real_deit_tiny, imagenet_sample, tmp_path):
    # One method here, on the real model through ONNX Runtime; test_pooling checks every clustering method's
    # stopping graph at the torch.export level, which is what differs between them.
    from vitpool import data as image_data

    pooled = vitpool.convert(real_deit_tiny, method="wkmedoids", **SCHEDULE)
    every = export_module.export(pooled, tmp_path / "every.onnx", run_check=False)
    stops = export_module.export(pooled, tmp_path / "stops.onnx", run_check=False, stop_at_fixed_point=True)
    assert stops.stops_at_fixed_point and not every.stops_at_fixed_point
    top_level_ifs = [n for n in onnx.load(stops.path, load_external_data=False).graph.node if n.op_type == "If"]
    assert len(top_level_ifs) == len(SCHEDULE["layers"])  # one chain of nested Ifs per pooling layer
    assert not any(n.op_type == "If" for n in onnx.load(every.path, load_external_data=False).graph.node)
    transform, _ = image_data.transform_for(pooled)
    batches = [images for images, _, _ in image_data.open_images(imagenet_sample).batches(transform, 1, workers=0, limit=7)]
    # Real photos take 1 to 5 iterations per layer, so a condition that stops too early changes the logits.
    images = torch.cat(batches).numpy()
    sessions = export_module.session(every.path), export_module.session(stops.path)
    for batch in (images[:1], images[1:4], images[4:]):
        expected, actual = (s.run(None, {export_module.INPUT_NAME: batch})[0] for s in sessions)
        np.testing.assert_array_equal(actual, expected)


def test_opset_23_fuses_the_attention_of_blocks_that_read_none_and_runs_their_size_mask(real_deit_tiny, tmp_path):
    """At opset 23 the exporter writes timm's fused attention as ONNX's own Attention node, in every block whose
    pooling layer does not read the attention probabilities; after a pooling layer that node takes the log-size
    mask, which ONNX Runtime's kernel accepts only with the query axis spelled out (`adapter.size_bias`)."""
    pooled = vitpool.convert(real_deit_tiny, k=[120, 60], layers=[3, 7])
    result = export_module.export(pooled, tmp_path / "m.onnx", opset=23, limit=8)
    assert result.check.agreement == 100.0 and result.check.max_abs_diff < 1e-3
    graph = onnx.load(result.path, load_external_data=False).graph
    fused = [node for node in graph.node if node.op_type == "Attention"]
    assert len(fused) == len(real_deit_tiny.blocks) - 2, "blocks 3 and 7 read their probabilities, the others fuse"
    assert sum(len(node.input) > 3 and node.input[3] != "" for node in fused) == 7, "blocks 4 to 6 and 8 to 11 take the mask"


def test_the_exporter_optimizes_without_the_slices_split_rule_and_gets_it_back(monkeypatch, tmp_path):
    """The rule's search grows with the square of the graph and never fired in a vitpool graph (`export._without_slices_split`)."""
    rules_module = pytest.importorskip("onnxscript.rewriter.rules.common._basic_rules")
    from onnxscript import rewriter

    every_rule = rewriter._DEFAULT_REWRITE_RULES
    if rules_module.slice_split_rule not in every_rule:
        pytest.skip("the installed onnxscript does not run SlicesSplit by default")
    given = []
    make_pass = rewriter.RewritePass.__init__
    monkeypatch.setattr(rewriter.RewritePass, "__init__", lambda self, rules: given.append(tuple(rules)) or make_pass(self, rules))
    torch.manual_seed(0)
    model = vitpool.convert(create_model("deit_tiny", pretrained=False, depth=2, img_size=64), k=[8], layers=[0])
    export_module.to_onnx(model, tmp_path / "m.onnx")
    assert tuple(rule for rule in every_rule if rule is not rules_module.slice_split_rule) in given
    assert not any(rules_module.slice_split_rule in rules for rules in given)
    assert rewriter._DEFAULT_REWRITE_RULES is every_rule


def test_distilled_model_exports_with_both_prefix_tokens(tmp_path):
    torch.manual_seed(0)
    model = create_model("deit_tiny_distilled_patch16_224", pretrained=False)
    pooled = vitpool.convert(model, method="importance", k=[120, 60], layers=[3, 7])
    result = export_module.export(pooled, tmp_path / "d.onnx", limit=8)
    assert result.check.agreement == 100.0 and result.check.max_abs_diff < 1e-3


@SHARED_TRACE
def test_int8_export_quantizes_the_linear_layers_only(real_deit_tiny, imagenet_sample, tmp_path):
    pooled = vitpool.convert(real_deit_tiny, **SCHEDULE)
    # int8 flips some top-1s of the pooled model and the unpooled one alike (benchmarks/int8_deit_tiny.py)
    result = export_module.export(pooled, tmp_path / "int8.onnx", data=imagenet_sample, limit=16, min_agreement=70,
                                  passes=export_module.GraphPasses(quantize="int8"), unpooled=real_deit_tiny)
    assert result.precision == "int8" and not result.optimized and result.fusion is None
    graph = onnx.load(result.path).graph
    linear = sum(isinstance(module, torch.nn.Linear) for module in real_deit_tiny.modules())
    quantized = [node for node in graph.node if node.op_type == "MatMulInteger"]
    assert linear - 1 <= len(quantized) <= linear  # the head (a Gemm on [B, C]) may stay float
    # each a layer's weights: a product of two activations quantized would take its second input from the graph
    assert all(node.input[1] in export_module.constant_names(graph) for node in quantized)
    # the products of two activations (attention, the pooling layers' Gram and cost matrices) stay float MatMuls:
    # two per block's attention, and more in the pooling layers
    assert activation_products(graph) > 2 * len(real_deit_tiny.blocks)
    assert result.check.agreement >= 75 and result.check.unpooled_agreement >= 75, result.check
    assert result.check.close < 50  # int8 moves the logits: the check did run the quantized file
    assert (tmp_path / "int8.onnx").stat().st_mode & 0o777 == normal_mode()  # not mkstemp's private mode
    assert [p.name for p in tmp_path.iterdir()] == ["int8.onnx"], "a temporary file was left behind"


def activation_products(graph: onnx.GraphProto) -> int:
    constants = export_module.constant_names(graph)
    return sum(node.op_type == "MatMul" and not constants & set(node.input) for node in graph.node)


def test_int8_export_without_images_to_check_on_is_refused(tmp_path):
    with pytest.raises(VitpoolError, match="--data"):
        export_module.export(torch.nn.Identity(), tmp_path / "m.onnx", passes=export_module.GraphPasses(quantize="int8"))
    assert list(tmp_path.iterdir()) == []


@SHARED_TRACE
def test_optimized_export_accounts_for_every_layer_norm(real_deit_tiny, imagenet_sample, tmp_path):
    pooled = vitpool.convert(real_deit_tiny, **SCHEDULE)
    # real photos, as for every export: on random inputs a K-Medoids near-tie may resolve differently (see module)
    result = export_module.export(pooled, tmp_path / "m.onnx", data=imagenet_sample, limit=16,
                                  passes=export_module.GraphPasses(optimize=True), unpooled=real_deit_tiny)
    fused, unpooled = result.fusion.fused, result.fusion.unpooled_fused
    depth = len(real_deit_tiny.blocks)
    assert unpooled["SkipLayerNormalization"] == 2 * depth and unpooled["BiasGelu"] == fused["BiasGelu"] == depth
    # the residual Adds that a pooling layer separates from their norm stay unfused, and are reported as such
    assert fused["SkipLayerNormalization"] == 2 * depth - len(SCHEDULE["layers"]) - 1  # and the last block's trim
    assert f"{len(SCHEDULE['layers'])} LayerNormalization after a pooling layer" in " ".join(result.fusion.not_fused)
    assert result.check.agreement >= 93.75 and result.check.close >= 87.5 and result.check.unpooled_agreement == 100.0


@SHARED_TRACE
def test_existing_file_needs_force_and_failed_checks_write_nothing(real_deit_tiny, tmp_path, monkeypatch):
    pooled = vitpool.convert(real_deit_tiny, **SCHEDULE)
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    with pytest.raises(VitpoolError, match="already exists"):
        export_module.export(pooled, target, run_check=False)
    assert target.read_bytes() == b"old"

    def disagreeing_check(*args, **kwargs):
        return export_module.ExportCheck("random", 10, 5.0, 50.0, 0.0, kwargs.get("min_agreement", 90.0))

    monkeypatch.setattr(export_module, "check", disagreeing_check)
    with pytest.raises(VitpoolError, match="disagrees with PyTorch"):
        export_module.export(pooled, target, force=True)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"], "a temporary file was left behind"


def test_export_command_json_and_refusal(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    vitpool_cli = Path(sys.executable).parent / "vitpool"
    target = tmp_path / "out" / "m.onnx"
    args = [str(vitpool_cli), "export", "deit_tiny", "--no-pretrained", "--method", "importance", "--k", "100",
            "--layers", "4", "--limit", "4", "--out", str(target)]
    run = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    document = json.loads(run.stdout)
    assert document["path"] == str(target) and document["input_shape"] == ["batch", 3, 224, 224]
    assert document["check"]["passed"] and document["check"]["n"] == 4 and document["pooling"]["k"] == [100]
    before = target.read_bytes()
    assert_user_error(run_in_process(args[1:]), ["already exists", "--force"])
    assert target.read_bytes() == before
