"""ONNX export of a (converted) model with its pooling in the graph, checked against PyTorch in ONNX Runtime.

The pooling layers have fixed iteration counts and static shapes, so by default the graph has no
data-dependent control flow; the batch axis is a named dynamic dimension. `stop_at_fixed_point` instead
puts each clustering iteration after the first into an ONNX If that skips it once an iteration has changed
nothing: the same outputs, a little faster in ONNX Runtime on the CPU at batch 1, but control flow that
ONNX Runtime's CUDA graphs refuse. The dynamo exporter fixes the batch to 1 when it traces with a batch
of 1, so the example batch is at least 2. K-Medoids' argmin may resolve a near-tie
differently under ONNX Runtime's kernels, so the check is top-1 agreement against a stated threshold,
not bit-equality; the file is only moved into place once the check has passed.

`GraphPasses` are what deployment does to the exported graph: ONNX Runtime's transformer optimizer and dynamic
int8 quantization of the linear layers. They run on the staged file before the check, so the check is of the
file that is written, and `bench` applies them alike to the unpooled model it compares with.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from vitpool.errors import VitpoolError
from vitpool.outputs import normal_mode, refuse_existing_output, remove_leftovers, temporary_prefix

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
DEFAULT_OPSET = 18
MIN_OPSET = 17  # the dynamo exporter builds opset 18 and converts down to 17 at the lowest
LOGIT_ATOL = 1e-3
QUANTIZATIONS = ("int8",)
# What ONNX Runtime's transformer optimizer fuses in a ViT, counted in the report
FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization", "BiasGelu", "FastGelu", "Gelu")


@dataclass
class ExportCheck:
    source: str  # "random" or the image folder
    n: int
    max_abs_diff: float
    agreement: float  # percent of inputs whose top-1 is the same in ONNX Runtime and PyTorch
    close: float  # percent of inputs whose logits all agree within LOGIT_ATOL
    min_agreement: float
    unpooled_agreement: float | None = None  # the unpooled model through the same graph passes, on the same inputs

    @property
    def passed(self) -> bool:
        return self.agreement >= self.min_agreement


@dataclass(frozen=True)
class GraphPasses:
    """Deployment passes over an exported file, in this order: ONNX Runtime's transformer optimizer (`model_type="vit"`:
    SkipLayerNormalization, BiasGelu, LayerNormalization and, where its patterns match, Attention fusions), then
    dynamic int8 quantization of the linear layers (MatMul and Gemm with a constant weight): attention products
    and the pooling layers' clustering stay float32."""

    optimize: bool = False
    quantize: str | None = None

    def __post_init__(self) -> None:
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise VitpoolError(f"--quantize {self.quantize}: choose {', '.join(QUANTIZATIONS)}")

    @property
    def precision(self) -> str:
        return self.quantize or "fp32"

    def __bool__(self) -> bool:
        return self.optimize or self.quantize is not None

    def apply(self, path: Path, model) -> None:
        with _logging_below_errors():
            if self.optimize:
                _optimize(path, model)
            if self.quantize:
                _quantize(path)


@dataclass
class FusionReport:
    fused: dict[str, int]  # FUSED_OPS -> nodes in the optimised graph
    unpooled_fused: dict[str, int] | None  # the same for the unpooled model, optimised alike
    not_fused: list[str]  # what stayed unfused, and why


@dataclass
class ExportResult:
    path: str
    opset: int
    input_name: str
    input_shape: list
    size_mb: float
    seconds: float
    check: ExportCheck | None
    stops_at_fixed_point: bool = False  # clustering iterations after a fixed point are skipped by If nodes
    optimized: bool = False
    precision: str = "fp32"
    fusion: FusionReport | None = None

    def to_json(self) -> dict:
        document = asdict(self)
        if self.check is not None:
            document["check"]["passed"] = self.check.passed
        return document


def _example_input(model, batch_size: int):
    import torch

    channels, height, width = model.patch_embed.proj.in_channels, *model.patch_embed.img_size
    return torch.randn(max(2, batch_size), channels, height, width, generator=torch.Generator().manual_seed(0))


