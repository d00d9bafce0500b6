"""The `vitpool` command line: each command parses, calls the library, and prints (rich, or `--json` to stdout).

torch and timm are imported inside the commands, so `vitpool --help` answers at once.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from vitpool.data import Preprocess, Source
from vitpool.errors import VitpoolError, refuse_existing_output, writable_parent

app = typer.Typer(
    help="Token Pooling for timm Vision Transformers: convert, count MACs, evaluate, export to ONNX, benchmark, schedule, sweep, visualize, fine-tune, push to the Hugging Face Hub.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


class WarningLines(logging.Handler):
    """What vitpool logs as a warning (unreadable images and folders, class mapping): one line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        if main_process():
            err.print(f"warning: {record.getMessage()}", markup=False, highlight=False, soft_wrap=True)


logging.getLogger("vitpool").addHandler(WarningLines())

ModelArg = Annotated[str, typer.Argument(metavar="MODEL_OR_DIR", help="timm model name (with its pretrained tag), alias (deit_tiny, deit_small, deit_base), hf-hub:ORG/NAME or local-dir:DIR (timm's sources, also for models saved by vitpool), or a directory written by `vitpool convert`.")]
CheckpointOpt = Annotated[Optional[Path], typer.Option("--checkpoint", help="Local weights: .safetensors, or .pth/.pt state dict (also under 'model'/'state_dict'); never unpickles code.")]
PretrainedOpt = Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="Load timm's pretrained weights (needs the model hub) or keep random ones.")]
MethodOpt = Annotated[Optional[str], typer.Option("--method", help="kmedoids (default), wkmedoids (the paper's), wkmeans, kmeans, importance, random, grid, tome.")]
KOpt = Annotated[Optional[str], typer.Option("--k", help="Comma list of patch-token counts to keep (prefix tokens excluded), e.g. 160,128,96, or of fractions of the tokens reaching each layer, e.g. 0.67,0.45,0.3 (any input size of a dynamic_img_size model).")]
LayersOpt = Annotated[Optional[str], typer.Option("--layers", help="Comma list of the 0-based blocks each K applies in. Default: spread evenly (3 values on 12 blocks: 3,6,9 after attention, 2,5,8 after the block).")]
ItersOpt = Annotated[Optional[int], typer.Option("--iters", help="Clustering iterations (at most; default 2, the paper preset 5).")]
OutputOpt = Annotated[Optional[str], typer.Option("--output", help="K-Medoids outputs: mean (default: each cluster's weighted mean) or medoid (the paper's, --preset paper).")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="Settings and --budget family to start from: vitpool (default: the best measured, K-Medoids with mean outputs after attention, every block from a quarter of the depth, last block trimmed to the head's tokens), paper (Marin et al.: weighted K-Medoids, medoid outputs, after the block, three layers) or tome (ToMe as published). The other flags override it.")]
PositionOpt = Annotated[Optional[str], typer.Option("--position", help="Where a pooling layer sits in its block: after-attention (default: between attention and MLP, ToMe's place, so the MLP runs on K tokens) or after-block (the paper's).")]
ProportionalOpt = Annotated[Optional[bool], typer.Option("--proportional/--no-proportional", help="Add log(cluster size) to the attention logits after pooling (ToMe's proportional attention) and weight the clustering by it. Default: on (off in --preset paper).")]
TrimOpt = Annotated[Optional[bool], typer.Option("--trim-last/--no-trim-last", help="Run the last block's MLP on the tokens a class-token head reads (CLS and other prefix tokens) only: exact, and the MACs saved go to the pooling schedule; no effect on heads that pool all tokens or a last block with a pooling layer. Default: on (off in --preset paper and tome, as published).")]
BudgetOpt = Annotated[Optional[float], typer.Option("--budget", help="Instead of --k/--layers: the fraction of the unpooled MACs to keep, e.g. 0.6 (pooling layers included; see README for the schedule family).")]
TargetOpt = Annotated[Optional[float], typer.Option("--target-gmacs", help="Instead of --k/--layers: the GMACs to land on, within 1%.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print only a JSON document on stdout.")]
DATA_HELP = ("an image folder ROOT/<class>/<image> or a .tar of class folders (WordNet-id folders map to ImageNet-1k "
             "classes, other folders to their sorted order); with --dataset wds/NAME the folder of the shards; with "
             "hfds/NAME the datasets cache (optional).")
DataOpt = Annotated[Optional[Path], typer.Option("--data", metavar="ROOT", help=f"Labelled images: {DATA_HELP}")]
DataOption = functools.partial(typer.Option, rich_help_panel="Data (timm validate.py names)")
SplitOpt = Annotated[str, DataOption("--split", help="The split, as timm names it: for an image folder, its subfolder of that name if there is one (val, valid, validation and train, training stand for each other), else --data itself; for wds/, a split of _info.json or a shard pattern such as 'val-{000000..000009}.tar'; for hfds/, the dataset's split.")]
StopOpt = Annotated[bool, typer.Option("--stop-at-fixed-point", help="ONNX graphs skip the clustering iterations after a fixed point (If nodes): the same outputs, less pooling time in ONNX Runtime on the CPU at batch 1; ONNX Runtime's CUDA graphs do not capture If nodes.")]


