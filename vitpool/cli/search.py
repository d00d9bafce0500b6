"""`vitpool schedule` and `vitpool sweep`: the schedule for a budget, and the accuracy-compute trade-off."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from vitpool.cli import render
from vitpool.cli.common import app, build, emit_json, err, out, refuse_saved_model, user_errors
from vitpool.cli.options import DataFlags, DataOpt, JsonOpt, ModelFlags, SplitOpt, data_options, model_options
from vitpool.errors import VitpoolError
from vitpool.outputs import refuse_existing_output, writable_parent


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
    from vitpool.evaluate import load_images
    from vitpool.outputs import write_atomically

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
    out.print(render.schedule_table(loaded.name, document))
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
    out.print(render.sweep_table(loaded.name, source, results))
    out.print(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.csv'} and {out_dir / 'tradeoff.png'}", highlight=False)
