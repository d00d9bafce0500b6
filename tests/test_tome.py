"""`tome` is ToMe as published: checked against a reference written from the paper's description.

The reference below runs a DeiT the way ToMe's paper describes it, with explicit loops and none of
vitpool's code: in every block, attention with log(size) added to its logits (proportional attention), then
bipartite soft matching over the whole sequence, prefix tokens included but protected (CLS in set A is never
merged, a distillation token in set B never receives a merge), the r strongest edges merged by a size-weighted
mean, outputs ordered as ToMe orders them, and then the MLP on the merged tokens.
"""

from __future__ import annotations

import pytest
import torch

import vitpool
from vitpool.budget import tome_schedule
from vitpool.models import create_model


def _reference_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, prefix: int):
    """One image: x [T, C], size [T], metric [T, D] -> merged x and size (ToMe's bipartite soft matching)."""
    t = x.shape[0]
    r = min(r, (t - prefix) // 2)
    if r <= 0:
        return x, size
    m = metric / metric.norm(dim=-1, keepdim=True)
    a_index, b_index = list(range(0, t, 2)), list(range(1, t, 2))
    scores = m[a_index] @ m[b_index].T
    scores[0, :] = -float("inf")  # CLS (the first token, in A) is never merged
    if prefix == 2:
        scores[:, 0] = -float("inf")  # nothing merges into the distillation token (the first of B)
    best, best_b = scores.max(dim=-1)
    ranked = sorted(range(len(a_index)), key=lambda i: -best[i].item())
    merged, kept = ranked[:r], sorted(ranked[r:])
    sums, mass = (x * size[:, None])[b_index].clone(), size[b_index].clone()
    for i in merged:
        sums[best_b[i]] += x[a_index[i]] * size[a_index[i]]
        mass[best_b[i]] += size[a_index[i]]
    kept_a = [a_index[i] for i in kept]
    tokens = torch.cat([x[kept_a], sums / mass[:, None]])
    sizes = torch.cat([size[kept_a], mass])
    if prefix == 2:  # ToMe puts the distillation token back second
        order = [0, len(kept_a)] + [i for i in range(1, len(tokens)) if i != len(kept_a)]
        tokens, sizes = tokens[order], sizes[order]
    return tokens, sizes


def _reference_tome(model, images: torch.Tensor, r: int) -> torch.Tensor:
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    size = torch.ones(x.shape[:2])
    for block in model.blocks:
        attn = block.attn
        h = block.norm1(x)
        batch, t, c = h.shape
        q, k, v = attn.qkv(h).reshape(batch, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        logits = (q * attn.scale) @ k.transpose(-2, -1) + size.log()[:, None, None, :]
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, t, c)
        x = x + block.ls1(attn.proj(out))
        merged = [_reference_merge(x[i], size[i], k[i].mean(0), r, prefix) for i in range(batch)]
        x, size = torch.stack([m[0] for m in merged]), torch.stack([m[1] for m in merged])
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("name,r", [("deit_tiny_patch16_224", 16), ("deit_tiny_distilled_patch16_224", 8),
                                    ("deit3_small_patch16_224", 12)])
def test_tome_after_attention_is_tome_as_published(name, r):
    torch.manual_seed(0)
    model = create_model(name, pretrained=False).eval()
    for parameter_name, parameter in model.named_parameters():
        if parameter_name.endswith(".gamma"):  # LayerScale starts near 0 (deit3): make the blocks count
            parameter.data.fill_(0.5)
    k = tome_schedule(r, model.patch_embed.num_patches, len(model.blocks))
    converted = vitpool.convert(model, method="tome", k=k, layers=range(12), position="after-attention")
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _reference_tome(model, images, r)
        logits = converted(images)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_tome_schedule_clips_like_tome():
    assert tome_schedule(16, 196, 12) == (180, 164, 148, 132, 116, 100, 84, 68, 52, 36, 20, 10)
    assert tome_schedule(8, 196, 12)[-1] == 196 - 96