@dataclass(frozen=True)
class ModelFlags:
    """The model and pooling options of a command, as parsed (None: not given)."""

    checkpoint: Path | None = None
    pretrained: bool = True
    method: str | None = None
    k: str | None = None
    layers: str | None = None
    iters: int | None = None
    output: str | None = None
    proportional: bool | None = None
    position: str | None = None
    trim_last: bool | None = None
    preset: str | None = None
    budget: float | None = None
    target_gmacs: float | None = None

    def unpooled(self) -> ModelFlags:
        """The same weights with no pooling asked for."""
        return ModelFlags(self.checkpoint, self.pretrained)

    def template(self):
        """The pooling setting asked for, K and layers aside: the preset's where a flag is not given."""
        from vitpool.config import check_budget, check_method_and_output, make_config

        template = make_config(self.method, layers=(), iters=self.iters, output=self.output, proportional=self.proportional,
                               position=self.position, preset=self.preset or "vitpool", trim_last=self.trim_last)
        check_method_and_output(template.method, template.output, template.position)
        check_budget(self.budget, self.target_gmacs)
        return template

    def family(self) -> str:
        """The budget family of the preset asked for."""
        from vitpool.config import preset_named

        return preset_named(self.preset or "vitpool").family


MODEL_OPTIONS = {"checkpoint": CheckpointOpt, "pretrained": PretrainedOpt, "method": MethodOpt, "k": KOpt,
                 "layers": LayersOpt, "iters": ItersOpt, "output": OutputOpt, "proportional": ProportionalOpt,
                 "position": PositionOpt, "trim_last": TrimOpt, "preset": PresetOpt, "budget": BudgetOpt, "target_gmacs": TargetOpt}


def option_group(parameter: str, group: type, options: dict, defaults: dict):
    """Give a command `options` (name -> annotation, typer has no option groups) in place of its `parameter`,
    which receives them as one `group` object; `defaults` are the options' defaults."""

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)  # the module postpones annotations; typer needs them
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=defaults[name])
                 for name, annotation in options.items()]
        parameters = []
        for existing in signature.parameters.values():
            parameters += added if existing.name == parameter else [existing.replace(kind=inspect.Parameter.KEYWORD_ONLY)]

        @functools.wraps(command)
        def wrapper(**kwargs):
            return command(**{parameter: group(**{name: kwargs.pop(name) for name in options})}, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=parameters)
        return wrapper

    return decorate


def model_options(pretrained: bool = True, omit: tuple[str, ...] = (), **replaced):
    """The shared model and pooling options in place of a command's `flags: ModelFlags` parameter; `replaced`
    swaps an option's annotation, `omit` leaves options out."""
    options = {name: replaced.get(name, annotation) for name, annotation in MODEL_OPTIONS.items() if name not in omit}
    return option_group("flags", ModelFlags, options, {name: pretrained if name == "pretrained" else None for name in options})


@dataclass(frozen=True)
class DataFlags:
    """timm's data options of a command, as parsed (None: the model's or the dataset's own)."""

    dataset: str = ""
    class_map: Path | None = None
    img_size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def source(self, root: Path | None, split: str) -> Source:
        return Source(str(root) if root is not None else None, self.dataset, split,
                      str(self.class_map) if self.class_map is not None else None)

    def preprocess(self) -> Preprocess:
        return Preprocess(self.img_size, self.crop_pct, self.interpolation, self.mean, self.std)


RGB = Optional[tuple[float, float, float]]
DATA_OPTIONS = {
    "dataset": Annotated[str, DataOption("--dataset", metavar="NAME", help="How --data is read, as timm's create_dataset reads it: empty (default) for an image folder or a .tar, by what --data is; wds/NAME for WebDataset shards (.jpg/.png with .cls) in --data; hfds/NAME for a Hugging Face dataset, NAME a Hub id or a local directory, --data its cache. wds/ and hfds/ need the webdataset and datasets packages: pip install 'vitpool\\[data]' (make install adds them).")],
    "class_map": Annotated[Optional[Path], DataOption("--class-map", metavar="FILE", help="timm's class map: a .txt with one class (folder) name per line in class-index order, or a .pkl {name: index}; folders it does not name are left out. Default: WordNet-id folders take ImageNet-1k indices, other folders their sorted order, hfds/ its own labels.")],
    "img_size": Annotated[Optional[int], DataOption("--img-size", metavar="N", help="Input size (default: the one the model was built for; another needs a model made with dynamic_img_size).")],
    "crop_pct": Annotated[Optional[float], DataOption("--crop-pct", help="Centre crop: resize to img-size / crop-pct, then crop img-size (default: the model's pretrained config, 0.9 for DeiT).")],
    "interpolation": Annotated[Optional[str], DataOption("--interpolation", help="Resize interpolation: bilinear, bicubic, nearest, box, hamming or lanczos (default: the model's).")],
    "mean": Annotated[RGB, DataOption("--mean", metavar="R G B", help="Normalization mean, as timm's three values: --mean 0.5 0.5 0.5 (default: the model's).")],
    "std": Annotated[RGB, DataOption("--std", metavar="R G B", help="Normalization std, as timm's three values: --std 0.5 0.5 0.5 (default: the model's).")],
}
PREPROCESS_OPTIONS = ("img_size", "crop_pct", "interpolation", "mean", "std")


def data_options(omit: tuple[str, ...] = ()):
    """timm's data options in place of a command's `data_flags: DataFlags` parameter; `omit` leaves options out."""
    options = {name: annotation for name, annotation in DATA_OPTIONS.items() if name not in omit}
    return option_group("data_flags", DataFlags, options, {name: getattr(DataFlags(), name) for name in options})