def to_onnx(model, path: str | Path, opset: int = DEFAULT_OPSET, batch_size: int = 2,
            stop_at_fixed_point: bool = False) -> None:
    """Write `model` to `path` as ONNX with a dynamic batch axis; the exporter's chatter goes to stderr."""
    import torch

    from vitpool.iterate import graphs_stop_at_fixed_point

    example = _example_input(model, batch_size)
    with (warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr), torch.no_grad(),
          graphs_stop_at_fixed_point(stop_at_fixed_point), _quiet("onnxscript.version_converter"),
          _without_slices_split()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model.eval(),
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"x": {0: torch.export.Dim(BATCH_DIM)}},
            opset_version=opset,
            verbose=False,
        )
        program.save(str(path))
    written = written_opset(path)
    if written != opset:  # the exporter keeps the opset it built when it cannot convert
        raise VitpoolError(f"the exporter cannot convert this model to opset {opset} (it stays at {written}); choose another --opset, "
                           f"such as {DEFAULT_OPSET}")


def written_opset(path: str | Path) -> int:
    import onnx

    imports = onnx.load(str(path), load_external_data=False).opset_import
    return next(entry.version for entry in imports if entry.domain in ("", "ai.onnx"))


def _optimize(path: Path, model) -> None:
    """ONNX Runtime's transformer optimizer, in place: its fusions only (`opt_level=0`), as ONNX Runtime applies its
    own graph optimizations when a session loads the file, and they would drop the exporter's node metadata. Its
    symbolic shape inference fails on the pooling layers' graphs (and then skips the SkipLayerNormalization
    fusion): it is turned off for every graph alike."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("vit")
    options.enable_shape_inference = False
    heads = next(module.num_heads for module in model.modules() if hasattr(module, "num_heads"))
    optimized = optimize_model(str(path), model_type="vit", num_heads=heads, hidden_size=model.embed_dim,
                               optimization_options=options, opt_level=0)
    optimized.save_model_to_file(str(path))


def _quantize(path: Path) -> None:
    """Dynamic int8 quantization of the linear layers, in place (through a sibling file)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(path)).graph
    constants = constant_names(graph)
    linear = [node.name for node in graph.node if node.op_type in ("MatMul", "Gemm") and node.input[1] in constants]
    quantized = _sibling(path, "int8")
    try:
        quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8, nodes_to_quantize=linear,
                         op_types_to_quantize=["MatMul", "Gemm"])
        os.replace(quantized, path)
    finally:
        quantized.unlink(missing_ok=True)


def constant_names(graph) -> set[str]:
    """The names of a graph's values fixed at export: its initializers and Constant nodes' outputs."""
    return {tensor.name for tensor in graph.initializer} | {name for node in graph.node if node.op_type == "Constant"
                                                             for name in node.output}


def fusion_report(graph, unpooled_graph) -> FusionReport:
    """What the optimizer fused in `graph` (and in `unpooled_graph`, optimised alike, or None), and what it did not."""
    return FusionReport(fused_ops(graph), fused_ops(unpooled_graph) if unpooled_graph is not None else None, not_fused(graph))


def _graph(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False).graph


def fused_ops(graph) -> dict[str, int]:
    counts = collections.Counter(node.op_type for node in graph.node)
    return {op: counts[op] for op in FUSED_OPS}


def not_fused(graph) -> list[str]:
    """What the optimizer left unfused in `graph`, and where, read off the graph and the exporter's module names."""
    producers = {name: node for node in graph.node for name in node.output}
    ops = collections.Counter(node.op_type for node in graph.node)
    reasons = []
    if ops["Softmax"] and not (ops["Attention"] or ops["MultiHeadAttention"]):
        reasons.append(f"attention ({ops['Softmax']} Softmax): the optimizer's patterns start from separate Q, K and V "
                       "projections, where timm's blocks project them with one packed MatMul")
    after = collections.Counter(_made_by(producers.get(node.input[0])) for node in graph.node if node.op_type == "LayerNormalization")
    for (op, module), count in sorted(after.items()):
        if module.endswith(".TokenPool"):
            reasons.append(f"{count} LayerNormalization after a pooling layer, which sits between the residual Add and "
                           "the LayerNormalization that SkipLayerNormalization fuses")
        else:
            reasons.append(f"{count} LayerNormalization after {op} in {module}")
    return reasons


