"""The pooling configuration of a conversion, and its validation against a model's shape.

Kept free of torch so that the CLI can parse and check flags before importing anything heavy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from vitpool.errors import VitpoolError

CLUSTERING_METHODS = ("wkmedoids", "kmedoids", "wkmeans", "kmeans")
METHODS = CLUSTERING_METHODS + ("importance", "random", "grid", "tome")
MEDOID_METHODS = ("wkmedoids", "kmedoids")
OUTPUTS = ("medoid", "mean")
AFTER_ATTENTION, AFTER_BLOCK = "after-attention", "after-block"
POSITIONS = (AFTER_ATTENTION, AFTER_BLOCK)
DEFAULT_METHOD = "wkmedoids"
DEFAULT_ITERS = 5


@dataclass(frozen=True)
class PoolingConfig:
    """Everything that describes a conversion: which method, how many patch tokens to keep after which blocks.

    `k[i]` is the number of patch tokens (prefix tokens such as CLS excluded) kept after block `layers[i]`
    (0-based). `iters` is the fixed iteration count of the clustering methods; `seed` draws the `random`
    baseline's fixed token order. `output` is what the K-Medoids methods emit: the medoid token, or the
    (significance-weighted) mean of its cluster. `proportional` adds log(cluster size) to the attention
    logits of every block after a pooling layer (ToMe's proportional attention), so a token standing for
    many patches draws attention like them; on by default because it wins for every method that merges
    (benchmarks/variants_deit_tiny.py). `position` is where in block `layers[i]` its pooling layer sits:
    after the whole block, or between its attention and its MLP (ToMe's place), so that the MLP, two thirds of
    a block's MACs, already runs on the K tokens.
    """

    method: str = DEFAULT_METHOD
    k: tuple[int, ...] = ()
    layers: tuple[int, ...] = ()
    iters: int = DEFAULT_ITERS
    seed: int = 0
    output: str = "medoid"
    proportional: bool = True
    position: str = AFTER_BLOCK

    def to_dict(self) -> dict:
        return {**asdict(self), "k": list(self.k), "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, data: dict) -> "PoolingConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise VitpoolError(f"unknown pooling settings {sorted(unknown)}: was this saved by a newer vitpool?")
        values = {"position": AFTER_BLOCK, **data}  # saved before pooling could sit after attention
        values["k"] = tuple(values.get("k", ()))
        values["layers"] = tuple(values.get("layers", ()))
        return cls(**values)

    def describe(self) -> str:
        if not self.k:
            return "no pooling"
        iters = f", {self.iters} iterations" if self.method in CLUSTERING_METHODS else ""
        output = ", mean outputs" if self.output == "mean" else ""
        proportional = "" if self.proportional else ", no proportional attention"
        return (f"{self.method}{iters}{output}{proportional}: K {','.join(map(str, self.k))} {self.position} "
                f"{','.join(map(str, self.layers))}")


@dataclass(frozen=True)
class PoolingStage:
    """One pooling layer as it will sit in a model: after `layer`, `tokens_in` patch tokens become `k`."""

    layer: int
    tokens_in: int
    k: int
    grid_in: tuple[int, int] | None = field(default=None)
    grid_out: tuple[int, int] | None = field(default=None)


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


def check_method_and_output(method: str, output: str, position: str = AFTER_BLOCK) -> None:
    """The method, output kind and position exist (commands check this before any slow work)."""
    if method not in METHODS:
        raise VitpoolError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if output not in OUTPUTS:
        raise VitpoolError(f"unknown --output {output!r}: choose medoid or mean")
    if position not in POSITIONS:
        raise VitpoolError(f"unknown --position {position!r}: choose {' or '.join(POSITIONS)}")


def plan_stages(config: PoolingConfig, depth: int, num_patches: int, grid: tuple[int, int]) -> list[PoolingStage]:
    """Check `config` against a model with `depth` blocks and `num_patches` patch tokens; return its stages."""
    check_method_and_output(config.method, config.output, config.position)
    if config.output == "mean" and config.method not in MEDOID_METHODS:
        raise VitpoolError(f"--output mean applies to {' and '.join(MEDOID_METHODS)}; {config.method} has one kind of output")
    if config.iters < 0:
        raise VitpoolError(f"--iters must be 0 or more; got {config.iters}")
    if len(config.k) != len(config.layers):
        raise VitpoolError(
            f"--k has {len(config.k)} values but --layers has {len(config.layers)}: give one block per K value"
        )
    for layer in config.layers:
        if not 0 <= layer < depth:
            raise VitpoolError(f"block index {layer} is out of range: this model has blocks 0..{depth - 1}")
    if list(config.layers) != sorted(set(config.layers)):
        raise VitpoolError(f"--layers must be strictly increasing block indices; got {list(config.layers)}")
    stages = []
    tokens = num_patches
    current_grid: tuple[int, int] | None = grid
    for k, layer in zip(config.k, config.layers):
        if k < 1:
            raise VitpoolError(f"K must be at least 1; got {k} after block {layer}")
        if k > tokens:
            raise VitpoolError(
                f"K={k} after block {layer} is larger than the {tokens} patch tokens coming in: K values must "
                f"not increase and start at most at {num_patches}"
            )
        grid_out = None
        if config.method == "tome" and tokens - k > tokens // 2:
            raise VitpoolError(
                f"tome removes at most half of the tokens per layer: K={k} after block {layer} removes "
                f"{tokens - k} of {tokens}; use K >= {tokens - tokens // 2} or more pooling layers"
            )
        if config.method == "grid":
            if current_grid is None:
                raise VitpoolError("grid pooling needs tokens on a grid")
            grid_out = grid_shape(k, current_grid)
        stages.append(PoolingStage(layer, tokens, k, current_grid if config.method == "grid" else None, grid_out))
        tokens, current_grid = k, grid_out
    return stages


def make_config(
    method: str = DEFAULT_METHOD,
    k: tuple[int, ...] | list[int] = (),
    layers: tuple[int, ...] | list[int] | None = None,
    iters: int = DEFAULT_ITERS,
    seed: int = 0,
    depth: int | None = None,
    output: str = "medoid",
    proportional: bool = True,
    position: str = AFTER_BLOCK,
) -> PoolingConfig:
    """Build a configuration; with `layers` left out, K values are spread by `default_layers` over `depth` blocks."""
    k = tuple(int(v) for v in k)
    if layers is None or (len(layers) == 0 and k):
        if depth is None:
            raise VitpoolError("the blocks to pool after (--layers) are needed when the model depth is unknown")
        layers = default_layers(len(k), depth, position)
    return PoolingConfig(method=method, k=k, layers=tuple(int(v) for v in layers), iters=int(iters), seed=int(seed),
                         output=output, proportional=bool(proportional), position=position)