def main_process() -> bool:
    """False in the other processes torchrun starts (RANK > 0): they neither report nor print results."""
    return os.environ.get("RANK", "0") == "0"


def user_errors(command):
    """Turn a VitpoolError into one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except VitpoolError as error:
            if main_process():  # under torchrun every process meets the same error; one says it
                err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def build(model_or_dir: str, flags: ModelFlags):
    """(unpooled model, converted model or None) from MODEL_OR_DIR and the model and pooling flags."""
    from vitpool.adapter import apply_pooling, check_model
    from vitpool.config import default_layers, parse_int_list, parse_k
    from vitpool.models import load_model_or_dir

    method, k, layers, iters, budget, target_gmacs = flags.method, flags.k, flags.layers, flags.iters, flags.budget, flags.target_gmacs
    if (budget is not None or target_gmacs is not None) and (k is not None or layers is not None):
        raise VitpoolError("give either --budget/--target-gmacs or --k/--layers, not both")
    pooling_flags = {"--method": method, "--k": k, "--layers": layers, "--iters": iters, "--budget": budget,
                     "--target-gmacs": target_gmacs, "--output": flags.output, "--proportional": flags.proportional,
                     "--position": flags.position, "--trim-last": flags.trim_last, "--preset": flags.preset}
    given = [flag for flag, value in pooling_flags.items() if value is not None]
    k_values, layer_values = parse_k(k), parse_int_list(layers, "--layers")
    template = flags.template()  # checks the flags before the model loads
    loaded = load_model_or_dir(model_or_dir, str(flags.checkpoint) if flags.checkpoint else None, flags.pretrained)
    if loaded.config is not None and given:
        raise VitpoolError(
            f"{model_or_dir} is already converted ({loaded.config.describe()}); to try {', '.join(given)} pass "
            f"its base model and weights instead: {loaded.name} --checkpoint {Path(model_or_dir) / 'model.safetensors'}"
        )
    if loaded.config is None and given and not k_values and budget is None and target_gmacs is None:
        raise VitpoolError(f"{', '.join(given)} given without --k: say how many tokens to keep, e.g. --k 160,128,96")
    config = loaded.config
    if config is None and (budget is not None or target_gmacs is not None):
        from vitpool.budget import solve

        config, reached, baseline = solve(loaded.model, template, budget, target_gmacs, family=flags.family())
        err.print(f"schedule for the budget: {config.flags()} ({reached / 1e9:.3f} of {baseline / 1e9:.3f} GMACs, "
                  f"{reached / baseline:.3f})", highlight=False)
    if config is None and k_values:
        check_model(loaded.model)
        config = replace(template, k=k_values, layers=layer_values if layers is not None else
                         default_layers(len(k_values), len(loaded.model.blocks), template.position))
    pooled = apply_pooling(loaded.model, config) if config is not None else None
    return loaded, pooled


def refuse_saved_model(model: str, command: str) -> None:
    """Commands that convert take the original model, not a directory written by `vitpool convert`."""
    from vitpool.models import is_saved_model, split_source

    source, target = split_source(model)
    if source != "hf-hub" and is_saved_model(target):
        raise VitpoolError(f"{model} is a saved model; {command} takes a timm model name (with --checkpoint for local weights)")


def emit_json(document) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


def pooling_json(pooled) -> dict | None:
    return pooled.vitpool_config.to_dict() if pooled is not None else None


@app.command()
@user_errors
@model_options()
def convert(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="timm model name (with its pretrained tag) or alias (deit_tiny, deit_small, deit_base), hf-hub:ORG/NAME or local-dir:DIR.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write (refused if it exists, unless --force).")],
    flags: ModelFlags,
    calibrate: Annotated[Optional[Path], typer.Option("--calibrate", metavar="DIR", help="With --budget: search the schedule on these unlabelled images (a folder of any layout, or a .tar) as `vitpool schedule` does, instead of taking the budget family's; vitpool.json records what it was scored on.")] = None,
    calibrate_limit: Annotated[int, typer.Option("--calibrate-limit", min=1, help="Calibration images, spread evenly over DIR.")] = 100,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Data-loading processes for --calibrate.")] = 2,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    as_json: JsonOpt = False,
):
    """Convert a pretrained ViT with Token Pooling and save it as a self-describing directory."""
    from vitpool.models import save

    if flags.k is None and flags.budget is None and flags.target_gmacs is None:
        raise VitpoolError("convert needs --k (the patch tokens to keep, e.g. --k 160,128,96) or --budget (e.g. 0.6)")
    if calibrate is not None and flags.budget is None and flags.target_gmacs is None:
        raise VitpoolError("--calibrate searches the schedule for a budget: give --budget (e.g. 0.6) or --target-gmacs instead of --k")
    refuse_existing_output(out_dir, force)
    writable_parent(out_dir)
    refuse_saved_model(model, "convert")
    calibration = None
    if calibrate is None:
        loaded, pooled = build(model, flags)
    else:
        from vitpool.adapter import apply_pooling
        from vitpool.schedule import calibrate as run_calibration

        template = flags.template()
        loaded, _ = build(model, flags.unpooled())
        with err.status("calibrating", spinner="dots") as status:
            found, calibration = run_calibration(loaded.model, calibrate, template, flags.budget, flags.target_gmacs,
                                                 flags.family(), calibrate_limit, workers,
                                                 on_step=lambda text: status.update(f"calibrating: {text}"))
        pooled = apply_pooling(loaded.model, found.config)
        err.print(f"calibrated on {calibration['images']} images: KL {calibration['kl']:.4f} "
                  f"(the budget family's schedule: {calibration['family']['kl']:.4f})", highlight=False)
    path = save(pooled, out_dir, force=force, calibration=calibration)
    summary = {"out": str(path), "base_model": loaded.name, "pooling": pooled.vitpool_config.to_dict(),
               **({"calibration": calibration} if calibration else {})}
    if as_json:
        emit_json(summary)
    else:
        out.print(f"wrote {path}: {loaded.name}, {pooled.vitpool_config.describe()}", highlight=False)


@app.command()
@user_errors
@model_options(pretrained=False)
def flops(
    model_or_dir: ModelArg,
    flags: ModelFlags,
    as_json: JsonOpt = False,
):
    """Count multiply-accumulates (MACs) per block, pooling layers included, against the unpooled model."""
    from vitpool.adapter import check_model
    from vitpool.flops import count_macs

    loaded, pooled = build(model_or_dir, flags)
    if pooled is None:
        check_model(loaded.model)  # the per-block table needs timm's VisionTransformer blocks
    report = count_macs(pooled, baseline=loaded.model) if pooled is not None else count_macs(loaded.model)
    document = {"model": loaded.name, "pooling": pooling_json(pooled), **report.to_json()}
    if as_json:
        emit_json(document)
        return
    table = Table(title=f"{loaded.name}: MACs at batch 1, input {'x'.join(map(str, report.input_size))}")
    for column in ("block", "tokens in", "tokens out", "block GMACs", "pooling GMACs"):
        table.add_column(column, justify="right")
    for b in report.blocks:
        table.add_row(str(b.index), str(b.tokens_in), str(b.tokens_out), f"{b.block_macs / 1e9:.4f}", f"{b.pool_macs / 1e9:.4f}" if b.pool_macs else "")
    out.print(table)
    out.print(f"tokens include {report.num_prefix_tokens} prefix token(s); "
              + (pooled.vitpool_config.describe() if pooled is not None else "no pooling"), highlight=False)
    out.print(
        f"total {report.macs / 1e9:.3f} GMACs (pooling layers {report.pooling_macs / 1e9:.3f}), "
        f"unpooled {report.baseline_macs / 1e9:.3f} GMACs, ratio {report.ratio:.3f}",
        highlight=False,
    )


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
    table = Table(title=f"{loaded.name} on {source} ({result.n} images, {result.mapping} class mapping)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("top-1 (%)", f"{result.top1:.2f}")
    table.add_row("top-5 (%)", f"{result.top5:.2f}")
    if result.agreement is not None:
        table.add_row("unpooled top-1 (%)", f"{result.baseline_top1:.2f}")
        table.add_row("agreement with unpooled (%)", f"{result.agreement:.2f}")
        table.add_row("KL(unpooled || pooled), nats", f"{result.kl:.4f}")
    out.print(table)


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
    as_json: JsonOpt = False,
):
    """Export to ONNX with the pooling in the graph and a dynamic batch axis, checked in ONNX Runtime."""
    from vitpool.export import LOGIT_ATOL, check_opset, export as export_model

    from vitpool.data import check_source

    refuse_existing_output(out_file, force)
    check_opset(opset)
    source = data_flags.source(data_dir, split) if data_dir is not None or data_flags.dataset else None
    if source is not None:
        check_source(source)  # before the export, which takes a while
    loaded, pooled = build(model_or_dir, flags)
    with err.status("exporting to ONNX and checking it in ONNX Runtime", spinner="dots"):
        result = export_model(pooled if pooled is not None else loaded.model, out_file, opset, batch_size, run_check,
                              source, limit, min_agreement, force, stop_at_fixed_point)
    if as_json:
        emit_json({"model": loaded.name, "pooling": pooling_json(pooled), **result.to_json()})
        return
    out.print(f"wrote {result.path} ({result.size_mb:.1f} MB, opset {result.opset}, input {result.input_name} "
              f"{result.input_shape}{', stops at fixed point' if result.stops_at_fixed_point else ''}, "
              f"exported in {result.seconds:.1f} s)", highlight=False)
    if result.check is not None:
        c = result.check
        out.print(f"ONNX Runtime vs PyTorch on {c.n} {'random inputs' if c.source == 'random' else 'images from ' + c.source}: "
                  f"top-1 agreement {c.agreement:.1f}% (required {c.min_agreement:.0f}%), logits within {LOGIT_ATOL:g} "
                  f"on {c.close:.1f}%, max abs diff {c.max_abs_diff:.3g}", highlight=False)


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
    as_json: JsonOpt = False,
):
    """Time the unpooled and the converted model side by side: p50/p90 latency, images/s, peak memory, efficiency."""
    from vitpool.bench import bench as run_bench, rows_to_json
    from vitpool.config import parse_int_list

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
                              stop_at_fixed_point=stop_at_fixed_point)
    if as_json:
        emit_json(rows_to_json(rows, env))
        return
    table = Table(title=f"{loaded.name}, {pooled.vitpool_config.describe()}")
    for column in ("model", "runtime", "device", "precision", "batch", "p50 ms", "p90 ms", "images/s", "peak MB", "GMACs/img", "speed-up", "MAC speed-up", "efficiency"):
        table.add_column(column, justify="left" if column in ("model", "runtime", "device", "precision") else "right")
    fmt = lambda value, spec: "" if value is None else format(value, spec)  # noqa: E731
    for r in rows:
        table.add_row(r.model, r.runtime, r.device, r.precision, str(r.batch_size), f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}",
                      f"{r.images_per_s:.1f}", fmt(r.peak_mem_mb, ".0f"), f"{r.gmacs:.3f}", fmt(r.speedup, ".2f"),
                      fmt(r.mac_speedup, ".2f"), fmt(r.efficiency, ".2f"))
    out.print(table)
    out.print(f"{env['device_name']}, {env['threads']} threads; torch {env['torch']}, timm {env['timm']}, "
              f"onnxruntime {env['onnxruntime']}. Efficiency = speed-up / MAC speed-up (1.0: every MAC saved became time saved). "
              "Peak MB: torch, the most tensor memory held at once; onnxruntime, the resident-set rise of a fresh session.",
              highlight=False)


@app.command()
@user_errors
@model_options(omit=("k",), layers=Annotated[Optional[str], typer.Option("--layers", help="Comma list of the blocks to pool in (default: the budget family's layers, then 1, 2 and 3 layers spread).")])
@data_options(omit=("class_map",))
def schedule(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="timm model name (with its pretrained tag) or alias (deit_tiny, deit_small, deit_base), hf-hub:ORG/NAME or local-dir:DIR.")],
    out_file: Annotated[Path, typer.Option("--out", help="JSON file for the schedule (refused if it exists, unless --force).")],
    data_dir: Annotated[Optional[Path], typer.Option("--data", metavar="ROOT", help="Calibration images, unlabelled: a folder (any images under it), a .tar, or with --dataset the wds/ shards' folder or the hfds/ cache.")] = None,
    *,
    flags: ModelFlags,
    data_flags: DataFlags,
    split: SplitOpt = "validation",
    limit: Annotated[int, typer.Option("--limit", min=1, help="Calibration images, spread evenly over the folder.")] = 100,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Data-loading processes.")] = 2,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
    as_json: JsonOpt = False,
):
    """Search the per-layer K that keeps the model closest to the unpooled one (KL, agreement) within a MAC budget."""
    from vitpool.config import parse_int_list
    from vitpool.schedule import search
    from vitpool.errors import write_atomically
    from vitpool.sweep import load_images

    refuse_existing_output(out_file, force)
    writable_parent(out_file)
    if flags.budget is None and flags.target_gmacs is None:
        raise VitpoolError("schedule needs --budget (a fraction of the unpooled MACs, e.g. 0.6) or --target-gmacs")
    template = flags.template()
    refuse_saved_model(model, "schedule")
    source = data_flags.source(data_dir, split)
    loaded, _ = build(model, flags.unpooled())
    with err.status("reading the calibration images", spinner="dots") as status:
        images = load_images(loaded.model, source, limit, workers=workers, labelled=False, preprocess=data_flags.preprocess())
        status.update("searching")
        result = search(loaded.model, images, template, flags.budget, flags.target_gmacs,
                        parse_int_list(flags.layers, "--layers") or None, on_step=lambda text: status.update(f"searching: {text}"),
                        family=flags.family())
    document = {"model": loaded.name, "budget": flags.budget, "target_gmacs": flags.target_gmacs, "calibration_images": len(images.labels),
                "data": str(source), **result.to_json()}
    write_atomically(out_file, json.dumps(document, indent=2) + "\n")
    if as_json:
        emit_json(document)
        return
    table = Table(title=f"{loaded.name}, {document['method']} at {document['mac_ratio']:.3f} of the MACs, "
                        f"on {document['calibration_images']} calibration images")
    for column in ("schedule", "K after blocks", "KL (nats)", "agreement (%)"):
        table.add_column(column, justify="left" if column in ("schedule", "K after blocks") else "right")
    family = document["family"]
    after = lambda k, layers: f"{','.join(map(str, k))} after {','.join(map(str, layers))}"  # noqa: E731
    table.add_row("--budget", after(family["k"], family["layers"]), f"{family['kl']:.4f}", f"{family['agreement']:.1f}")
    table.add_row("searched", after(document["k"], document["layers"]), f"{document['calibration']['kl']:.4f}",
                  f"{document['calibration']['agreement']:.1f}")
    out.print(table)
    out.print(f"{document['flags']}  ({document['gmacs']:.3f} GMACs; {document['evaluations']} schedules scored); wrote {out_file}",
              highlight=False)


@app.command()
@user_errors
@model_options(omit=("method", "k", "layers", "budget", "target_gmacs"))
@data_options()
def sweep(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="timm model name (with its pretrained tag) or alias (deit_tiny, deit_small, deit_base), hf-hub:ORG/NAME or local-dir:DIR.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for results.json, results.csv and tradeoff.png; a rerun resumes it.")],
    data_dir: DataOpt = None,
    *,
    flags: ModelFlags,
    data_flags: DataFlags,
    split: SplitOpt = "validation",
    methods: Annotated[Optional[str], typer.Option("--methods", help="Comma list of methods (default: all of them, tome included).")] = None,
    budgets: Annotated[str, typer.Option("--budgets", help="Comma list of MAC budgets (fractions of the unpooled MACs).")] = "0.5,0.6,0.75,0.9",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Use N images spread evenly over the dataset (of a wds/ stream, its first N).")] = None,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Data-loading processes.")] = 2,
    calibration: Annotated[Optional[int], typer.Option("--search", min=1, metavar="N", help="Also search each point's schedule (as `vitpool schedule`) on N of the images, and score every point on the others.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Start again even if --out holds a sweep with other settings.")] = False,
    as_json: JsonOpt = False,
):
    """Every method at every MAC budget on your images: top-1, agreement, KL against GMACs, and a plot."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vitpool.sweep import parse_budgets, parse_methods, sweep as run_sweep, sweep_settings

    method_list, budget_list = parse_methods(methods), parse_budgets(budgets)
    template = flags.template()
    refuse_saved_model(model, "sweep")
    loaded, _ = build(model, flags.unpooled())
    source = data_flags.source(data_dir, split)
    settings = sweep_settings(loaded.name, flags.checkpoint, flags.pretrained, source, limit, flags.preset or "vitpool",
                              template, calibration, data_flags.preprocess())
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("sweep", total=None)
        results = run_sweep(loaded.model, settings, out_dir, method_list, budget_list, force, workers,
                            on_progress=lambda text, done, total: progress.update(task, description=text, completed=done, total=total),
                            calibration=calibration)
    if as_json:
        emit_json({"settings": results.settings, "reference": results.reference, "points": results.rows})
        return
    table = Table(title=f"{loaded.name} on {source}: {results.reference['n']} images, unpooled {results.reference['gmacs']:.3f} "
                        f"GMACs, top-1 {results.reference['top1']:.1f}%")
    table.box, table.show_edge = box.SIMPLE_HEAD, False  # narrow: K lists can be long
    for column in ("method", "budget", "schedule", "GMACs", "top-1", "agree", "KL"):  # top-5: results.csv
        table.add_column(column, justify="left" if column in ("method", "schedule") else "right", no_wrap=True)
    table.add_column("K after blocks", min_width=12, overflow="fold")
    for r in sorted(results.rows, key=lambda r: (r["method"], r["budget"], r["schedule"])):
        if "error" in r:
            table.add_row(r["method"], f"{r['budget']:g}", r["schedule"], "", "", "", "", "unreachable (see results.json)")
            continue
        table.add_row(r["method"], f"{r['budget']:g}", r["schedule"], f"{r['gmacs']:.3f}", f"{r['top1']:.1f}",
                      f"{r['agreement']:.1f}", f"{r['kl']:.3f}", f"{','.join(map(str, r['k']))} after {','.join(map(str, r['layers']))}")
    out.print(table)
    out.print(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.csv'} and {out_dir / 'tradeoff.png'}", highlight=False)


@app.command()
@user_errors
@model_options(layers=Annotated[Optional[str], typer.Option("--layers", help="Comma list of blocks: with --k, where to pool (all drawn); for a converted model or --budget, which of its pooling layers to draw. Default: all.")])
@data_options(omit=("dataset", "class_map"))
def visualize(
    model_or_dir: ModelArg,
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="An image file (JPEG, PNG, ...).")],
    out_file: Annotated[Path, typer.Option("--out", help="PNG file to write (refused if it exists, unless --force).")],
    flags: ModelFlags,
    data_flags: DataFlags,
    scale: Annotated[int, typer.Option("--scale", min=1, max=8, help="Upscale the model's input picture by this factor.")] = 2,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
    as_json: JsonOpt = False,
):
    """Draw the image with each 16x16 patch coloured by the token it ends up in after each pooling layer (Fig. 1c)."""
    from vitpool.config import parse_int_list
    from vitpool.visualize import visualize as draw

    refuse_existing_output(out_file, force)
    if out_file.suffix.lower() != ".png":
        raise VitpoolError(f"--out {out_file}: visualize writes a PNG; give a path ending in .png")
    writable_parent(out_file)
    shown = parse_int_list(flags.layers, "--layers") if flags.k is None else ()
    loaded, pooled = build(model_or_dir, flags if flags.k is not None else replace(flags, layers=None))
    if pooled is None:
        raise VitpoolError("visualize shows a converted model's clusters: pass a converted directory, --k or --budget")
    summary = draw(pooled, image, out_file, list(shown) or None, scale, data_flags.preprocess())
    if as_json:
        emit_json({"model": loaded.name, "pooling": pooling_json(pooled), **summary})
        return
    counts = ", ".join(f"{n} tokens after block {layer}" for layer, n in summary["tokens"].items())
    out.print(f"wrote {out_file} ({summary['size'][0]}x{summary['size'][1]}): {counts}", highlight=False)