def _made_by(node) -> tuple[str, str]:
    """(op type, innermost module class) of the node that made a value, from the exporter's metadata."""
    if node is None:
        return "a graph input", "the model"
    hierarchy = next((prop.value for prop in node.metadata_props if prop.key == "pkg.torch.onnx.class_hierarchy"), "")
    modules = [name.strip(" '") for name in hierarchy.strip("[]").split(",") if not name.strip(" '").startswith("aten.")]
    return node.op_type, modules[-1] if modules else "the model"


@contextlib.contextmanager
def _logging_below_errors():
    """ONNX Runtime's optimizer and quantizer log advice and shape-inference failures as warnings, through loggers
    of their own modules' names; this module reports what matters in its result."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def check_opset(opset: int) -> None:
    """One line for an opset outside what the exporter builds and the installed onnx knows."""
    import onnx

    highest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= highest:
        raise VitpoolError(f"--opset {opset}: choose {MIN_OPSET} to {highest} (the installed onnx knows opsets up to {highest})")


@contextlib.contextmanager
def _without_slices_split():
    """The exporter's graph optimizer without onnxscript's SlicesSplit rule (two Slices that halve one tensor's
    last axis, made one Split). Its two-output pattern is searched for from every node over the whole graph, so its
    time grows with the square of the graph's size: a sixth to a third of a pooled DeiT-S's export
    (benchmarks/export_time_deit_small.py), whose graphs came out node for node the same without it, as did every
    family's in tests/test_families.py. Where the installed onnxscript has no such default rule, every rule runs."""
    from onnxscript import rewriter

    try:
        from onnxscript.rewriter.rules.common._basic_rules import slice_split_rule
    except ImportError:
        slice_split_rule = None
    every_rule = getattr(rewriter, "_DEFAULT_REWRITE_RULES", ())
    if not isinstance(every_rule, tuple) or slice_split_rule not in every_rule:
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(rule for rule in every_rule if rule is not slice_split_rule)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = every_rule


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Silence a logger that prints a traceback for a failure this module reports in one line itself."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def session(path: str | Path, device: str = "cpu", threads: int | None = None, spin_after_run: bool = True):
    """An ONNX Runtime session on the CPU, or on CUDA where onnxruntime-gpu provides it.

    `spin_after_run=False` stops the worker threads' busy-waiting when a run returns (they still spin within
    a run, as by default): two sessions timed in turns on a small CPU otherwise each run against the other's
    spinning threads (DeiT-S batch 1 on 2 cores: p50 +46-73%). Turning spinning off altogether would instead
    slow every run (+3-9%, and +8-13% for a pooled model's many small nodes), unlike a deployed session.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not spin_after_run:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise VitpoolError("onnxruntime has no CUDA execution provider here; install onnxruntime-gpu or bench --runtime torch")
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), options, providers=providers)


def check_batches(model, data, limit: int, batch_size: int):
    """(what the inputs are, batches of them): `limit` images of `data` (a data.Source or a path), else seeded noise."""
    import torch

    if data is None:
        generator = torch.Generator().manual_seed(1)
        images = torch.randn(limit, 3, *model.patch_embed.img_size, generator=generator)
        return "random", list(images.split(batch_size))
    from vitpool import data as image_data

    source = image_data.open_images(data, model.num_classes, labelled=False)
    transform, _ = image_data.transform_for(model)
    batches = [images for images, _, _ in source.batches(transform, batch_size, workers=0, limit=limit) if images is not None]
    return str(source.source), batches


def check(model, path: str | Path, data=None, limit: int = 32, batch_size: int = 8,
          min_agreement: float = 90.0) -> ExportCheck:
    """Run the exported file in ONNX Runtime and PyTorch on the same inputs; compare logits and top-1."""
    import numpy as np
    import torch

    runtime = session(path)
    source, batches = check_batches(model, data, limit, batch_size)
    if not batches:
        raise VitpoolError(f"no readable images in {data} to check the export with")
    n = agree = close = 0
    max_diff = 0.0
    with torch.no_grad():
        for images in batches:
            expected = model(images).float().numpy()
            actual = runtime.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
            diff = np.abs(actual - expected)
            max_diff = max(max_diff, float(diff.max()))
            agree += int((actual.argmax(-1) == expected.argmax(-1)).sum())
            close += int((diff.max(-1) <= LOGIT_ATOL).sum())
            n += len(images)
    return ExportCheck(source, n, max_diff, 100.0 * agree / n, 100.0 * close / n, min_agreement)


def export(model, out: str | Path, opset: int = DEFAULT_OPSET, batch_size: int = 2, run_check: bool = True,
           data=None, limit: int = 32, min_agreement: float = 90.0, force: bool = False,
           stop_at_fixed_point: bool = False, passes: GraphPasses = GraphPasses(), unpooled=None) -> ExportResult:
    """Export, apply `passes`, check in ONNX Runtime, and only then move the file to `out` (atomic; `force` to
    replace). With passes and the `unpooled` model, that model goes through the same passes too, for the fusion
    report and for the agreement the passes cost it (the check's `unpooled_agreement`)."""
    out = Path(out)
    refuse_existing_output(out, force)
    check_opset(opset)
    if passes.quantize and run_check and data is None:
        raise VitpoolError(f"--quantize {passes.quantize} moves the logits too far for random inputs to check the top-1 "
                           "against; check on real images with --data DIR, or skip the check with --no-check")
    if out.is_dir():
        raise VitpoolError(f"output {out} is a directory; give a file name such as model.onnx")
    staging = _staging_file(out)
    reference = _sibling(staging, "unpooled")
    try:
        start = time.perf_counter()
        to_onnx(model, staging, opset, batch_size, stop_at_fixed_point)
        passes.apply(staging, model)
        seconds = time.perf_counter() - start
        result = check(model, staging, data, limit, min_agreement=min_agreement) if run_check else None
        if result is not None and not result.passed:
            raise VitpoolError(
                f"the export disagrees with PyTorch: top-1 agreement {result.agreement:.1f}% < {min_agreement:.1f}% "
                f"on {result.n} inputs (max abs diff {result.max_abs_diff:.3g}); nothing written. Check on real "
                f"images with --data, or lower --min-agreement if near-ties are expected"
            )
        # the unpooled model's file serves the fusion report and the check; without either it is not written
        compared = unpooled is not None and (passes.optimize or (passes.quantize is not None and result is not None))
        if compared:
            to_onnx(unpooled, reference, opset, batch_size)
            passes.apply(reference, unpooled)
            if result is not None:
                result.unpooled_agreement = check(unpooled, reference, data, limit, min_agreement=0.0).agreement
        graph = _graph(staging)
        fusion = fusion_report(graph, _graph(reference) if compared else None) if passes.optimize else None
        graph_input = graph.input[0]
        shape = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
        size_mb = staging.stat().st_size / 2**20
        staging.chmod(normal_mode())  # mkstemp made it private
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)
        reference.unlink(missing_ok=True)
    return ExportResult(str(out), opset, graph_input.name, shape, size_mb, seconds, result, stop_at_fixed_point,
                        passes.optimize, passes.precision, fusion)


def _sibling(staging: Path, tag: str) -> Path:
    """Another temporary beside `staging`, named so that `remove_leftovers` finds it if this process dies."""
    return staging.with_name(f"{staging.stem}_{tag}{staging.suffix}")


def _staging_file(out: Path) -> Path:
    """A new, uniquely named sibling of `out` to write into before the atomic rename."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out)
        handle, staging = tempfile.mkstemp(prefix=temporary_prefix(out), suffix=".tmp", dir=out.parent)
        os.close(handle)
    except OSError as error:
        raise VitpoolError(f"cannot write {out}: {error.strerror or error}") from None
    return Path(staging)
