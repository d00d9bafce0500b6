"""The pooling configuration of a conversion, and its validation against a model's shape.

Kept free of torch so that the CLI can parse and check flags before importing anything heavy.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, replace

from vitpool.errors import VitpoolError
from vitpool.methods import CLUSTERING_METHODS, MEDOID_METHODS, METHODS

OUTPUTS = ("medoid", "mean", "mean-norm")
AFTER_ATTENTION, AFTER_BLOCK = "after-attention", "after-block"
POSITIONS = (AFTER_ATTENTION, AFTER_BLOCK)
# Budget schedule families (`vitpool.budget`): where the pooling layers go, and how K shrinks.
LATE, SPREAD, EVERY_BLOCK = "late", "spread", "every-block"
FAMILIES = (LATE, SPREAD, EVERY_BLOCK)
NAMED_METHOD_ITERS = 2  # what a clustering method other than the preset's runs where the preset's runs none


@dataclass(frozen=True)
class PoolingConfig:
    """Everything that describes a conversion: which method, how many patch tokens to keep after which blocks.

    `k[i]` is the number of patch tokens (prefix tokens such as CLS excluded) kept in block `layers[i]` (0-based),
    or, as a number in (0, 1), the fraction of the patch tokens reaching it: fractions pool any input size of a
    `dynamic_img_size` model alike, where counts are planned at the size it was built for. `iters` is the fixed
    iteration count of the clustering methods (0: the seeds (`spread`) as medoids, each other token joined to
    the nearest, no update); `seed` draws the `random` baseline's fixed token order. `output` is what the K-Medoids
    methods emit: the medoid token, the (weighted) mean of its cluster, or that mean rescaled to its members'
    (weighted) mean norm (`mean-norm`: `pooling.norm_kept`). `proportional` lets a token that stands
    for s patches count as s patches: log(s) is added to its attention logits in every block after a pooling layer
    (ToMe's proportional attention) and the clustering weights its reconstruction error by s. `position` is where in
    block `layers[i]` its pooling layer sits: after the whole block, or between its attention and its MLP (ToMe's
    place), so that the MLP, two thirds of a block's MACs, already runs on the K tokens. `trim_last`: where the head
    reads only the prefix tokens (a class-token head) and the last block has no pooling layer, that block's MLP runs
    on the prefix tokens alone, since its other outputs are never read: exact, and the MACs it saves go to the
    pooling schedule. `spread`: of the K seeds the clustering methods start from, this many (at most half) are
    not the most significant tokens but those the first seeds represent worst (`pooling.seed_tokens`); 0 is the
    paper's top-K initialisation.

    The defaults are the `vitpool` preset, the best setting measured (benchmarks/defaults_deit_tiny.py);
    `PRESETS["paper"]` is the paper's.
    """

    method: str = "kmedoids"
    k: tuple[int, ...] | tuple[float, ...] = ()
    layers: tuple[int, ...] = ()
    iters: int = 0
    seed: int = 0
    output: str = "mean-norm"
    proportional: bool = True
    position: str = AFTER_ATTENTION
    trim_last: bool = True
    spread: int = 8

    def to_dict(self) -> dict:
        return {**asdict(self), "k": list(self.k), "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, data: dict) -> "PoolingConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise VitpoolError(f"unknown pooling settings {sorted(unknown)}: was this saved by a newer vitpool?")
        values = {"position": AFTER_BLOCK, "trim_last": False, "spread": 0, **data}  # saved before these settings existed
        values["k"] = tuple(values.get("k", ()))
        values["layers"] = tuple(values.get("layers", ()))
        return cls(**values)

    def flags(self) -> str:
        """The command-line flags that build this configuration, whatever the preset."""
        text = (f"--method {self.method} --k {','.join(map(str, self.k))} --layers {','.join(map(str, self.layers))} "
                f"--position {self.position} --iters {self.iters}")
        text += f" --output {self.output}" if self.method in MEDOID_METHODS else ""
        text += f" --spread {self.spread}" if self.method in CLUSTERING_METHODS else ""
        return text + ("" if self.proportional else " --no-proportional") + ("" if self.trim_last else " --no-trim-last")

    def describe(self) -> str:
        if not self.k:
            return "no pooling"
        iters = f", {self.iters} iterations" if self.method in CLUSTERING_METHODS else ""
        iters += f", {self.spread} seeds for spread" if self.method in CLUSTERING_METHODS and self.spread else ""
        output = {"mean": ", mean outputs", "mean-norm": ", mean outputs at their members' norm"}.get(self.output, "")
        proportional = "" if self.proportional else ", no proportional attention"
        trimmed = ", last block trimmed to the head's tokens" if self.trim_last else ""
        return (f"{self.method}{iters}{output}{proportional}{trimmed}: K {','.join(map(str, self.k))} {self.position} "
                f"{','.join(map(str, self.layers))}")


@dataclass(frozen=True)
class Preset:
    """A named setting: the pooling configuration (K and layers aside) and the budget family `--budget` uses."""

    template: PoolingConfig
    family: str
    about: str


PRESETS = {
    "vitpool": Preset(PoolingConfig(), LATE,
                      "the best measured: K-Medoids with no iteration (each token joins the nearest seed: the most significant tokens and 8 that they represent worst), mean outputs at their members' norm, after attention, every block from a quarter of the depth (each later one removing more from a budget of 0.6, none keeping fewer than a seventh of the tokens), last block trimmed to the head's tokens"),
    "paper": Preset(PoolingConfig("wkmedoids", iters=5, output="medoid", proportional=False, position=AFTER_BLOCK,
                                  trim_last=False, spread=0),
                    SPREAD,
                    "Marin et al.: weighted K-Medoids (5 iterations), medoid outputs, after the block, three layers"),
    "tome": Preset(PoolingConfig("tome", output="medoid", position=AFTER_ATTENTION, trim_last=False, spread=0), EVERY_BLOCK,
                   "Bolya et al.: ToMe's matching after attention in every block, the same number merged in each"),
}


def preset_named(name: str) -> Preset:
    if name not in PRESETS:
        raise VitpoolError(f"unknown --preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class PoolingStage:
    """One pooling layer as it will sit in a model: after `layer`, `tokens_in` patch tokens become `k` (at the
    model's own input size; with a `fraction`, `k` follows the tokens that arrive)."""

    layer: int
    tokens_in: int
    k: int
    grid_in: tuple[int, int] | None = field(default=None)
    grid_out: tuple[int, int] | None = field(default=None)
    fraction: float | None = None


def kept(fraction: float, tokens: int, method: str) -> int:
    """The tokens a fraction keeps of `tokens`: rounded, at least one (at least half where a method removes at
    most half)."""
    return max(1, round(fraction * tokens), tokens - tokens // 2 if METHODS[method].removes_at_most_half else 1)


def parse_k(text: str | None) -> tuple[int, ...] | tuple[float, ...]:
    """--k: a comma list of token counts ("128,96,64") or of fractions of the incoming tokens ("0.67,0.45")."""
    if text is None or not text.strip() or "." not in text:
        return parse_int_list(text, "--k")
    try:
        return check_k(tuple(float(part) for part in text.split(",")))
    except ValueError:
        raise VitpoolError(f"--k must be a comma list of token counts (128,96,64) or of fractions (0.67,0.45); got {text!r}") from None


def check_k(k) -> tuple[int, ...] | tuple[float, ...]:
    """K values as counts (ints) or as fractions in (0, 1), not mixed."""
    k = tuple(k)
    if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in k):
        return tuple(int(v) for v in k)
    if all(isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v < 1 for v in k):
        return tuple(float(v) for v in k)
    raise VitpoolError(f"K values are all token counts (integers) or all fractions of the incoming tokens in (0, 1); "
                       f"got {', '.join(map(str, k))}")


def parse_int_list(text: str | None, flag: str) -> tuple[int, ...]:
    """Parse a comma list such as "128,96,64" for `flag`; empty or None gives ()."""
    if text is None or not text.strip():
        return ()
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            values.append(int(part))
        except ValueError:
            raise VitpoolError(f"{flag} must be a comma list of integers such as 128,96,64; got {text!r}") from None
    return tuple(values)


def default_layers(count: int, depth: int, position: str = AFTER_BLOCK) -> tuple[int, ...]:
    """Spread `count` pooling layers evenly over the blocks where pooling saves something: blocks 0..depth-2
    after the block (pooling after the last block saves nothing), every block after attention (the last
    block's MLP runs on fewer tokens).

    For a 12-block model after the block: 1 value -> block 5; 3 values -> blocks 2, 5, 8; 11 values -> every
    block but the last. After attention: 3 values -> blocks 3, 6, 9; 12 values -> every block.
    """
    usable = depth if position == AFTER_ATTENTION else depth - 1
    if count > usable:
        where = "" if position == AFTER_ATTENTION else " after (its last block is excluded by default)"
        raise VitpoolError(
            f"{count} K values but the model has only {usable} blocks to pool{where}; give fewer values or "
            f"name the blocks with --layers"
        )
    return tuple(((i + 1) * usable) // (count + 1) for i in range(count))


def grid_shape(k: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The (rows, cols) output grid with rows*cols == k closest in aspect to `grid`, for `grid` pooling."""
    rows, cols = grid
    shapes = [(a, k // a) for a in range(1, k + 1) if k % a == 0 and a <= rows and k // a <= cols]
    if not shapes:
        raise VitpoolError(
            f"grid pooling cannot make {k} tokens from a {rows}x{cols} grid: K must be a product a*b with "
            f"a <= {rows} and b <= {cols} (for example {min(rows, cols) ** 2 // 4 or 1})"
        )
    aspect = math.log(rows / cols)
    return min(shapes, key=lambda s: (round(abs(math.log(s[0] / s[1]) - aspect), 9), s))


def check_budget(budget: float | None, target_gmacs: float | None) -> None:
    """A budget in (0, 1] and a positive GMACs target (commands check this before any slow work)."""
    if budget is not None and not 0 < budget <= 1:
        raise VitpoolError(f"--budget is a fraction of the unpooled model's MACs, in (0, 1]; got {budget}")
    if target_gmacs is not None and not 0 < target_gmacs < float("inf"):
        raise VitpoolError(f"--target-gmacs is the GMACs to land on, a positive number; got {target_gmacs}")


def check_method_and_output(method: str, output: str, position: str = AFTER_BLOCK) -> None:
    """The method, output kind and position exist (commands check this before any slow work)."""
    if method not in METHODS:
        raise VitpoolError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if output not in OUTPUTS:
        raise VitpoolError(f"unknown --output {output!r}: choose {', '.join(OUTPUTS[:-1])} or {OUTPUTS[-1]}")
    if position not in POSITIONS:
        raise VitpoolError(f"unknown --position {position!r}: choose {' or '.join(POSITIONS)}")


def plan_stages(config: PoolingConfig, depth: int, num_patches: int, grid: tuple[int, int]) -> list[PoolingStage]:
    """Check `config` against a model with `depth` blocks and `num_patches` patch tokens; return its stages."""
    check_method_and_output(config.method, config.output, config.position)
    if config.output != "medoid" and config.method not in MEDOID_METHODS:
        raise VitpoolError(f"--output {config.output} applies to {' and '.join(MEDOID_METHODS)}; {config.method} has one kind of output")
    if config.iters < 0:
        raise VitpoolError(f"--iters must be 0 or more; got {config.iters}")
    if config.spread < 0:
        raise VitpoolError(f"--spread must be 0 or more; got {config.spread}")
    if config.spread and config.method not in CLUSTERING_METHODS:
        raise VitpoolError(f"--spread applies to {', '.join(CLUSTERING_METHODS)}; {config.method} has no seeds")
    if len(config.k) != len(config.layers):
        raise VitpoolError(
            f"--k has {len(config.k)} values but --layers has {len(config.layers)}: give one block per K value"
        )
    for layer in config.layers:
        if not 0 <= layer < depth:
            raise VitpoolError(f"block index {layer} is out of range: this model has blocks 0..{depth - 1}")
    if list(config.layers) != sorted(set(config.layers)):
        raise VitpoolError(f"--layers must be strictly increasing block indices; got {list(config.layers)}")
    check_k(config.k)
    stages = []
    tokens = num_patches
    current_grid: tuple[int, int] | None = grid
    method = METHODS[config.method]
    for value, layer in zip(config.k, config.layers):
        fraction = value if isinstance(value, float) else None
        if fraction is not None and method.fixed_layout:
            raise VitpoolError(f"{config.method} pooling is planned for one token count (its fixed order, its grid); "
                               f"give --k as token counts")
        k = kept(fraction, tokens, config.method) if fraction is not None else value
        if k < 1:
            raise VitpoolError(f"K must be at least 1; got {k} after block {layer}")
        if k > tokens:
            raise VitpoolError(
                f"K={k} after block {layer} is larger than the {tokens} patch tokens coming in: K values must "
                f"not increase and start at most at {num_patches}"
            )
        grid_out = None
        if method.removes_at_most_half and tokens - k > tokens // 2:
            raise VitpoolError(
                f"{config.method} removes at most half of the tokens per layer: K={k} after block {layer} removes "
                f"{tokens - k} of {tokens}; use K >= {tokens - tokens // 2} or more pooling layers"
            )
        if method.on_grid:
            if current_grid is None:
                raise VitpoolError("grid pooling needs tokens on a grid")
            grid_out = grid_shape(k, current_grid)
        stages.append(PoolingStage(layer, tokens, k, current_grid if method.on_grid else None, grid_out, fraction))
        tokens, current_grid = k, grid_out
    return stages


def make_config(
    method: str | None = None,
    k: tuple[int, ...] | list[int] = (),
    layers: tuple[int, ...] | list[int] | None = None,
    iters: int | None = None,
    seed: int = 0,
    depth: int | None = None,
    output: str | None = None,
    proportional: bool | None = None,
    position: str | None = None,
    preset: str = "vitpool",
    trim_last: bool | None = None,
    spread: int | None = None,
) -> PoolingConfig:
    """Build a configuration: the preset's settings where an argument is None (a method other than the
    preset's gets its own output kind: medoid for all but the K-Medoids methods; no spread seeds where it has no
    seeds; and it iterates where the preset's method does not, so that `--method kmeans` is K-Means). With `layers` left out,
    K values are spread by `default_layers` over `depth` blocks."""
    base = preset_named(preset).template
    if output is None:
        output = base.output if method in (None, base.method) or method in MEDOID_METHODS else "medoid"
    if iters is None and base.iters == 0 and method not in (None, base.method):
        iters = NAMED_METHOD_ITERS
    if spread is None and method is not None and method not in CLUSTERING_METHODS:
        spread = 0
    given = {"method": method, "iters": iters, "output": output, "proportional": proportional, "position": position,
             "trim_last": trim_last, "spread": spread}
    config = replace(base, seed=int(seed), **{name: value for name, value in given.items() if value is not None})
    k = check_k(k)
    if layers is None or (len(layers) == 0 and k):
        if depth is None:
            raise VitpoolError("the blocks to pool in (--layers) are needed when the model depth is unknown")
        layers = default_layers(len(k), depth, config.position)
    return replace(config, k=k, layers=tuple(int(v) for v in layers))