Hyper = functools.partial(typer.Option, rich_help_panel="Training (timm train.py names)")
Augment = functools.partial(typer.Option, rich_help_panel="Augmentation (timm)")
Distill = functools.partial(typer.Option, rich_help_panel="Distillation from the unpooled model")


@app.command()
@user_errors
@model_options()
@data_options()
def finetune(
    model_or_dir: ModelArg,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder: the fine-tuned converted model, checkpoint.pt, finetune.json, log.jsonl.")],
    data_dir: Annotated[Optional[Path], typer.Option("--data", metavar="ROOT", help=f"Training images (with --distill-only any images, unlabelled): {DATA_HELP} Not wds/: training shuffles and resumes by index.")] = None,
    val_dir: Annotated[Optional[Path], typer.Option("--val", metavar="ROOT", help="Labelled images to validate on before training and after every epoch, read as --data is (--dataset, --class-map); see --val-split.")] = None,
    *,
    flags: ModelFlags,
    data_flags: DataFlags,
    train_split: Annotated[str, DataOption("--train-split", help="The split of --data to train on, as --split elsewhere (timm train.py's name).")] = "train",
    val_split: Annotated[Optional[str], DataOption("--val-split", help="The split to validate on (default validation): of --val, or, given without --val, of --data.")] = None,
    epochs: Annotated[int, Hyper("--epochs")] = 5,
    batch_size: Annotated[int, Hyper("--batch-size", "-b", help="Images per step and process.")] = 32,
    lr: Annotated[float, Hyper("--lr", help="Peak learning rate (AdamW).")] = 5e-5,
    weight_decay: Annotated[float, Hyper("--weight-decay")] = 0.05,
    warmup_epochs: Annotated[int, Hyper("--warmup-epochs", help="Linear warm-up from --warmup-lr, then cosine to --min-lr (per update).")] = 1,
    warmup_lr: Annotated[float, Hyper("--warmup-lr")] = 1e-6,
    min_lr: Annotated[float, Hyper("--min-lr")] = 1e-6,
    grad_accum_steps: Annotated[int, Hyper("--grad-accum-steps", help="Steps whose gradients add up to one update.")] = 1,
    clip_grad: Annotated[Optional[float], Hyper("--clip-grad", help="Clip gradients to this norm (or value, see --clip-mode).")] = None,
    clip_mode: Annotated[str, Hyper("--clip-mode", help="norm, value or agc.")] = "norm",
    amp: Annotated[bool, Hyper("--amp", help="Mixed precision (autocast) with --amp-dtype.")] = False,
    amp_dtype: Annotated[str, Hyper("--amp-dtype", help="bfloat16 (CPU or CUDA) or float16 (CUDA, with a gradient scaler).")] = "bfloat16",
    seed: Annotated[int, Hyper("--seed")] = 42,
    model_ema: Annotated[bool, Hyper("--model-ema", help="Keep an exponential moving average of the weights; it is what gets validated and written.")] = False,
    model_ema_decay: Annotated[float, Hyper("--model-ema-decay")] = 0.9998,
    distill: Annotated[bool, Distill("--distill/--no-distill", help="Add KL divergence from the unpooled model's logits to the label loss.")] = True,
    distill_only: Annotated[bool, Distill("--distill-only", help="Train on the teacher's outputs alone: unlabelled images are enough.")] = False,
    distill_loss_weight: Annotated[float, Distill("--distill-loss-weight")] = 1.0,
    task_loss_weight: Annotated[float, Distill("--task-loss-weight", help="Weight of the label loss (0 with --distill-only).")] = 1.0,
    kd_temperature: Annotated[float, Distill("--kd-temperature", help="Softmax temperature of the distillation loss.")] = 1.0,
    smoothing: Annotated[float, Augment("--smoothing", help="Label smoothing.")] = 0.1,
    mixup: Annotated[float, Augment("--mixup", help="Mixup alpha (0: off).")] = 0.0,
    cutmix: Annotated[float, Augment("--cutmix", help="CutMix alpha (0: off).")] = 0.0,
    aa: Annotated[Optional[str], Augment("--aa", help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1.")] = None,
    reprob: Annotated[float, Augment("--reprob", help="Random erasing probability.")] = 0.0,
    hflip: Annotated[float, Augment("--hflip")] = 0.5,
    color_jitter: Annotated[float, Augment("--color-jitter")] = 0.4,
    scale: Annotated[str, Augment("--scale", help="Random-resized-crop area range MIN,MAX.")] = "0.08,1.0",
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda (default: cuda when present).")] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", min=0, help="Data-loading processes.")] = 2,
    nproc_per_node: Annotated[Optional[int], typer.Option("--nproc-per-node", min=1, help="Train in N processes on this machine, as `torchrun --standalone --nproc_per_node N` does (NCCL on GPUs, gloo on the CPU), exiting as they do with their one error line and without torchrun's failure report. For several machines, run the command under torchrun.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last finished epoch (same settings).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start anew in an existing --out (its earlier run's files are removed).")] = False,
    as_json: JsonOpt = False,
):
    """Fine-tune a converted model, distilled from its unpooled original; runs unchanged under torchrun."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from vitpool.finetune import TrainSettings, finetune as run_finetune, launch_processes

    if nproc_per_node is not None and "RANK" not in os.environ:
        raise typer.Exit(launch_processes(nproc_per_node, without_option(sys.argv[1:], "--nproc-per-node")))

    try:
        scale_range = tuple(float(v) for v in scale.split(","))
    except ValueError:
        scale_range = ()
    if len(scale_range) != 2:
        raise VitpoolError(f"--scale takes MIN,MAX crop-area fractions, e.g. 0.08,1.0; got {scale!r}")
    if resume and force:
        raise VitpoolError("--resume continues the run in --out and --force starts it anew: give one of them")
    settings = TrainSettings(
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
        warmup_lr=warmup_lr, min_lr=min_lr, grad_accum_steps=grad_accum_steps, clip_grad=clip_grad, clip_mode=clip_mode,
        amp=amp, amp_dtype=amp_dtype, seed=seed, distill=distill, distill_only=distill_only,
        distill_loss_weight=distill_loss_weight, task_loss_weight=task_loss_weight, kd_temperature=kd_temperature,
        smoothing=smoothing, mixup=mixup, cutmix=cutmix, model_ema=model_ema, model_ema_decay=model_ema_decay, aa=aa,
        reprob=reprob, hflip=hflip, color_jitter=color_jitter, scale=scale_range,
    )
    settings.check()
    loaded, pooled = build(model_or_dir, flags)
    if pooled is None:
        raise VitpoolError("finetune trains a converted model: pass a directory from `vitpool convert`, or --k or --budget")
    source = {"model": str(Path(model_or_dir).resolve()) if Path(model_or_dir).is_dir() else model_or_dir,
              "checkpoint": str(Path(flags.checkpoint).resolve()) if flags.checkpoint else None,
              "pretrained": flags.pretrained and flags.checkpoint is None, "pooling": pooled.vitpool_config.to_dict()}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[speed]:.1f} img/s"))
    with Progress(*columns, console=err, transient=True, disable=not (main_process() and err.is_terminal)) as progress:
        bars: dict[int, object] = {}

        def on_step(epoch, step, steps, stats):
            if epoch not in bars:
                bars[epoch] = progress.add_task(f"epoch {epoch}/{epochs}", total=steps, loss=0.0, lr=0.0, speed=0.0)
            progress.update(bars[epoch], completed=step, loss=stats["loss"], lr=stats["lr"], speed=stats["images_per_s"])

        def on_epoch(record):
            val = record.get("val")
            line = f"epoch {record['epoch']}/{epochs}"
            if "train_loss" in record:
                line += f": loss {record['train_loss']:.4f}, {record['images_per_s']:.1f} img/s, {record['seconds']:.0f} s"
            if val:
                line += f"; val top-1 {val['top1']:.2f}%, agreement {val['agreement']:.2f}%, KL {val['kl']:.4f}"
            progress.console.print(line, highlight=False, soft_wrap=True)

        validation = (data_flags.source(val_dir if val_dir is not None else data_dir, val_split or "validation")
                      if val_dir is not None or val_split is not None else None)
        result = run_finetune(pooled, loaded.model, data_flags.source(data_dir, train_split), out_dir, settings, source,
                              val_dir=validation, resume=resume, force=force, device=device, workers=workers,
                              on_step=on_step, on_epoch=on_epoch, preprocess=data_flags.preprocess())
    if not main_process():
        return
    if as_json:
        emit_json({"out": str(out_dir), "model": loaded.name, "pooling": pooling_json(pooled), "history": result.history})
        return
    table = Table(title=f"fine-tuned {loaded.name}, {pooled.vitpool_config.describe()} -> {out_dir}")
    for column in ("epoch", "train loss", "lr", "images/s", "val top-1", "val top-5", "agreement", "KL"):
        table.add_column(column, justify="right")
    for record in result.history:
        val = record.get("val") or {}
        cells = [f"{record['train_loss']:.4f}", f"{record['lr']:.1e}", f"{record['images_per_s']:.1f}"] if "train_loss" in record else ["", "", ""]
        cells += [f"{val[key]:.2f}" if val else "" for key in ("top1", "top5", "agreement")]
        cells.append(f"{val['kl']:.4f}" if val else "")
        table.add_row(str(record["epoch"]), *cells)
    out.print(table)


@app.command()
@user_errors
def push(
    directory: Annotated[str, typer.Argument(metavar="DIR", help="A directory written by `vitpool convert` (or finetune).")],
    repo_id: Annotated[str, typer.Argument(metavar="REPO_ID", help="The Hub repository to create or update, ORG/NAME.")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Labelled images to measure top-1 and agreement with the unpooled model on, for the model card.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="At most this many images of --data.")] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    token: Annotated[Optional[str], typer.Option("--token", help="Hub token (default: the one `hf auth login` stored, or HF_TOKEN).")] = None,
    as_json: JsonOpt = False,
):
    """Upload a converted model to the Hugging Face Hub with a model card (pooling, MACs, accuracy); it then
    loads as hf-hub:REPO_ID in vitpool and, unpooled, in timm."""
    from vitpool.hub import push as push_model

    url = push_model(directory, repo_id, data=str(data) if data else None, limit=limit, private=private, token=token)
    if as_json:
        emit_json({"repo_id": repo_id, "commit_url": url})
    else:
        out.print(f"pushed {directory} to {repo_id}: {url}", highlight=False, soft_wrap=True)


def without_option(argv: list[str], name: str) -> list[str]:
    """`argv` without `name VALUE` or `name=VALUE`."""
    kept, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument == name:
            skip = True
        elif not argument.startswith(f"{name}="):
            kept.append(argument)
    return kept


def _onnxruntime_has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def main() -> None:
    """The console script: typer's app, with click's usage errors (a value that does not parse or is out of
    range, a missing or unknown option) as the one `error:` line and exit code 2 every other error gets."""
    click = sys.modules[typer.BadParameter.__module__]  # the click typer runs on (its own copy in typer 0.2x)
    help_only = getattr(click, "NoArgsIsHelpError", ())
    try:
        code = app(standalone_mode=False)
    except help_only as error:
        error.show()
        code = error.exit_code
    except click.UsageError as error:
        command = error.ctx.command_path if error.ctx is not None else "vitpool"
        err.print(f"[bold red]error:[/] {error.format_message()} (see {command} --help)", highlight=False, soft_wrap=True)
        code = 2
    except typer.Abort:
        err.print("Aborted!")
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # the processes `finetune --nproc-per-node` starts
    main()
