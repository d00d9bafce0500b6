"""K schedules from a MAC budget: `--budget R` (a fraction of the unpooled MACs) or `--target-gmacs G`.

A schedule family places the pooling layers (`family_layers`) and has one parameter r in (0, 1]: the `late`
family (the default preset's) and the `spread` family (the paper preset's) keep K_i = round(N * r^(i+1)) patch
tokens in the i-th pooling layer, so that each keeps the same fraction r of the tokens reaching it, and `solve`'s
`shape` p bends that to N * r^((i+1)^p): the late family's p follows the budget (`default_shape`), and its
layers keep at least a floor (`default_floor`; a layer before the last that would stop just above it goes to
it), those left with every token they receive being left out;
`every-block` (the tome preset's) removes the same number in every block. Method constraints are kept:
`tome` never removes more than half of the tokens of a layer, and `grid` rounds K down to a count its token
grid can make (up, where down would cross the floor). The MACs of a schedule, pooling layers included, are the same
fvcore counts as `vitpool flops`, estimated during the bisection on r from counts of the parts (one block or
block half at N tokens, one pooling layer from N to K tokens, the final norm and head; within 0.1% of the
whole-model count), each traced at a few token counts and extended by the polynomial through them, and counted
on the whole converted model for the schedule chosen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from fractions import Fraction
from functools import lru_cache

import torch
from torch import nn

from vitpool.adapter import (HALVES, PairBias, TokenPool, _overridden, _whole_block, apply_pooling,
                             attention_modules, check_blocks, check_model, family_of, plan_for, token_grid, trims_last)
from vitpool.config import AFTER_ATTENTION, EVERY_BLOCK, FAMILIES, LATE, PoolingConfig, PoolingStage, default_layers, grid_shape
from vitpool.errors import VitpoolError
from vitpool.flops import analyse, total_macs
from vitpool.methods import KEYS, METHODS, NEEDS_ATTENTION

TOLERANCE = 0.01  # a solved schedule lands within 1% of the budget
STEPS = 16  # r to 1/65536: finer than one token of K
# The late family's shape p against the budget (a fraction of the unpooled MACs): 1 up to the first point, then
# linear to the second's p and held there. From 0.6 up, removing more in each later layer kept DeiT-Tiny and CLIP
# ViT-B/16 closer to the unpooled model; at 0.55 and below neither gained (benchmarks/schedule_shape.py).
LATE_SHAPE_RAMP = ((0.55, 1.0), (0.6, 1.25))
# The fewest patch tokens a late-family layer keeps, as a fraction of N (or as many as its first layer keeps, if
# fewer). It binds below a budget of about 0.55, where the layers it leaves with every token are not made: there
# DeiT-Tiny's last blocks lost more from fewer tokens than its early blocks gained (CLIP ViT-B/16, the other way
# round, lost a little at 0.5; benchmarks/schedule_shape.py).
LATE_FLOOR = 1 / 7
# A late-family layer, other than the last, that would keep fewer than this fraction of N above the floor keeps
# the floor: the next layer would otherwise remove those few tokens alone, and a layer costs ONNX Runtime about
# as much at batch 1 whatever it removes (benchmarks/batch1_ceiling_deit_small.py), more than a few tokens save.
FLOOR_SNAP = 0.02


def family_layers(depth: int, family: str = LATE, position: str = AFTER_ATTENTION,
                  trimmed: bool = False) -> tuple[int, ...]:
    """The blocks a family pools in: `late`, every block from a quarter of the depth on (3 to 10 of 12 with a
    trimmed last block: early tokens are not yet redundant, and gentle steps in many blocks kept the outputs
    closest, measured in benchmarks/defaults_deit_tiny.py and clip_embeddings.py);
    `spread`, three spread evenly (the paper's); `every-block`, all of them (ToMe's). Pooling after the last
    block saves nothing, nor does pooling in a last block `trimmed` to the head's tokens (`adapter.trims_last`)."""
    usable = depth if position == AFTER_ATTENTION and not trimmed else depth - 1
    if family == LATE:
        return tuple(range(depth // 4, usable))
    if family == EVERY_BLOCK:
        return tuple(range(usable))
    return default_layers(min(3, usable), depth, position)


def schedule_layers(model, template: PoolingConfig, family: str, layers=None) -> tuple[int, ...]:
    """The blocks a schedule pools in: `layers` where given, else `family`'s for this model and setting."""
    if layers:
        return tuple(layers)
    return family_layers(len(model.blocks), family, template.position, trims_last(model, template))


def family_schedule(r: float, num_patches: int, grid: tuple[int, int], count: int, method: str,
                    family: str = LATE, shape: float = 1.0, floor: float = 0.0) -> tuple[int, ...]:
    """K values of the family at parameter r in [0, 1] for `count` pooling layers, within the method's constraints.

    late and spread: K_i = round(N r^((i+1)^shape)); with shape 1 each layer keeps the same fraction r; no
    layer keeps fewer than `floor` N tokens, or K_0 where that is fewer, and none between the first and the last
    keeps fewer than FLOOR_SNAP N above that: those keep the floor, so no layer is made to remove a few tokens
    alone.
    every-block (ToMe's own schedule): the same number of tokens, (1 - r) N / count, removed in each block,
    rounded cumulatively.
    """
    k_values, tokens, current = [], num_patches, grid
    for i in range(count):
        if family == EVERY_BLOCK:
            wanted = num_patches - round((i + 1) * (1 - r) * num_patches / count)
        else:
            wanted = round(num_patches * r ** ((i + 1) ** shape))
        least = min(round(num_patches * floor), k_values[0]) if k_values else 1
        k = min(tokens, max(1, least, wanted))
        if floor and k_values and i < count - 1 and k < least + FLOOR_SNAP * num_patches:
            k = least  # the next layer would take the few tokens left above the floor alone
        if METHODS[method].removes_at_most_half:
            k = max(k, tokens - tokens // 2)
        if METHODS[method].on_grid:
            k = _grid_count(k, current, least)
            current = grid_shape(k, current)
        k_values.append(k)
        tokens = k
    return tuple(k_values)


def without_keep_all(config: PoolingConfig, num_patches: int) -> PoolingConfig:
    """`config` without the pooling layers that keep every token reaching them (a schedule's floor, or r = 1):
    such a layer changes nothing and costs its clustering."""
    arriving = (num_patches, *config.k)  # what each layer receives: what the one before it keeps
    kept = [(k, layer) for k, layer, tokens in zip(config.k, config.layers, arriving) if k < tokens]
    return replace(config, k=tuple(k for k, _ in kept), layers=tuple(layer for _, layer in kept))


def default_shape(family: str, fraction: float) -> float:
    """The shape p a family's schedule takes at a budget of `fraction` of the unpooled MACs (`LATE_SHAPE_RAMP`
    for the late family; 1, the same fraction in every layer, for the paper's spread family)."""
    if family != LATE:
        return 1.0
    (start, flat), (end, bent) = LATE_SHAPE_RAMP
    return flat + (bent - flat) * min(max((fraction - start) / (end - start), 0.0), 1.0)


def default_floor(family: str) -> float:
    """The fewest tokens a family's layer keeps, a fraction of N: `LATE_FLOOR` for the late family, none for the
    paper's spread family and ToMe's every-block schedule."""
    return LATE_FLOOR if family == LATE else 0.0


def tome_schedule(r: int, num_patches: int, depth: int) -> tuple[int, ...]:
    """ToMe's own schedule for `--method tome --position after-attention --layers 0,...,depth-1`: r tokens merged
    in every block, fewer where a block has fewer than 2r patch tokens (ToMe never merges more than half)."""
    k_values, tokens = [], num_patches
    for _ in range(depth):
        tokens -= min(r, tokens // 2)
        k_values.append(tokens)
    return tuple(k_values)


def _grid_count(k: int, grid: tuple[int, int], least: int) -> int:
    """The largest count up to `k` that grid pooling makes from `grid`, not below `least` (a schedule's floor);
    where there is none, the smallest above `k`, or the whole grid (a layer that keeps it is then left out)."""
    whole = grid[0] * grid[1]
    for candidate in [*range(k, least - 1, -1), *range(k + 1, whole)]:
        try:
            grid_shape(candidate, grid)
            return candidate
        except VitpoolError:
            continue
    return whole


class _LiveOutputs(nn.Module):
    """A pooling layer's outputs that the model uses: the trace drops work whose results nothing reads.

    The tokens always; the sizes where later blocks use them (proportional attention) or a later `tome`
    layer weights its merges by them; the rotary positions of a model that has them.
    """

    def __init__(self, layer: TokenPool, sizes_live: bool, positions: torch.Tensor | None) -> None:
        super().__init__()
        self.layer, self.sizes_live = layer, sizes_live
        self.register_buffer("positions", positions, persistent=False)

    def forward(self, x, size, seen=None):
        tokens, sizes, _, positions = self.layer(x, size, seen, self.positions)
        live = (tokens, sizes) if self.sizes_live else (tokens,)
        return live + (positions,) if positions is not None else live if self.sizes_live else tokens


class _Part(nn.Module):
    """A timm block, or one of its residual halves ("attention", "mlp"), as `PooledBlocks` runs it; a block
    with its own relative position bias adds zeros of the traced token count instead (no MACs either way)."""

    def __init__(self, block: nn.Module, which: str, pair_bias: PairBias | None) -> None:
        super().__init__()
        self.block, self.which, self.pair_bias = block, which, pair_bias

    def forward(self, x):
        attention, mlp = HALVES[type(self.block)] if self.which != "block" else (_whole_block, None)
        if self.which == "mlp":
            return mlp(self.block, x)
        if self.pair_bias is None:
            return attention(self.block, x)
        owner, tokens = self.pair_bias.own(self.block), x.shape[1]
        if owner is None:
            return attention(self.block, x, **{self.pair_bias.keyword: None})
        zeros = x.new_zeros(1, self.block.attn.num_heads, tokens, tokens)
        return _overridden(attention, (*owner, zeros), self.block, x, **{self.pair_bias.keyword: None})


class _Tail(nn.Module):
    """What runs after the blocks: the final norm and the head, whose token pooling (an attention pool's keys and
    values, a mean) costs in proportion to the tokens left."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_head(self.model.norm(x))


class MacModel:
    """Exact MACs of any schedule of one pooling setting (`template`: a configuration whose K and layers are
    ignored) on one model, from fvcore counts of the model's parts."""

    def __init__(self, model, template: PoolingConfig) -> None:
        check_model(model)
        check_blocks(model, range(len(model.blocks)), template)  # any block may be chosen
        self.model, self.template = model, replace(template, k=(), layers=())
        self.prefix = int(model.num_prefix_tokens)
        self.num_patches = model.patch_embed.num_patches
        self.depth = len(model.blocks)
        self.dim = model.embed_dim
        shapes = {tuple(p.shape for p in block.parameters()) for block in model.blocks}
        if len(shapes) != 1:
            raise VitpoolError("budget schedules need blocks of one shape; give --k and --layers instead")
        self.baseline = total_macs(model)
        self.family = family_of(model)
        self.positions = self.family.positions(model)  # rotary positions [L, 1, H, N, D], pooled with the tokens
        bias = self.family.pair_bias
        with torch.no_grad():
            biased = bias is not None and bias.full(model.blocks[0], self.family.shared_bias(model)) is not None
        self.bias_heads = model.blocks[0].attn.num_heads if biased else 0  # relative position biases pooled per block
        tokens = self.num_patches + self.prefix
        self.rest = self.baseline - self.depth * self.block(tokens) - self.tail(tokens)

    def block(self, tokens: int) -> int:
        return self._per_token_count("block")(tokens)

    def half(self, which: str, tokens: int) -> int:
        return self._per_token_count(which)(tokens)

    def tail(self, tokens: int) -> int:
        return self._per_token_count("tail")(tokens)

    @lru_cache(maxsize=None)
    def _per_token_count(self, part: str) -> Callable[[int], int]:
        """The MACs of `part` (a block, one of its halves or the tail) as a function of its token count. Linear
        layers and norms are linear in it and attention's two products quadratic, so the quadratic through
        fvcore's counts at three token counts gives every count (a bisection asks for dozens; each trace of a ViT-B
        block takes a second). The counts start above the prefix tokens (a distilled head reads two); the fit is
        checked against a fourth count, and a part whose count is not such a quadratic is traced at every count."""

        block = self.model.blocks[0]
        module = _Tail(self.model) if part == "tail" else _Part(block, part, self.family.pair_bias)

        @lru_cache(maxsize=None)
        def traced(tokens: int) -> int:
            return analyse(module, (torch.zeros(1, tokens, self.dim),))[0]

        first = self.prefix + 1
        f0, f1, f2 = (Fraction(traced(first + u)) for u in (0, 1, 2))
        a = (f2 - 2 * f1 + f0) / 2
        b = f1 - f0 - a

        def quadratic(tokens: int) -> int:
            u = tokens - first
            return int(a * u * u + b * u + f0)

        return quadratic if quadratic(17) == traced(17) else traced

    def pool(self, stage, sizes_live: bool = False, positions_live: bool = True) -> int:
        stage = replace(stage, layer=0)
        # a cubic where the spread seeds are `spread` whatever K (`pooling.seed_tokens`: at most half)
        fits = METHODS[self.template.method].cubic_macs and stage.fraction is None and stage.k >= 2 * self.template.spread
        fitted = self._pool_count(sizes_live, positions_live) if fits else None
        return fitted(stage.tokens_in, stage.k) if fitted is not None else self._pool(stage, sizes_live, positions_live)

    @lru_cache(maxsize=None)
    def _pool_count(self, sizes_live: bool, positions_live: bool) -> Callable[[int, int], int] | None:
        """A pooling layer's MACs as a function of the tokens in and K, or None where no cubic in them gives it.

        The methods' work is a polynomial in N and K (a Gram matrix N*N*C, N*N an iteration, N*C for the means),
        so the cubic through fvcore's counts at ten pairs gives every pair with integers alone: a bisection asks
        for a hundred pairs, and each trace takes 50 ms. Where no cubic fits, every pair is traced."""
        def count(tokens: int, k: int) -> int:
            return self._pool(PoolingStage(0, tokens, k), sizes_live, positions_live)

        return _fitted_cubic(count, self.num_patches - 3, (self.num_patches + 1) // 2)  # K >= N / 2: tome's limit

    @lru_cache(maxsize=None)
    def _pool(self, stage, sizes_live: bool, positions_live: bool) -> int:
        t = self.template
        layer = TokenPool(t.method, stage, self.prefix, t.iters, seed=0, output=t.output, spread=t.spread)
        tokens = stage.tokens_in + self.prefix
        attn = attention_modules(self.model.blocks[stage.layer])[0]
        if t.method in NEEDS_ATTENTION:
            seen = torch.rand(1, attn.num_heads, tokens, tokens).softmax(-1)
        elif METHODS[t.method].reads == KEYS:
            seen = torch.rand(1, attn.num_heads, tokens, attn.head_dim)
        else:
            seen = None
        inputs = (torch.rand(1, tokens, self.dim), torch.ones(1, stage.tokens_in)) + ((layer.read(seen),) if seen is not None else ())
        positions = self.positions[:, :, :, : stage.tokens_in] if self.positions is not None and positions_live else None
        return analyse(_LiveOutputs(layer, sizes_live, positions), inputs)[0]

    def pair_bias_pooling(self, tokens: int) -> int:
        """`pooling.merged_pair_bias`'s two scatter-adds for a block after pooling, at batch 1."""
        full = self.num_patches + self.prefix
        return self.bias_heads * full * (full + tokens + self.prefix)

    def total(self, config: PoolingConfig) -> int:
        """The MACs of `config` (the template's setting with its own K and layers)."""
        stages = {stage.layer: stage for stage in plan_for(self.model, config)}
        last = max(stages, default=-1)
        t = self.template
        tokens, macs = self.num_patches, self.rest
        trimmed = trims_last(self.model, config)
        for i in range(self.depth):
            stage = stages.get(i)
            if tokens < self.num_patches or min(stages, default=i) < i:  # after a pooling layer
                macs += self.pair_bias_pooling(tokens)
            if trimmed and i == self.depth - 1:  # the MLP on the head's tokens only
                macs += self.half("attention", tokens + self.prefix) + self.half("mlp", self.prefix)
                return macs + self.tail(self.prefix)
            if stage is None or t.position != AFTER_ATTENTION:
                macs += self.block(tokens + self.prefix)
            else:
                macs += self.half("attention", tokens + self.prefix) + self.half("mlp", stage.k + self.prefix)
            if stage is not None:
                macs += self.pool(stage, sizes_live=t.proportional or (METHODS[t.method].merges_by_size and i != last),
                                  positions_live=i < self.depth - 1)  # rotary positions, for the blocks after
                tokens = stage.k
        return macs + self.tail(tokens + self.prefix)


def _fitted_cubic(count: Callable[[int, int], int], n0: int, k0: int) -> Callable[[int, int], int] | None:
    """The cubic in (N, K) through `count` at the ten pairs (n0 + i, k0 + j), i + j <= 3, written in finite
    differences so that it takes integers alone. None where it misses `count` at seven more pairs, one far from
    the rest, or where the pairs do not fit (K <= N)."""
    if k0 + 3 > n0:
        return None
    counted = {(i, j): count(n0 + i, k0 + j) for i in range(4) for j in range(4 - i)}
    differences = {(i, j): sum((-1) ** (i - a + j - b) * math.comb(i, a) * math.comb(j, b) * counted[a, b]
                               for a in range(i + 1) for b in range(j + 1)) for (i, j) in counted}

    def cubic(tokens: int, k: int) -> int:
        return sum(d * _choose(tokens - n0, i) * _choose(k - k0, j) for (i, j), d in differences.items())

    far = n0 // 2
    checks = [(n0 + i, k0 + j) for i in range(4) for j in range(4) if i + j > 3] + [(far, far - far // 4)]
    return cubic if all(cubic(n, k) == count(n, k) for n, k in checks) else None


def _choose(u: int, i: int) -> int:
    """u over i for any integer u (u (u - 1) ... (u - i + 1) / i!, an exact division)."""
    return math.prod(range(u - i + 1, u + 1)) // math.factorial(i)


def budget_target(macs: MacModel, budget: float | None, target_gmacs: float | None) -> float:
    """The MACs a budget asks for."""
    if (budget is None) == (target_gmacs is None):
        raise VitpoolError("give one of --budget (a fraction of the unpooled MACs) or --target-gmacs")
    if budget is not None and not 0 < budget <= 1:
        raise VitpoolError(f"--budget is a fraction of the unpooled model's MACs, in (0, 1]; got {budget}")
    return budget * macs.baseline if budget is not None else target_gmacs * 1e9


def solve(model, template: PoolingConfig, budget: float | None = None, target_gmacs: float | None = None,
          layers: tuple[int, ...] | None = None, macs: MacModel | None = None,
          family: str = LATE, shape: float | None = None, floor: float | None = None) -> tuple[PoolingConfig, int, int]:
    """The family schedule for `template`'s setting whose MACs come closest to the budget; (config, its MACs,
    the unpooled MACs).

    `layers` replaces the family's pooling blocks; `macs` reuses a MacModel's cached counts; `shape` bends a
    late or spread schedule: below 1 each layer removes a smaller fraction than the one before, above 1 a
    larger one (the calibration search tries a few). None: the family's at this budget (`default_shape`).
    `floor`: the fewest tokens a layer keeps, a fraction of N (None: the family's, `default_floor`);
    layers that then keep every token are left out (`without_keep_all`)."""
    if family not in FAMILIES:
        raise VitpoolError(f"schedule family must be one of {', '.join(FAMILIES)}; got {family!r}")
    macs = macs or MacModel(model, template)
    target = budget_target(macs, budget, target_gmacs)
    grid = token_grid(model)
    layers = schedule_layers(model, template, family, layers)
    shape = default_shape(family, target / macs.baseline) if shape is None else shape
    floor = default_floor(family) if floor is None else floor

    def config_at(r: float) -> PoolingConfig:
        k = family_schedule(r, macs.num_patches, grid, len(layers), template.method, family, shape, floor)
        return without_keep_all(replace(template, k=k, layers=layers), macs.num_patches)

    low, high = 0.0, 1.0
    best = min((config_at(r) for r in (low, high)), key=lambda c: abs(macs.total(c) - target))
    for _ in range(STEPS):
        middle = (low + high) / 2
        config = config_at(middle)
        total = macs.total(config)
        if abs(total - target) < abs(macs.total(best) - target):
            best = config
        if total < target:
            low = middle
        else:
            high = middle
    reached = total_macs(apply_pooling(model, best))
    if abs(reached - target) > TOLERANCE * target:
        lowest, highest = macs.total(config_at(0.0)), macs.total(config_at(1.0))
        raise VitpoolError(
            f"no {template.method} schedule of the family (pooling in blocks {', '.join(map(str, layers))}) lands "
            f"within 1% of {target / 1e9:.3f} GMACs: it reaches {lowest / 1e9:.3f} to {highest / 1e9:.3f} GMACs "
            f"(unpooled {macs.baseline / 1e9:.3f}); choose a budget in that range or give --k and --layers"
        )
    return best, reached, macs.baseline
