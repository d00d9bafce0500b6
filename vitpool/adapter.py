"""timm model surgery: pooling layers in chosen blocks of a `VisionTransformer` or an `Eva`, timm's blocks untouched.

`model.blocks` (timm's Sequential or ModuleList of blocks) becomes a `PooledBlocks`, a Sequential with the
same children, so state-dict keys and `model.blocks[i]` stay as they were. A block with a pooling layer gets a
parameter-free `TokenPool` child that timm's own forward ignores; `PooledBlocks.forward` runs each timm
block as is and then its pooling layer (after-block), or the block's two residual halves, attention and MLP,
with the pooling layer between them (after-attention, ToMe's place); both carry how many original patches
each token stands for. The halves call the block's own modules (norms, attention, LayerScale, drop-path,
MLP) in the order its class's forward does; `HALVES` has one entry per timm block class.

Significance (the attention a patch token receives: mean over heads, sum over query rows) needs the
attention probabilities, which timm's fused attention never materialises. Only blocks followed by a
method that needs it switch to timm's explicit attention path, whose softmax output is read by a
forward hook on `attn.attn_drop` (registered at conversion; it delivers only while `PooledBlocks` runs the
block, see `attach_taps`): the same MACs as the fused kernel and no recomputation, at the price of an N x N probability matrix per head in memory and the fused kernel's
speed in those blocks only. The hook keeps only the significance, so the probabilities are freed when
timm's attention is done with them. `tome` reads the keys from `attn.k_norm` and keeps fused attention.

Rotary position embeddings (Eva: EVA02, the RoPE ViTs, DINOv3, PE) rotate each patch token's query and key by
its position. A pooled token gets, as its rotation, the mean of the rotations (sin and cos) of the original
patches it stands for: rotation is linear in (sin, cos), so its query is then exactly the mean of what its
patches' positions would make of that query; a token that stands for one patch keeps that patch's rotation.
The means are carried from pooling layer to pooling layer as the sizes are (`pooling.merged_positions`).
`FAMILIES` says, per timm model class, how its blocks are run and where its positions come from.
"""

from __future__ import annotations

import copy
import functools
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from vitpool import pooling
from vitpool.config import AFTER_ATTENTION, PoolingConfig, PoolingStage, kept, plan_stages
from vitpool.errors import VitpoolError
from vitpool.methods import ATTENTION, CLUSTERING_METHODS, KEYS, MEDOID_METHODS, METHODS, NEEDS_ATTENTION
from vitpool.models import import_timm

TAPPED = {ATTENTION: "attn_drop", KEYS: "k_norm"}  # what a method reads -> the attention submodule it taps


def attach_taps(pool: TokenPool, block: nn.Module) -> None:
    """Hook what `pool` reads onto the submodules of `block` it taps, once, at conversion.

    The hooks deliver into `pool.inbox`, one slot per tapped module, only while `reading` has it open: a block
    run outside that (a checkpointed block's recomputation, a direct call) leaves nothing behind. Hooks
    registered once, rather than around every call, let torch.compile trace the model whole: registering a
    hook inside a compiled region breaks its graph."""
    tapped = pool.tap(block)
    pool.taps = len(tapped)
    for slot, (module, heads) in enumerate(tapped):
        module.register_forward_hook(functools.partial(_deliver, pool, slot, heads))


def _deliver(pool: TokenPool, slot: int, heads: int, _module: nn.Module, _inputs: tuple, output: Tensor) -> None:
    if slot < len(pool.inbox):
        pool.inbox[slot] = pool.read(output, heads)


def reading(pool: TokenPool | None, run: Callable[[], Tensor]) -> tuple[Tensor, Tensor | None]:
    """`run()`'s output, and what `pool` read of its block meanwhile: one tensor, or the mean over a parallel
    block's attention branches (None for a method that reads nothing)."""
    if pool is None or not pool.taps:
        return run(), None
    pool.inbox.clear()
    pool.inbox.extend([None] * pool.taps)
    out = run()
    seen = list(pool.inbox)
    pool.inbox.clear()
    return out, seen[0] if len(seen) == 1 else torch.stack(seen).mean(dim=0)


