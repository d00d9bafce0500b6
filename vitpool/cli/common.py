"""What every command shares: the typer app, the consoles, one-line errors, building the model from its flags."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

import typer
from rich.console import Console

from vitpool.cli.options import ModelFlags
from vitpool.errors import VitpoolError

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
    if (budget is not None or target_gmacs is not None) and k is not None:
        raise VitpoolError("give either --budget/--target-gmacs or --k, not both: a budget chooses K (in the blocks "
                           "of --layers where given)")
    pooling_flags = {"--method": method, "--k": k, "--layers": layers, "--iters": iters, "--budget": budget,
                     "--target-gmacs": target_gmacs, "--output": flags.output, "--proportional": flags.proportional,
                     "--position": flags.position, "--trim-last": flags.trim_last, "--spread": flags.spread,
                     "--preset": flags.preset}
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

        config, reached, baseline = solve(loaded.model, template, budget, target_gmacs, layers=layer_values or None,
                                          family=flags.family())
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
