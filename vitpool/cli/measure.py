"""`vitpool eval`, `vitpool export` and `vitpool bench`: accuracy, an ONNX file, latency."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vitpool.cli import render
from vitpool.cli.common import app, build, emit_json, err, out, pooling_json, user_errors
from vitpool.cli.options import (DATA_HELP, PREPROCESS_OPTIONS, DataFlags, DataOpt, JsonOpt, ModelArg, ModelFlags, OptimizeOpt, QuantizeOpt,
                                 SplitOpt, StopOpt, data_options, model_options)
from vitpool.errors import VitpoolError
from vitpool.outputs import refuse_existing_output


@app.command("eval")
@user_errors
@model_options()
@data_options()
def eval_command(
    model_or_dir: ModelArg,
    data_dir: DataOpt = None,
    *,
    flags: ModelFlags,
    data_flags: DataFlags,
    split: SplitOpt = "validation",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Evaluate N images spread evenly over the dataset (of a wds/ stream, its first N).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Data-loading processes.")] = 2,
    as_json: JsonOpt = False,
):
    """Top-1/top-5 on labelled images; for a converted model also agreement with and KL from the unpooled model."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from vitpool.evaluate import evaluate

    source = data_flags.source(data_dir, split)
    loaded, pooled = build(model_or_dir, flags)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("evaluating", total=None)
        result = evaluate(
            pooled if pooled is not None else loaded.model,
            source,
            baseline=loaded.model if pooled is not None else None,
            limit=limit,
            batch_size=batch_size,
            workers=workers,
            on_batch=lambda done, total: progress.update(task, completed=done, total=total),
            preprocess=data_flags.preprocess(),
        )
    if as_json:
        emit_json({"model": loaded.name, "pooling": pooling_json(pooled), **result.to_json()})
        return
    out.print(render.eval_table(loaded.name, source, result))


@app.command()
@user_errors
@model_options()
@data_options(omit=("class_map", *PREPROCESS_OPTIONS))
def export(
    model_or_dir: ModelArg,
    out_file: Annotated[Path, typer.Option("--out", help="ONNX file to write (refused if it exists, unless --force).")],
    flags: ModelFlags,
    data_flags: DataFlags,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (17 up to what the installed onnx knows).")] = 18,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Example batch to trace with (at least 2 is used; the exported batch axis is dynamic).")] = 2,
    run_check: Annotated[bool, typer.Option("--check/--no-check", help="Compare ONNX Runtime with PyTorch before writing.")] = True,
    data_dir: Annotated[Optional[Path], typer.Option("--data", metavar="ROOT", help=f"Check on real images instead of random inputs: {DATA_HELP}")] = None,
    split: SplitOpt = "validation",
    limit: Annotated[int, typer.Option("--limit", min=1, help="Inputs to check on.")] = 32,
    min_agreement: Annotated[float, typer.Option("--min-agreement", min=0, max=100, help="Top-1 agreement (%) the check requires; K-Medoids near-ties may flip under other kernels.")] = 90.0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
    stop_at_fixed_point: StopOpt = False,
    optimize: OptimizeOpt = False,
    quantize: QuantizeOpt = None,
    as_json: JsonOpt = False,
):
    """Export to ONNX with the pooling in the graph and a dynamic batch axis, checked in ONNX Runtime."""
    from vitpool.export import GraphPasses, check_opset, export as export_model

    from vitpool.data import check_source

    refuse_existing_output(out_file, force)
    check_opset(opset)
    passes = GraphPasses(optimize, quantize)
    source = data_flags.source(data_dir, split) if data_dir is not None or data_flags.dataset else None
    if source is not None:
        check_source(source)  # before the export, which takes a while
    loaded, pooled = build(model_or_dir, flags)
    with err.status("exporting to ONNX and checking it in ONNX Runtime", spinner="dots"):
        result = export_model(pooled if pooled is not None else loaded.model, out_file, opset, batch_size, run_check,
                              source, limit, min_agreement, force, stop_at_fixed_point, passes,
                              unpooled=loaded.model if pooled is not None else None)
    if as_json:
        emit_json({"model": loaded.name, "pooling": pooling_json(pooled), **result.to_json()})
        return
    for line in render.export_lines(result):
        out.print(line, highlight=False)


@app.command()
@user_errors
@model_options(pretrained=False)
def bench(
    model_or_dir: ModelArg,
    flags: ModelFlags,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    runtime: Annotated[Optional[str], typer.Option("--runtime", help="Comma list of torch, torch-compile, onnxruntime. Default: torch,onnxruntime (onnxruntime on CUDA only where onnxruntime-gpu is installed).")] = None,
    batch_size: Annotated[str, typer.Option("--batch-size", help="Comma list of batch sizes.")] = "1,32",
    amp: Annotated[Optional[str], typer.Option("--amp", help="bf16 or fp16 autocast for the torch runtimes on CUDA.")] = None,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed calls per model first.")] = 5,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed calls per model, interleaved.")] = 30,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for torch and ONNX Runtime (default: torch's).")] = None,
    stop_at_fixed_point: StopOpt = False,
    optimize: OptimizeOpt = False,
    quantize: QuantizeOpt = None,
    as_json: JsonOpt = False,
):
    """Time the unpooled and the converted model side by side: p50/p90 latency, images/s, peak memory, efficiency."""
    from vitpool.bench import bench as run_bench, rows_to_json
    from vitpool.config import parse_int_list
    from vitpool.export import GraphPasses

    batches = parse_int_list(batch_size, "--batch-size")
    if not batches or min(batches) < 1:
        raise VitpoolError(f"--batch-size must be a comma list of positive integers; got {batch_size!r}")
    if runtime is None:
        runtime = "torch,onnxruntime" if device != "cuda" or _onnxruntime_has_cuda() else "torch"
    runtimes = [r.strip() for r in runtime.split(",") if r.strip()]
    if not runtimes:
        raise VitpoolError(f"--runtime takes a comma list of torch, torch-compile, onnxruntime; got {runtime!r}")
    loaded, pooled = build(model_or_dir, flags)
    if pooled is None:
        raise VitpoolError("bench compares a converted model with its original: pass a converted directory, --k or --budget")
    with err.status("benchmarking", spinner="dots") as status:
        rows, env = run_bench(loaded.model, pooled, runtimes, list(batches), device, amp or "fp32", warmup, repeats,
                              threads, on_step=lambda text: status.update(f"benchmarking: {text}"),
                              stop_at_fixed_point=stop_at_fixed_point, passes=GraphPasses(optimize, quantize))
    if as_json:
        emit_json(rows_to_json(rows, env))
        return
    out.print(render.bench_table(loaded.name, pooled.vitpool_config, rows))
    out.print(f"{env['device_name']}, {env['threads']} threads; torch {env['torch']}, timm {env['timm']}, "
              f"onnxruntime {env['onnxruntime']}. Efficiency = speed-up / MAC speed-up (1.0: every MAC saved became time saved). "
              "Peak MB: torch, the most tensor memory held at once; onnxruntime, the resident-set rise of a fresh session.",
              highlight=False)

def _onnxruntime_has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
