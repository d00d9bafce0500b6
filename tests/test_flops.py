"""MAC counts: the DeiT convention, fused attention counted, the pooling layers' own cost visible."""

from __future__ import annotations

import pytest

import vitpool
from vitpool.flops import count_macs
from vitpool.models import create_model

# DeiT paper convention (MACs at 224): per block 12*N*D^2 + 2*N^2*D plus LayerNorms.
DEIT_GMACS = {"deit_tiny": 1.258, "deit_small": 4.608, "deit_base": 17.583}


def _block_macs(tokens: int, dim: int) -> int:
    return 12 * tokens * dim**2 + 2 * tokens**2 * dim + 2 * 5 * tokens * dim


@pytest.mark.parametrize("name", list(DEIT_GMACS))
def test_unpooled_deits_match_the_published_macs(name):
    report = count_macs(create_model(name, pretrained=False))
    assert report.macs / 1e9 == pytest.approx(DEIT_GMACS[name], rel=0.005)
    assert report.pooling_macs == 0 and report.ratio == 1.0
    dim = {"deit_tiny": 192, "deit_small": 384, "deit_base": 768}[name]
    assert [b.block_macs for b in report.blocks] == [_block_macs(197, dim)] * 12


def test_pooled_blocks_cost_what_their_token_count_says():
    base = create_model("deit_tiny", pretrained=False)
    report = count_macs(vitpool.convert(base, k=[128, 88, 56], layers=[2, 5, 8], position="after-block",
                                        trim_last=False), baseline=base)
    tokens = [b.tokens_in for b in report.blocks]
    assert tokens == [197] * 3 + [129] * 3 + [89] * 3 + [57] * 3
    assert [b.tokens_out for b in report.blocks][2::3] == [129, 89, 57, 57]
    assert [b.block_macs for b in report.blocks] == [_block_macs(n, 192) for n in tokens]
    trimmed = count_macs(vitpool.convert(base, k=[128, 88, 56], layers=[2, 5, 8], position="after-block"))
    assert trimmed.blocks[-1].tokens_out == 1  # the last block's MLP on the class token only
    assert trimmed.blocks[-1].block_macs == _block_macs(57, 192) - 8 * 56 * 192**2 - 5 * 56 * 192
    assert report.baseline_macs == count_macs(base).macs
    assert report.macs < 0.62 * report.baseline_macs


def test_weighted_kmedoids_cost_is_counted_exactly():
    """One Gram matrix (N*N*C), then one N x N matrix-vector product per iteration; cluster sizes (N adds, a
    scatter-add) on top when proportional attention uses them."""
    base = create_model("deit_tiny", pretrained=False)
    iters = 3
    plain = count_macs(vitpool.convert(base, k=[100, 50], layers=[2, 6], iters=iters, proportional=False, preset="paper"), baseline=base)
    assert [b.pool_macs for b in plain.blocks if b.pool_macs] == [n * n * 192 + iters * n * n for n in (196, 100)]
    report = count_macs(vitpool.convert(base, k=[100, 50], layers=[2, 6], iters=iters, proportional=True, preset="paper"),
                        baseline=base)
    expected = [n * n * 192 + iters * n * n + n for n in (196, 100)]
    assert [b.pool_macs for b in report.blocks if b.pool_macs] == expected
    assert report.pooling_macs == sum(expected)
    patch_embed, final_norm, head = 196 * (16 * 16 * 3) * 192, 5 * 51 * 192, 192 * 1000
    assert report.macs == sum(b.block_macs + b.pool_macs for b in report.blocks) + patch_embed + final_norm + head


def _pool_macs(method: str, n: int, k: int, c: int, head_dim: int, iters: int, spread: int = 8) -> int:
    """A pooling layer's MACs by hand: distances and Gram matrices are matmuls, cluster sums one multiply-add per
    element; the cluster sizes that proportional attention reads are N adds. K-Medoids with mean outputs (the
    default) adds one cluster sum of the tokens and one of their weights; with no iteration it computes only the
    distances from the N - K other tokens to the K seeds (the seeds' norms are gathered, not recomputed). `spread`
    seeds cost the distances from the N - K + s tokens after the first K - s seeds to those; with no iteration
    these serve the assignment, with the distances from the same tokens to the s spread seeds. The means kept at their members' norm (the
    default `mean-norm`) cost their members' norms' weighted sums and the means' norms, and after iterations the
    tokens' norms (with no iteration, the assignment's serve)."""
    sizes, s = n, min(spread, k // 2)
    seeding = (n - k + s) * (k - s) * c if s else 0  # distances to the first seeds
    keep_norm = n + k * c  # with the tokens' norms, which the assignment made unless it iterated
    if method in ("wkmedoids", "kmedoids") and iters == 0:
        # norms, distances to the seeds (to the first ones from seeding), means
        return n * c + (seeding or (n - k) * k * c) + (n - k + s) * s * c + n * c + n + sizes + keep_norm
    if method in ("wkmedoids", "kmedoids"):  # the seeds' norms
        return n * n * c + iters * n * n + n * c + n + sizes + seeding + (n * c if s else 0) + n * c + keep_norm
    if method in ("wkmeans", "kmeans"):
        assign = n * k * c + k * c  # x . centres, and the centres' norms
        return n * c + seeding + assign + iters * (n * c + n + assign) + sizes
    if method == "tome":
        n_a = n // 2  # after one prefix token, set A holds the odd patches
        return n * head_dim + n_a * (n - n_a) * head_dim + n * c + n + sizes
    if method == "grid":
        return n * c + n + sizes
    return sizes  # importance, random: selection multiplies nothing


@pytest.mark.parametrize("position", ["after-block", "after-attention"])
@pytest.mark.parametrize("method, iters", [(m, 3) for m in ("wkmedoids", "kmedoids", "wkmeans", "kmeans", "importance",
                                                             "random", "grid", "tome")] + [("wkmedoids", 0), ("kmedoids", 0)])
def test_every_method_counts_what_an_analytic_count_says(method, iters, position):
    """Both positions, every method: the whole model against a count by hand, within 0.5%; the last block
    (no pooling layer there) runs its MLP on the class token only."""
    base = create_model("deit_tiny", pretrained=False)
    dim, prefix = 192, 1
    k, layers = ([120, 80], [3, 7]) if method == "grid" else ([120, 70], [3, 7])
    model = vitpool.convert(base, method=method, k=k, layers=layers, iters=iters, position=position)
    report = count_macs(model, baseline=base)
    attention = lambda t: 4 * t * dim**2 + 2 * t**2 * dim + 5 * t * dim  # noqa: E731  qkv, proj, QK^T, AV, norm1
    mlp = lambda t: 8 * t * dim**2 + 5 * t * dim  # noqa: E731  fc1, fc2, norm2
    expected, tokens = 196 * 16 * 16 * 3 * dim + dim * 1000, 196  # patch embedding, head
    for i in range(12):
        kept = k[layers.index(i)] if i in layers else tokens
        expected += attention(tokens + prefix)
        expected += mlp(prefix if i == 11 else (kept if position == "after-attention" else tokens) + prefix)
        if i in layers:
            expected += _pool_macs(method, tokens, kept, dim, dim // 3, iters)
        tokens = kept
    expected += 5 * prefix * dim  # the final norm runs on the class token
    assert report.macs == pytest.approx(expected, rel=0.005)
    assert report.pooling_macs == pytest.approx(sum(_pool_macs(method, n, kk, dim, dim // 3, iters)
                                                    for n, kk in zip([196] + k[:-1], k)), rel=0.005)