def attention_modules(block: nn.Module) -> list[nn.Module]:
    """The modules that compute a block's attention: timm's `attn`, each branch's of a ParallelThingsBlock, or
    the block itself where it computes its own (ParallelScalingBlock)."""
    if hasattr(block, "attns"):
        return [branch.attn for branch in block.attns]
    return [block.attn] if hasattr(block, "attn") else [block]


class TokenPool(nn.Module):
    """Replaces the patch tokens after a block with `k` tokens; prefix tokens pass through unchanged."""

    def __init__(self, method: str, stage: PoolingStage, num_prefix_tokens: int, iters: int, seed: int,
                 output: str = "medoid", proportional: bool = True, position: str = "after-block", spread: int = 0) -> None:
        super().__init__()
        self.method = method
        self.spread = spread
        self.position = position
        self.output = output
        self.proportional = proportional
        self.k = stage.k
        self.fraction = stage.fraction
        self.tokens_in = stage.tokens_in
        self.grid_in = stage.grid_in
        self.grid_out = stage.grid_out
        self.num_prefix_tokens = num_prefix_tokens
        self.iters = iters
        self.taps = 0  # the submodules whose outputs it reads (attach_taps)
        self.inbox: list[Tensor | None] = []  # what it read of them during the call under way (reading)
        if method == "random":
            generator = torch.Generator().manual_seed(seed * 1000 + stage.layer)
            # A fixed random order per layer drawn at conversion time: the same input always gives the
            # same output, and export sees a constant rather than a random op.
            self.register_buffer("random_scores", torch.rand(stage.tokens_in, generator=generator), persistent=False)

    def tap(self, block: nn.Module) -> list[tuple[nn.Module, int]]:
        """The submodules of `block` whose outputs this method needs (one per attention branch), each with the
        axis of its heads: keys are normed as [B, H, N, D], or as [B, N, H, D] where the block computes its own."""
        reads = METHODS[self.method].reads
        if reads is None:
            return []
        return [(getattr(attention, TAPPED[reads]), 2 if reads == KEYS and attention is block else 1)
                for attention in attention_modules(block)]

    def read(self, tapped: Tensor, heads: int = 1) -> Tensor:
        """What this layer needs of the tapped output, taken as the block runs so that the block frees the rest
        as usual: the significance [B, N] of the attention probabilities (held until the block's end, they
        would raise the tensor peak by a [B, H, N, N] matrix), or `tome`'s keys averaged over heads."""
        if self.method in NEEDS_ATTENTION:
            return significance_from_attention(tapped, self.num_prefix_tokens)
        return tapped.mean(dim=heads)[:, self.num_prefix_tokens :]

    def forward(self, x: Tensor, size: Tensor, seen: Tensor | None = None,
                positions: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """x [B, P+N, C], size [B, N], `seen` what `read` kept, rotary `positions` [L, B, H, N, D] or None ->
        pooled x, sizes, the assignment [B, N] and the pooled tokens' positions."""
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        k = self.tokens_kept(int(patches.shape[1]))
        out = self.pool(patches, k, seen, size)
        if METHODS[self.method].drops:
            sizes = pooling.merged_sizes(out.assign, size, k)
        else:  # every token joins an output: no mask of dropped tokens (four ONNX nodes fewer)
            sizes = pooling.row_sums(size, out.assign, k)
        if positions is not None:
            positions = pooling.merged_positions(positions, out.assign, size, sizes)
        return torch.cat([prefix, out.tokens], dim=1), sizes, out.assign, positions

    def pool(self, patches: Tensor, k: int, seen: Tensor | None, size: Tensor) -> pooling.Pooled:
        """This layer's method (`vitpool.methods`) on the patch tokens [B, N, C], with what it read of its block."""
        method = self.method
        counted = size if self.proportional else None  # tokens count as the patches they stand for
        if method in MEDOID_METHODS:
            return getattr(pooling, method)(patches, k, seen, self.iters, self.output != "medoid", counted, self.spread,
                                            self.output == "mean-norm")
        if method in CLUSTERING_METHODS:
            return getattr(pooling, method)(patches, k, seen, self.iters, counted, self.spread)
        if method == "importance":
            return pooling.importance(patches, k, seen)
        if method == "random":
            return pooling.select(patches, k, self.random_scores.expand(patches.shape[0], -1))
        if method == "grid":
            return pooling.grid(patches, self.grid_in, self.grid_out)
        return pooling.tome(patches, k, metric=seen, size=size, offset=self.num_prefix_tokens)

    def tokens_kept(self, tokens: int) -> int:
        """K for `tokens` patch tokens arriving: the planned count, or the fraction of them."""
        if self.fraction is not None:
            return kept(self.fraction, tokens, self.method)
        fixed = METHODS[self.method].fixed_layout
        if tokens == self.tokens_in or (self.k <= tokens and not fixed):
            return self.k
        what = "its fixed order and grid are" if fixed else "K is"
        raise VitpoolError(
            f"this input brings {tokens} patch tokens to a {self.method} pooling layer planned for {self.tokens_in} "
            f"(K={self.k}): {what} counted for the model's own input size; convert with --k as fractions of the "
            f"incoming tokens (e.g. 0.67,0.45,0.3) to pool any size"
        )

    def extra_repr(self) -> str:
        iters = f", iters={self.iters}" if self.method in CLUSTERING_METHODS else ""
        iters += f", spread={self.spread}" if self.spread else ""
        extra = (f", output={self.output}" if self.output != "medoid" else "") + (", proportional" if self.proportional else "")
        k = f"k={self.fraction} of tokens_in" if self.fraction is not None else f"k={self.k}"
        return f"method={self.method}, {self.position}, tokens_in={self.tokens_in}, {k}{iters}{extra}"


def significance_from_attention(attention: Tensor, num_prefix_tokens: int) -> Tensor:
    """Attention each patch token receives [B, N]: probabilities [B, H, P+N, P+N], mean over heads, sum over queries.

    Summing over queries first reads the probabilities once, into [B, H, P+N]; averaging heads first would write
    a [B, P+N, P+N] mean in between (much slower in ONNX Runtime at batch 1).
    """
    return attention.float().sum(dim=2).mean(dim=1)[:, num_prefix_tokens:]


class PooledBlocks(nn.Sequential):
    """timm's blocks, run one after another, each with its `TokenPool` where it has one.

    With proportional attention, every block after a pooling layer gets log(cluster size) as an additive
    attention mask [B, 1, P+N, P+N] (`size_bias`: 0 for prefix tokens), which timm passes to the fused kernel as is.
    Gradient checkpointing lives here (`grad_checkpointing`, set through the model's `set_grad_checkpointing`):
    timm's own path, `checkpoint_seq` over the blocks, would run them without their pooling layers.
    With `head_only` (a trimmed model's `forward`, `trims_last`), the last block's MLP runs on the `head_tokens`
    leading tokens only: the head reads nothing else.
    `rope` is an Eva's rotary embedding (one for all blocks, or one per block with `rope_per_block`);
    `pair_bias` says how the blocks of a model with relative position biases take them, `shared_bias` the
    model-wide one.
    """

    grad_checkpointing = False
    head_tokens = 0  # > 0: with `head_only`, the last block's MLP runs on these leading tokens only (`trims_last`)

    def forward(self, x: Tensor, rope: Tensor | None = None, rope_per_block: bool = False,
                pair_bias: PairBias | None = None, shared_bias: Tensor | None = None, head_only: bool = False) -> Tensor:
        size = bias = origin = None
        positions = rope_stack(rope, rope_per_block)
        for i, block in enumerate(self):
            pool = getattr(block, "token_pool", None)
            kwargs = {} if bias is None or pair_bias is not None else {"attn_mask": bias}
            if positions is not None:
                kwargs["rope"] = positions[i if rope_per_block else 0]
            override = None
            if pair_bias is not None:
                override = pair_bias.arguments(block, shared_bias, origin, size, bias, kwargs)
            if pool is None and i == len(self) - 1 and head_only and self.head_tokens:
                attention, mlp = HALVES[type(block)]
                x = self._run(attention, block, x, override=override, **kwargs)[:, : self.head_tokens]
                x = self._run(mlp, block, x)
                continue
            if pool is None:
                x = self._run(_whole_block, block, x, override=override, **kwargs)
                continue
            attention, mlp = HALVES[type(block)] if pool.position == AFTER_ATTENTION else (_whole_block, None)
            x, seen = reading(pool, functools.partial(self._run, attention, block, x, override=override, **kwargs))
            if size is None:
                size = x.new_ones(x.shape[0], x.shape[1] - pool.num_prefix_tokens, dtype=torch.float32)
            x, merged, assign, positions = pool(x, size, seen, positions)
            if pair_bias is not None:
                origin = assign if origin is None else torch.where(origin >= 0, assign.gather(1, origin.clamp_min(0)), -1)
            size = merged
            if mlp is not None:
                x = self._run(mlp, block, x)
            if pool.proportional:
                bias = size_bias(size, pool.num_prefix_tokens, x.dtype)
        if x.is_cuda and size is not None:
            pooling.check_finite(x, every_device=True)  # one host sync per forward pass, not one per pooling layer
        return x

    def _run(self, part, block: nn.Module, *args, override: tuple | None = None, **kwargs) -> Tensor:
        """`part(block, *args, **kwargs)`, with a bias method of the block's overridden for the call where given;
        under gradient checkpointing its activations are recomputed in the backward pass rather than kept (the
        pooling layers, between the parts, keep theirs: they hold no large ones)."""
        if override is not None:
            part = functools.partial(_overridden, part, override)
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return torch.utils.checkpoint.checkpoint(part, block, *args, use_reentrant=False, **kwargs)
        return part(block, *args, **kwargs)


def _overridden(part, override: tuple, block: nn.Module, *args, **kwargs) -> Tensor:
    """`part` run while `owner.method()` returns `value` (a pooled bias in place of the one timm would build)."""
    owner, method, value = override
    setattr(owner, method, lambda: value)
    try:
        return part(block, *args, **kwargs)
    finally:
        delattr(owner, method)


@dataclass(frozen=True)
class PairBias:
    """How a family's attention adds a bias for every pair of tokens (relative positions, Beit and RelPos): the
    block keyword for the model-wide bias, and the block's own bias as (module, method name), or None.

    After pooling, a pair of pooled tokens gets the mean of the biases between the original tokens they stand
    for (`pooling.merged_pair_bias`), plus log sizes with proportional attention: the block's own bias method
    returns it for that call (its attention has no mask argument), or the keyword carries it."""

    keyword: str
    own: Callable[[nn.Module], tuple[nn.Module, str] | None]

    def full(self, block: nn.Module, shared: Tensor | None) -> Tensor | None:
        """The bias the block adds at the original tokens [1, H, P+N, P+N]: its own and the shared one."""
        owner = self.own(block)
        own = getattr(type(owner[0]), owner[1])(owner[0]) if owner is not None else None
        return own if shared is None else shared if own is None else own + shared

    def arguments(self, block: nn.Module, shared: Tensor | None, origin: Tensor | None, size: Tensor | None,
                  bias: Tensor | None, kwargs: dict) -> tuple | None:
        """Put the block's pair bias into `kwargs`, or return the override that delivers it."""
        if origin is None:  # no pooling yet: timm's own biases
            kwargs[self.keyword] = shared
            return None
        full = self.full(block, shared)
        total = pooling.merged_pair_bias(full, origin, size) if full is not None else None
        if bias is not None:
            total = bias if total is None else total + bias
        owner = self.own(block)
        if owner is None:
            kwargs[self.keyword] = total
            return None
        kwargs[self.keyword] = None
        return (*owner, total)


def rope_stack(rope: Tensor | None, per_block: bool) -> Tensor | None:
    """timm's rotary embedding as [L, B, H, N, D]: L = depth for one per block, else 1; B, H may be 1.
    timm gives [N, D] or [H, N, D] (per block: [depth, H, N, D]), with a batch axis after patch dropout."""
    if rope is None:
        return None
    if per_block:  # [depth, H, N, D], or [depth, B, H, N, D]
        return rope if rope.dim() == 5 else rope.unsqueeze(1)
    return rope.reshape((1,) * (5 - rope.dim()) + tuple(rope.shape))  # [N, D], [H, N, D] or [B, 1, N, D]


def _set_grad_checkpointing(model: nn.Module, enable: bool = True) -> None:
    """A converted model's `set_grad_checkpointing`: checkpoint inside `PooledBlocks`, not in timm's loop."""
    model.blocks.grad_checkpointing = enable
    if hasattr(model.patch_embed, "set_grad_checkpointing"):
        model.patch_embed.set_grad_checkpointing(enable)


def _refuse_intermediates(model: nn.Module, *args, **kwargs):
    raise VitpoolError(
        "forward_intermediates runs the blocks without their pooling layers and returns each block's tokens as "
        "the input's grid, which a pooled block no longer has; use forward_features, or the unconverted model "
        "for dense per-block features"
    )


def _whole_block(block: nn.Module, x: Tensor, **attention) -> Tensor:
    return block(x, **attention)


def _pre_norm_attention(block: nn.Module, x: Tensor, **attention) -> Tensor:
    return x + block.drop_path1(block.ls1(block.attn(block.norm1(x), **attention)))


def _pre_norm_mlp(block: nn.Module, x: Tensor) -> Tensor:
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _post_norm_attention(block: nn.Module, x: Tensor, **attention) -> Tensor:
    return x + block.drop_path1(block.norm1(block.attn(x, **attention)))


def _post_norm_mlp(block: nn.Module, x: Tensor) -> Tensor:
    return x + block.drop_path2(block.norm2(block.mlp(x)))


def _scaled(gamma: Tensor | None, x: Tensor) -> Tensor:
    return x if gamma is None else gamma * x


def _gamma_attention(block: nn.Module, x: Tensor, **attention) -> Tensor:
    return x + block.drop_path1(_scaled(block.gamma_1, block.attn(block.norm1(x), **attention)))


def _gamma_mlp(block: nn.Module, x: Tensor) -> Tensor:
    return x + block.drop_path2(_scaled(block.gamma_2, block.mlp(block.norm2(x))))


def _halves() -> dict[type, tuple]:
    """Keyword arguments (attn_mask, rope, relative position biases) go to the block's attention."""
    models = import_timm().models
    vit, eva, beit, relpos = models.vision_transformer, models.eva, models.beit, models.vision_transformer_relpos
    return {
        vit.Block: (_pre_norm_attention, _pre_norm_mlp),
        vit.ResPostBlock: (_post_norm_attention, _post_norm_mlp),
        eva.EvaBlock: (_gamma_attention, _gamma_mlp),
        eva.EvaBlockPostNorm: (_post_norm_attention, _post_norm_mlp),
        beit.Block: (_gamma_attention, _gamma_mlp),
        relpos.RelPosBlock: (_pre_norm_attention, _pre_norm_mlp),
        relpos.ResPostRelPosBlock: (_post_norm_attention, _post_norm_mlp),
    }


HALVES = _halves()  # timm block class -> (attention half, MLP half), each its forward's residual line


def size_bias(size: Tensor, num_prefix_tokens: int, dtype: torch.dtype) -> Tensor:
    """log(size) per key token as an additive attention mask [B, 1, P+N, P+N] (a view of one row per batch item);
    prefix tokens count as one patch. The query axis is spelled out: ONNX Runtime's fused Attention (opset 23)
    refuses a mask that broadcasts over the queries."""
    row = F.pad(size.clamp_min(1).log(), (num_prefix_tokens, 0)).to(dtype)[:, None, None, :]
    return row.expand(-1, -1, row.shape[-1], -1)


# timm model class -> why vitpool refuses it (one line each; a family vitpool learns to convert leaves this table)
UNSUPPORTED = {
    "SwinTransformer": "token pooling does not apply: its stages attend within windows of a fixed token grid and "
                       "merge patches themselves, so there is no one token sequence to pool",
    "VisionTransformerSAM": "token pooling does not apply: its blocks attend within windows of the token grid, "
                            "which pooled tokens no longer form",
    "NaFlexVit": "its patches arrive as a variable-length sequence with its own padding mask, which vitpool's "
                 "pooling layers do not carry yet",
}


def _eva_features(model: nn.Module, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                  head_only: bool = False) -> Tensor:
    """Eva's forward_features with its blocks run by `PooledBlocks`, which pools the rotary embedding too
    (timm's loops over the blocks itself, which would skip the pooling layers)."""
    if attn_mask is not None or is_causal:
        raise VitpoolError("a converted model takes no attention mask: its pooling layers change the token count")
    x, rope = model._pos_embed(model.patch_embed(x))
    x = model.blocks(model.norm_pre(x), rope=rope, rope_per_block=bool(getattr(model, "rope_mixed", False)),
                     head_only=head_only)
    return model.norm(x)


def _eva_positions(model: nn.Module) -> Tensor | None:
    """An Eva's rotary embedding at its input size and batch 1, as `PooledBlocks` carries it (for MAC counts)."""
    with torch.no_grad():
        tokens = model.patch_embed(torch.zeros(1, model.patch_embed.proj.in_channels, *model.patch_embed.img_size))
        return rope_stack(model._pos_embed(tokens)[1], bool(getattr(model, "rope_mixed", False)))


BEIT_BIAS = PairBias("shared_rel_pos_bias", lambda block: (block.attn, "_get_rel_pos_bias")
                     if block.attn.relative_position_bias_table is not None else None)
RELPOS_BIAS = PairBias("shared_rel_pos", lambda block: (block.attn.rel_pos, "get_bias") if block.attn.rel_pos is not None else None)


def _beit_features(model: nn.Module, x: Tensor, head_only: bool = False) -> Tensor:
    """Beit's forward_features with its blocks run by `PooledBlocks`, which pools the relative position biases."""
    x = model.patch_embed(x)
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    x = model.pos_drop(x if model.pos_embed is None else x + model.pos_embed)
    return model.norm(model.blocks(x, pair_bias=BEIT_BIAS, shared_bias=_beit_shared(model), head_only=head_only))


def _beit_shared(model: nn.Module) -> Tensor | None:
    return model.rel_pos_bias() if model.rel_pos_bias is not None else None


def _relpos_features(model: nn.Module, x: Tensor, head_only: bool = False) -> Tensor:
    """VisionTransformerRelPos's forward_features with its blocks run by `PooledBlocks` (relative biases pooled)."""
    x = model.patch_embed(x)
    if model.cls_token is not None:
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    return model.norm(model.blocks(x, pair_bias=RELPOS_BIAS, shared_bias=_relpos_shared(model), head_only=head_only))


def _vit_features(model: nn.Module, x: Tensor, head_only: bool = False) -> Tensor:
    """VisionTransformer's forward_features for `_forward_head_only` (timm's own serves every other call)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    return model.norm(model.blocks(x, head_only=head_only))


def _forward_head_only(model: nn.Module, x: Tensor) -> Tensor:
    """A trimmed model's forward: its head reads the prefix tokens only, so the last block's MLP runs on them
    alone (`trims_last`); forward_features still returns every token."""
    features = family_of(model).forward_features or _vit_features
    return model.forward_head(features(model, x, head_only=True))


def _relpos_shared(model: nn.Module) -> Tensor | None:
    return model.shared_rel_pos.get_bias() if model.shared_rel_pos is not None else None


@dataclass(frozen=True)
class Family:
    """What vitpool needs of one timm model class beyond its blocks: a forward_features that runs
    `model.blocks` as one call (None: timm's own does), the rotary positions its blocks take, and how its
    blocks take relative position biases (with the model-wide one)."""

    forward_features: Callable | None = None
    positions: Callable[[nn.Module], Tensor | None] = lambda model: None
    pair_bias: PairBias | None = None
    shared_bias: Callable[[nn.Module], Tensor | None] = lambda model: None


FAMILIES = {  # timm model class name -> Family; a subclass is its base class's family
    "VisionTransformer": Family(),
    "Eva": Family(_eva_features, _eva_positions),
    "Beit": Family(_beit_features, pair_bias=BEIT_BIAS, shared_bias=_beit_shared),
    "VisionTransformerRelPos": Family(_relpos_features, pair_bias=RELPOS_BIAS, shared_bias=_relpos_shared),
}


def family_of(model: nn.Module) -> Family | None:
    return next((FAMILIES[cls.__name__] for cls in type(model).__mro__ if cls.__name__ in FAMILIES), None)


def check_model(model: nn.Module) -> None:
    kind = type(model).__name__
    supported = ("vitpool converts timm's VisionTransformer (vit_*, deit_*, deit3_*), Eva (eva02_*, vit_*_rope_*, "
                 "vit_*_dinov3, vit_pe_*), Beit (beit*) and VisionTransformerRelPos (vit_relpos_*, vit_srelpos_*) models")
    if kind in UNSUPPORTED:
        raise VitpoolError(f"{kind} models cannot be converted: {UNSUPPORTED[kind]}; {supported}")
    needed = ("blocks", "patch_embed", "num_prefix_tokens")
    if family_of(model) is None or not all(hasattr(model, name) for name in needed):
        raise VitpoolError(f"{kind} is not a model class vitpool knows; {supported}")
    if pooling_config(model) is not None:
        raise VitpoolError("this model is already converted; convert the original timm model instead")


def check_blocks(model: nn.Module, layers, config: PoolingConfig) -> None:
    """One clear line for a block in `layers` that `config` cannot pool (after `check_model`)."""
    for layer in layers:
        _check_readable(model.blocks[layer], layer, config.method)
        if config.position == AFTER_ATTENTION:
            _check_splittable(model.blocks[layer], layer)


def _check_readable(block: nn.Module, layer: int, method: str) -> None:
    """The methods that read a block's attention need modules to read: `attn_drop` (probabilities) or `k_norm` (keys)."""
    reads = METHODS[method].reads
    if reads is not None and not all(hasattr(attention, TAPPED[reads]) for attention in attention_modules(block)):
        what = "attention probabilities" if reads == ATTENTION else "attention keys"
        raise VitpoolError(
            f"block {layer} is a {type(block).__name__}, whose {what} vitpool cannot read for --method {method}; "
            f"use --method grid or random, which read nothing, or pool other blocks with --layers"
        )


def _check_splittable(block: nn.Module, layer: int) -> None:
    if type(block) not in HALVES:
        raise VitpoolError(
            f"block {layer} is a {type(block).__name__}, which vitpool cannot split between attention and MLP "
            f"(it knows {', '.join(sorted(k.__name__ for k in HALVES))}); use --position after-block"
        )


def pooling_config(model: nn.Module) -> PoolingConfig | None:
    """The configuration a converted model was built with, or None for a plain timm model."""
    return getattr(model, "vitpool_config", None)


def token_grid(model: nn.Module) -> tuple[int, int]:
    return tuple(int(v) for v in model.patch_embed.grid_size)


def plan_for(model: nn.Module, config: PoolingConfig) -> list[PoolingStage]:
    """Validate `config` against `model`'s depth and token grid."""
    grid = token_grid(model)
    return plan_stages(config, len(model.blocks), grid[0] * grid[1], grid)


def apply_pooling(model: nn.Module, config: PoolingConfig) -> nn.Module:
    """A converted copy of `model` (the original is left as it was)."""
    check_model(model)
    stages = plan_for(model, config)
    check_blocks(model, [stage.layer for stage in stages], config)
    model = copy.deepcopy(model)
    for stage in stages:
        block = model.blocks[stage.layer]
        block.token_pool = TokenPool(config.method, stage, model.num_prefix_tokens, config.iters, config.seed,
                                     config.output, config.proportional, config.position, config.spread)
        attach_taps(block.token_pool, block)
        if config.method in NEEDS_ATTENTION:
            for attention in attention_modules(block):
                attention.fused_attn = False
    trimmed = trims_last(model, config)
    model.blocks = PooledBlocks(*model.blocks)
    model.blocks.head_tokens = int(model.num_prefix_tokens) if trimmed else 0
    if trimmed:
        model.forward = types.MethodType(_forward_head_only, model)
    features = family_of(model).forward_features
    if features is not None:
        model.forward_features = types.MethodType(features, model)
    model.blocks.grad_checkpointing = bool(getattr(model, "grad_checkpointing", False))
    model.grad_checkpointing = False  # timm's forward_features would bypass PooledBlocks.forward
    model.set_grad_checkpointing = types.MethodType(_set_grad_checkpointing, model)
    model.forward_intermediates = types.MethodType(_refuse_intermediates, model)
    model.vitpool_config = config
    return model


def trims_last(model: nn.Module, config: PoolingConfig) -> bool:
    """Whether `config.trim_last` applies to `model`: its head reads the prefix tokens only (class-token pooling,
    no attention pool), and its last block has no pooling layer and can be run as two halves."""
    last = len(model.blocks) - 1
    return (config.trim_last and getattr(model, "global_pool", None) == "token"
            and getattr(model, "attn_pool", None) is None and last not in config.layers
            and type(model.blocks[last]) in HALVES)


def pooled_layers(model: nn.Module) -> dict[int, TokenPool]:
    """Block index -> its pooling layer."""
    return {i: block.token_pool for i, block in enumerate(model.blocks) if hasattr(block, "token_pool")}
