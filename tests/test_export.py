"""ONNX export: every method in the graph, parity with PyTorch in ONNX Runtime, a dynamic batch, atomic writes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import vitpool
from vitpool import export as export_module
from vitpool.config import AFTER_ATTENTION, AFTER_BLOCK
from vitpool.errors import VitpoolError
from vitpool.methods import METHODS
from vitpool.models import create_model

SCHEDULE = {"k": [128, 88, 56], "layers": [2, 5, 8]}
GRID_SCHEDULE = {"k": [121, 81, 49], "layers": [2, 5, 8]}


# Every method after attention (the default place, the block run as two halves), and after the block the
# default method, a selection and tome: the pooling layer is the same module in both places.
EXPORTED = [(method, AFTER_ATTENTION) for method in METHODS] + [(method, AFTER_BLOCK) for method in ("kmedoids", "importance", "tome")]


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
    # ScatterND only as the cluster sums' add: a plain one (an in-place index write) is undefined for repeated indices
    assert all(reduction(node) == "add" for node in graph.node if node.op_type == "ScatterND")


def reduction(node: onnx.NodeProto) -> str:
    return next((attr.s.decode() for attr in node.attribute if attr.name == "reduction"), "none")


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


def test_distilled_model_exports_with_both_prefix_tokens(tmp_path):
    torch.manual_seed(0)
    model = create_model("deit_tiny_distilled_patch16_224", pretrained=False)
    pooled = vitpool.convert(model, method="importance", k=[120, 60], layers=[3, 7])
    result = export_module.export(pooled, tmp_path / "d.onnx", limit=8)
    assert result.check.agreement == 100.0 and result.check.max_abs_diff < 1e-3


def test_existing_file_needs_force_and_failed_checks_write_nothing(real_deit_tiny, tmp_path, monkeypatch):
    pooled = vitpool.convert(real_deit_tiny, method="importance", k=[100], layers=[4])
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
    again = subprocess.run(args, capture_output=True, text=True, timeout=900)
    lines = [line for line in again.stderr.splitlines() if line.strip()]
    assert again.returncode == 2 and len(lines) == 1 and "already exists" in lines[0] and "--force" in lines[0]
    assert target.read_bytes() == before
