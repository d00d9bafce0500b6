"""`vitpool convert` and `vitpool flops`: a converted model, and what it costs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vitpool.cli import render
from vitpool.cli.common import app, build, emit_json, err, out, pooling_json, refuse_saved_model, user_errors
from vitpool.cli.options import JsonOpt, ModelArg, ModelFlags, model_options
from vitpool.errors import VitpoolError
from vitpool.outputs import refuse_existing_output, writable_parent


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
    out.print(render.flops_table(loaded.name, report))
    out.print(f"tokens include {report.num_prefix_tokens} prefix token(s); "
              + (pooled.vitpool_config.describe() if pooled is not None else "no pooling"), highlight=False)
    out.print(
        f"total {report.macs / 1e9:.3f} GMACs (pooling layers {report.pooling_macs / 1e9:.3f}), "
        f"unpooled {report.baseline_macs / 1e9:.3f} GMACs, ratio {report.ratio:.3f}",
        highlight=False,
    )
