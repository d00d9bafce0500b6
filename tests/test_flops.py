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
    report = count_macs(vitpool.convert(base, k=[128, 88, 56], layers=[2, 5, 8]), baseline=base)
    tokens = [b.tokens_in for b in report.blocks]
    assert tokens == [197] * 3 + [129] * 3 + [89] * 3 + [57] * 3
    assert [b.tokens_out for b in report.blocks][2::3] == [129, 89, 57, 57]
    assert [b.block_macs for b in report.blocks] == [_block_macs(n, 192) for n in tokens]
    assert report.baseline_macs == count_macs(base).macs
    assert report.macs < 0.62 * report.baseline_macs


def test_weighted_kmedoids_cost_is_counted_exactly():
    """One Gram matrix (N*N*C), then one N x N matrix-vector product per iteration; cluster sizes (N*K) on top
    when proportional attention uses them."""
    base = create_model("deit_tiny", pretrained=False)
    iters = 3
    plain = count_macs(vitpool.convert(base, k=[100, 50], layers=[2, 6], iters=iters, proportional=False), baseline=base)
    assert [b.pool_macs for b in plain.blocks if b.pool_macs] == [n * n * 192 + iters * n * n for n in (196, 100)]
    report = count_macs(vitpool.convert(base, k=[100, 50], layers=[2, 6], iters=iters), baseline=base)
    expected = [n * n * 192 + iters * n * n + n * k for n, k in ((196, 100), (100, 50))]
    assert [b.pool_macs for b in report.blocks if b.pool_macs] == expected
    assert report.pooling_macs == sum(expected)
    patch_embed, final_norm, head = 196 * (16 * 16 * 3) * 192, 5 * 51 * 192, 192 * 1000
    assert report.macs == sum(b.block_macs + b.pool_macs for b in report.blocks) + patch_embed + final_norm + head


@pytest.mark.parametrize("method", ["kmeans", "tome", "grid"])
def test_every_clustering_or_merging_method_shows_its_cost(method):
    base = create_model("deit_tiny", pretrained=False)
    k = {"tome": [110], "grid": [49]}.get(method, [100])
    report = count_macs(vitpool.convert(base, method=method, k=k, layers=[3]), baseline=base)
    assert report.blocks[3].pool_macs > 196 * k[0] * 192 // 2
