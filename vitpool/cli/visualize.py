"""`vitpool visualize`: which patches each pooled token stands for."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from vitpool.cli.common import app, build, emit_json, out, pooling_json, user_errors
from vitpool.cli.options import DataFlags, JsonOpt, ModelArg, ModelFlags, data_options, model_options
from vitpool.errors import VitpoolError
from vitpool.outputs import refuse_existing_output, writable_parent


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
