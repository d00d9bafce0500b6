"""vitpool: Token Pooling for timm Vision Transformers, and honest measurements of what it buys.

    import timm, vitpool
    model = vitpool.convert(timm.create_model("deit_small_patch16_224", pretrained=True), budget=0.6)

torch and timm are imported only when a function that needs them is called, so the CLI starts instantly.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["PoolingConfig", "convert", "load", "save", "__version__"]


def __getattr__(name: str):
    if name == "PoolingConfig":
        from vitpool.config import PoolingConfig

        return PoolingConfig
    raise AttributeError(f"module 'vitpool' has no attribute {name!r}")


def convert(model, method: str | None = None, k=(), layers=None, iters: int | None = None, seed: int = 0,
            budget: float | None = None, target_gmacs: float | None = None, output: str | None = None,
            proportional: bool | None = None, position: str | None = None, preset: str = "vitpool",
            trim_last: bool | None = None, spread: int | None = None):
    """A copy of timm `model` with Token Pooling in blocks `layers`, keeping `k[i]` patch tokens in each.

    Settings left as None are the `preset`'s (`config.PRESETS`: "vitpool", the best measured, by default;
    "paper"; "tome"); `output`, `proportional`, `position`, `trim_last` and `spread` are described on `PoolingConfig`. `layers` left
    out spreads the K values evenly over the blocks (see `config.default_layers`). `budget` (a fraction of the
    unpooled MACs) or `target_gmacs` picks K from the preset's schedule family instead (see `vitpool.budget`), in
    `layers` where given, else in the family's blocks. The result is still a timm model: `forward_features`, `forward_head` and
    `num_prefix_tokens` work as before.
    """
    from vitpool.adapter import apply_pooling, check_model
    from vitpool.config import make_config, preset_named
    from vitpool.errors import VitpoolError

    check_model(model)
    solving = budget is not None or target_gmacs is not None
    if solving and len(k):
        raise VitpoolError("give either k or a budget (budget=, target_gmacs=), not both: a budget chooses K")
    config = make_config(method, k, layers, iters, seed, depth=len(model.blocks), output=output,
                         proportional=proportional, position=position, preset=preset, trim_last=trim_last, spread=spread)
    if solving:
        from vitpool.budget import solve

        config = solve(model, config, budget, target_gmacs, layers=config.layers or None,
                       family=preset_named(preset).family)[0]
    return apply_pooling(model, config)


def save(model, directory, force: bool = False):
    """Write a converted (or plain) timm model to `directory`; `vitpool.load` and every CLI command read it."""
    from vitpool.models import save as _save

    return _save(model, directory, force=force)


def load(directory):
    """The converted model saved in `directory`."""
    from vitpool.models import load as _load

    return _load(directory)
