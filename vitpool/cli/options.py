"""The options commands share: model and pooling flags, timm's data options, each group parsed into one object."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from vitpool.config import PRESETS
from vitpool.data import Preprocess, Source
from vitpool.methods import METHODS

ModelArg = Annotated[str, typer.Argument(metavar="MODEL_OR_DIR", help="timm model name (with its pretrained tag), alias (deit_tiny, deit_small, deit_base), hf-hub:ORG/NAME or local-dir:DIR (timm's sources, also for models saved by vitpool), or a directory written by `vitpool convert`.")]
CheckpointOpt = Annotated[Optional[Path], typer.Option("--checkpoint", help="Local weights: .safetensors, or .pth/.pt state dict (also under 'model'/'state_dict'); never unpickles code.")]
PretrainedOpt = Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="Load timm's pretrained weights (needs the model hub) or keep random ones.")]
MethodOpt = Annotated[Optional[str], typer.Option("--method", help=f"One of {', '.join(METHODS)} (default kmedoids; the paper's is wkmedoids).")]
KOpt = Annotated[Optional[str], typer.Option("--k", help="Comma list of patch-token counts to keep (prefix tokens excluded), e.g. 160,128,96, or of fractions of the tokens reaching each layer, e.g. 0.67,0.45,0.3 (any input size of a dynamic_img_size model).")]
LayersOpt = Annotated[Optional[str], typer.Option("--layers", help="Comma list of the 0-based blocks each K applies in (with --budget: the blocks to pool in, less any that the schedule would leave with every token). Default: spread evenly (3 values on 12 blocks: 3,6,9 after attention, 2,5,8 after the block).")]
ItersOpt = Annotated[Optional[int], typer.Option("--iters", help="Clustering iterations (at most; default 0: each token joins the nearest seed (--spread); 2 for a clustering method other than the preset's; the paper preset 5).")]
OutputOpt = Annotated[Optional[str], typer.Option("--output", help="K-Medoids outputs: mean-norm (default: each cluster's weighted mean, rescaled to its members' mean norm), mean (the mean as it is) or medoid (the paper's, --preset paper).")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="Settings and --budget family to start from: " + ", ".join(
    f"{name} ({'default: ' if name == 'vitpool' else ''}{preset.about})" for name, preset in PRESETS.items())
    + ". The other flags override it.")]
PositionOpt = Annotated[Optional[str], typer.Option("--position", help="Where a pooling layer sits in its block: after-attention (default: between attention and MLP, ToMe's place, so the MLP runs on K tokens) or after-block (the paper's).")]
ProportionalOpt = Annotated[Optional[bool], typer.Option("--proportional/--no-proportional", help="Add log(cluster size) to the attention logits after pooling (ToMe's proportional attention) and weight the clustering by it. Default: on (off in --preset paper).")]
TrimOpt = Annotated[Optional[bool], typer.Option("--trim-last/--no-trim-last", help="Run the last block's MLP on the tokens a class-token head reads (CLS and other prefix tokens) only: exact, and the MACs saved go to the pooling schedule; no effect on heads that pool all tokens or a last block with a pooling layer. Default: on (off in --preset paper and tome, as published).")]
SpreadOpt = Annotated[Optional[int], typer.Option("--spread", help="Of the K seeds a clustering method starts from, how many (at most half) are the tokens the most significant ones represent worst (largest significance times distance to the nearest of them) rather than the next most significant. Default: 8 (0 in --preset paper: the paper's top-K initialisation).")]
BudgetOpt = Annotated[Optional[float], typer.Option("--budget", help="Instead of --k: the fraction of the unpooled MACs to keep, e.g. 0.6 (pooling layers included), in the preset's blocks or in --layers (see README for the schedule family).")]
TargetOpt = Annotated[Optional[float], typer.Option("--target-gmacs", help="Instead of --k: the GMACs to land on, within 1%.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print only a JSON document on stdout.")]
DATA_HELP = ("an image folder ROOT/<class>/<image> or a .tar of class folders (WordNet-id folders map to ImageNet-1k "
             "classes, other folders to their sorted order); with --dataset wds/NAME the folder of the shards; with "
             "hfds/NAME the datasets cache (optional).")
DataOpt = Annotated[Optional[Path], typer.Option("--data", metavar="ROOT", help=f"Labelled images: {DATA_HELP}")]
DataOption = functools.partial(typer.Option, rich_help_panel="Data (timm validate.py names)")
SplitOpt = Annotated[str, DataOption("--split", help="The split, as timm names it: for an image folder, its subfolder of that name if there is one (val, valid, validation and train, training stand for each other), else --data itself; for wds/, a split of _info.json or a shard pattern such as 'val-{000000..000009}.tar'; for hfds/, the dataset's split.")]
OptimizeOpt = Annotated[bool, typer.Option("--optimize", help="Run ONNX Runtime's transformer optimizer (model_type vit: SkipLayerNormalization, BiasGelu and, where its patterns match, Attention fusions) over the exported graph.")]
QuantizeOpt = Annotated[Optional[str], typer.Option("--quantize", metavar="int8", help="Dynamic int8 quantization of the linear layers (ONNX Runtime's quantize_dynamic); attention products and the pooling layers stay float32.")]
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
    spread: int | None = None
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
                               position=self.position, preset=self.preset or "vitpool", trim_last=self.trim_last,
                               spread=self.spread)
        check_method_and_output(template.method, template.output, template.position)
        check_budget(self.budget, self.target_gmacs)
        return template

    def family(self) -> str:
        """The budget family of the preset asked for."""
        from vitpool.config import preset_named

        return preset_named(self.preset or "vitpool").family


MODEL_OPTIONS = {"checkpoint": CheckpointOpt, "pretrained": PretrainedOpt, "method": MethodOpt, "k": KOpt,
                 "layers": LayersOpt, "iters": ItersOpt, "output": OutputOpt, "proportional": ProportionalOpt,
                 "position": PositionOpt, "trim_last": TrimOpt, "spread": SpreadOpt, "preset": PresetOpt, "budget": BudgetOpt, "target_gmacs": TargetOpt}


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
