"""Multiply-accumulate (MAC) counts per block, with fvcore plus handles for what it misses.

fvcore counts one MAC as one "flop" and knows matmul, einsum, linear, convolution and LayerNorm, but not
`aten::scaled_dot_product_attention` (timm's fused attention): without the handle below a ViT's attention products
go uncounted, and nor does it count `linalg_vecdot`. The pooling layers are written with matmul and vecdot for their
multiply-accumulates (Gram and distance matrices), so they are counted like any layer; their cluster sums are
index-adds (and scatter-adds for rotary positions and relative-position biases), counted here as one multiply-add per
element added (the weighting and the add); comparisons, argmin and gathers are not MACs and are not counted, here as
everywhere in fvcore.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

from vitpool.adapter import pooled_layers


def _sdpa_macs(inputs, outputs) -> int:
    """B*H*N*M*(D + Dv): Q K^T and the probabilities times V."""
    q, k, v = (inputs[i].type().sizes() for i in range(3))
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _vecdot_macs(inputs, outputs) -> int:
    """aten::linalg_vecdot(x, y, dim): one MAC per element of the broadcast operands."""
    import torch

    return math.prod(torch.broadcast_shapes(inputs[0].type().sizes(), inputs[1].type().sizes()))


def _added_elements(inputs, outputs) -> int:
    """aten::scatter_add(self, dim, index, src) and aten::index_add(self, dim, index, source): one weighted add
    per element of the source."""
    return math.prod(inputs[3].type().sizes())


@dataclass
class BlockMacs:
    index: int
    tokens_in: int  # all tokens entering the block, prefix tokens included
    tokens_out: int  # after the block's pooling layer, if it has one
    block_macs: int
    pool_macs: int


@dataclass
class MacReport:
    macs: int  # the whole model, pooling layers included
    baseline_macs: int  # the same model unpooled
    pooling_macs: int
    num_prefix_tokens: int
    input_size: tuple[int, int, int]
    blocks: list[BlockMacs] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.macs / self.baseline_macs

    def to_json(self) -> dict:
        return {
            "unit": "GMACs (multiply-accumulates, batch 1)",
            "gmacs": self.macs / 1e9,
            "baseline_gmacs": self.baseline_macs / 1e9,
            "pooling_gmacs": self.pooling_macs / 1e9,
            "ratio": self.ratio,
            "input_size": list(self.input_size),
            "num_prefix_tokens": self.num_prefix_tokens,
            "blocks": [asdict(b) for b in self.blocks],
        }


def input_size(model) -> tuple[int, int, int]:
    return (model.patch_embed.proj.in_channels, *(int(v) for v in model.patch_embed.img_size))


def analyse(module, inputs: tuple) -> tuple[int, dict]:
    """fvcore's total and per-submodule MACs of `module(*inputs)`, with the handles fvcore lacks."""
    import torch
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(module.eval(), inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
    analysis.set_op_handle("aten::linalg_vecdot", _vecdot_macs)
    analysis.set_op_handle("aten::scatter_add", _added_elements)
    analysis.set_op_handle("aten::index_add", _added_elements)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        total = int(analysis.total())
        by_module = analysis.by_module()
    return total, by_module


def _analyse(model) -> tuple[int, dict]:
    import torch

    return analyse(model, (torch.zeros(1, *input_size(model)),))


def total_macs(model) -> int:
    """MACs of one forward pass at batch 1 and the model's input size."""
    return _analyse(model)[0]


def count_macs(model, baseline=None) -> MacReport:
    """Per-block MACs of `model`; `baseline` is its unpooled original (counted too) or None if it is one."""
    total, by_module = _analyse(model)
    pools = pooled_layers(model)
    prefix = int(model.num_prefix_tokens)
    tokens = model.patch_embed.num_patches + prefix
    blocks, last, head_tokens = [], len(model.blocks) - 1, getattr(model.blocks, "head_tokens", 0)
    for i in range(len(model.blocks)):
        pool_macs = int(by_module.get(f"blocks.{i}.token_pool", 0))
        tokens_out = pools[i].k + prefix if i in pools else head_tokens if i == last and head_tokens else tokens
        blocks.append(BlockMacs(i, tokens, tokens_out, int(by_module.get(f"blocks.{i}", 0)) - pool_macs, pool_macs))
        tokens = tokens_out
    baseline_macs = total_macs(baseline) if baseline is not None else total
    pooling = sum(b.pool_macs for b in blocks)
    return MacReport(total, baseline_macs, pooling, prefix, input_size(model), blocks)
