"""`vitpool finetune`: distillation from the unpooled model with timm's training pieces."""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from vitpool.cli import render
from vitpool.cli.common import app, build, emit_json, err, main_process, out, pooling_json, user_errors
from vitpool.cli.options import DATA_HELP, DataFlags, DataOption, JsonOpt, ModelArg, ModelFlags, data_options, model_options, option_group
from vitpool.errors import VitpoolError
from vitpool.finetune import TrainSettings


Hyper = functools.partial(typer.Option, rich_help_panel="Training (timm train.py names)")
Augment = functools.partial(typer.Option, rich_help_panel="Augmentation (timm)")
Distill = functools.partial(typer.Option, rich_help_panel="Distillation from the unpooled model")

TRAIN_OPTIONS = {  # their defaults are TrainSettings's
    "epochs": Annotated[int, Hyper("--epochs")],
    "batch_size": Annotated[int, Hyper("--batch-size", "-b", help="Images per step and process.")],
    "lr": Annotated[float, Hyper("--lr", help="Peak learning rate (AdamW).")],
    "weight_decay": Annotated[float, Hyper("--weight-decay")],
    "warmup_epochs": Annotated[int, Hyper("--warmup-epochs", help="Linear warm-up from --warmup-lr, then cosine to --min-lr (per update).")],
    "warmup_lr": Annotated[float, Hyper("--warmup-lr")],
    "min_lr": Annotated[float, Hyper("--min-lr")],
    "grad_accum_steps": Annotated[int, Hyper("--grad-accum-steps", help="Steps whose gradients add up to one update.")],
    "clip_grad": Annotated[Optional[float], Hyper("--clip-grad", help="Clip gradients to this norm (or value, see --clip-mode).")],
    "clip_mode": Annotated[str, Hyper("--clip-mode", help="norm, value or agc.")],
    "amp": Annotated[bool, Hyper("--amp", help="Mixed precision (autocast) with --amp-dtype.")],
    "amp_dtype": Annotated[str, Hyper("--amp-dtype", help="bfloat16 (CPU or CUDA) or float16 (CUDA, with a gradient scaler).")],
    "seed": Annotated[int, Hyper("--seed")],
    "model_ema": Annotated[bool, Hyper("--model-ema", help="Keep an exponential moving average of the weights; it is what gets validated and written.")],
    "model_ema_decay": Annotated[float, Hyper("--model-ema-decay")],
    "distill": Annotated[bool, Distill("--distill/--no-distill", help="Add KL divergence from the unpooled model's logits to the label loss.")],
    "distill_only": Annotated[bool, Distill("--distill-only", help="Train on the teacher's outputs alone: unlabelled images are enough.")],
    "distill_loss_weight": Annotated[float, Distill("--distill-loss-weight")],
    "task_loss_weight": Annotated[float, Distill("--task-loss-weight", help="Weight of the label loss (0 with --distill-only).")],
    "kd_temperature": Annotated[float, Distill("--kd-temperature", help="Softmax temperature of the distillation loss.")],
    "smoothing": Annotated[float, Augment("--smoothing", help="Label smoothing.")],
    "mixup": Annotated[float, Augment("--mixup", help="Mixup alpha (0: off).")],
    "cutmix": Annotated[float, Augment("--cutmix", help="CutMix alpha (0: off).")],
    "aa": Annotated[Optional[str], Augment("--aa", help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1.")],
    "reprob": Annotated[float, Augment("--reprob", help="Random erasing probability.")],
    "hflip": Annotated[float, Augment("--hflip")],
    "color_jitter": Annotated[float, Augment("--color-jitter")],
    "scale": Annotated[str, Augment("--scale", help="Random-resized-crop area range MIN,MAX.")],  # a tuple in TrainSettings
}


def train_settings(scale: str, **given) -> TrainSettings:
    """The training options as one checked TrainSettings (`--scale` parsed from MIN,MAX)."""
    try:
        scale_range = tuple(float(v) for v in scale.split(","))
    except ValueError:
        scale_range = ()
    if len(scale_range) != 2:
        raise VitpoolError(f"--scale takes MIN,MAX crop-area fractions, e.g. 0.08,1.0; got {scale!r}")
    settings = TrainSettings(**given, scale=scale_range)
    settings.check()
    return settings


def train_options():
    """The training options in place of a command's `settings: TrainSettings` parameter."""
    defaults = {**asdict(TrainSettings()), "scale": ",".join(map(str, TrainSettings().scale))}
    return option_group("settings", train_settings, TRAIN_OPTIONS, {name: defaults[name] for name in TRAIN_OPTIONS})


@app.command()
@user_errors
@model_options()
@data_options()
@train_options()
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
    settings: TrainSettings,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda (default: cuda when present).")] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", min=0, help="Data-loading processes.")] = 2,
    nproc_per_node: Annotated[Optional[int], typer.Option("--nproc-per-node", min=1, help="Train in N processes on this machine, as `torchrun --standalone --nproc_per_node N` does (NCCL on GPUs, gloo on the CPU), exiting as they do with their one error line and without torchrun's failure report. For several machines, run the command under torchrun.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last finished epoch (same settings).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start anew in an existing --out (its earlier run's files are removed).")] = False,
    as_json: JsonOpt = False,
):
    """Fine-tune a converted model, distilled from its unpooled original; runs unchanged under torchrun."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from vitpool.finetune import finetune as run_finetune, launch_processes

    if nproc_per_node is not None and "RANK" not in os.environ:
        raise typer.Exit(launch_processes(nproc_per_node, without_option(sys.argv[1:], "--nproc-per-node")))

    if resume and force:
        raise VitpoolError("--resume continues the run in --out and --force starts it anew: give one of them")
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
                bars[epoch] = progress.add_task(f"epoch {epoch}/{settings.epochs}", total=steps, loss=0.0, lr=0.0, speed=0.0)
            progress.update(bars[epoch], completed=step, loss=stats["loss"], lr=stats["lr"], speed=stats["images_per_s"])

        def on_epoch(record):
            val = record.get("val")
            line = f"epoch {record['epoch']}/{settings.epochs}"
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
    out.print(render.finetune_table(loaded.name, pooled.vitpool_config, out_dir, result.history))




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
