"""Proportional attention (log cluster size as an attention bias) and weighted-mean outputs for K-Medoids, as they
are or at their members' norm."""

from __future__ import annotations

import pytest
import torch

import vitpool
from vitpool import pooling
from vitpool.errors import VitpoolError
from vitpool.flops import count_macs
from vitpool.models import create_model

SCHEDULE = {"k": [128, 88, 56], "layers": [2, 5, 8], "position": "after-block"}


@pytest.fixture(scope="module")
def deit_tiny():
    torch.manual_seed(0)
    return create_model("deit_tiny", pretrained=False)


def _masks_seen(model, x):
    """The attn_mask each block's attention receives, by block index."""
    seen = {}
    handles = [
        block.attn.register_forward_pre_hook(lambda _m, _a, kwargs, i=i: seen.__setitem__(i, kwargs.get("attn_mask")), with_kwargs=True)
        for i, block in enumerate(model.blocks)
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return seen


def test_blocks_after_pooling_get_log_cluster_sizes(deit_tiny):
    converted = vitpool.convert(deit_tiny, **SCHEDULE)  # proportional attention is the default
    seen = _masks_seen(converted, torch.randn(2, 3, 224, 224))
    assert all(seen[i] is None for i in range(3))  # before and at the first pooled block: plain attention
    for i in range(3, 12):
        mask = seen[i]
        k = SCHEDULE["k"][sum(i > layer for layer in SCHEDULE["layers"]) - 1]
        assert mask.shape == (2, 1, 1 + k, 1 + k)  # the query axis spelled out, for ONNX Runtime's Attention
        row = mask[:, :, 0]
        assert torch.equal(mask, row.unsqueeze(2).expand_as(mask))  # the same key biases for every query
        assert torch.equal(row[..., 0], torch.zeros(2, 1))  # CLS stands for itself
        # every patch is in exactly one cluster: the sizes add up to the 196 patches
        torch.testing.assert_close(row[..., 1:].exp().sum(-1), torch.full((2, 1), 196.0))
    assert all(block.attn.fused_attn for i, block in enumerate(converted.blocks) if i not in SCHEDULE["layers"])


def test_proportional_attention_changes_nothing_where_tokens_stand_for_one_patch(deit_tiny):
    x = torch.randn(2, 3, 224, 224)
    plain = vitpool.convert(deit_tiny, method="importance", proportional=False, **SCHEDULE)
    proportional = vitpool.convert(deit_tiny, method="importance", proportional=True, **SCHEDULE)
    clustered = vitpool.convert(deit_tiny, proportional=True, **SCHEDULE)
    with torch.no_grad():
        torch.testing.assert_close(proportional(x), plain(x))
        assert not torch.allclose(clustered(x), vitpool.convert(deit_tiny, proportional=False, **SCHEDULE)(x))


def test_mean_outputs_are_the_weighted_means_of_the_medoid_clusters():
    generator = torch.Generator().manual_seed(0)
    x, significance = torch.randn(2, 40, 8, generator=generator), torch.rand(2, 40, generator=generator) + 0.1
    medoid = pooling.wkmedoids(x, 10, significance, iters=3)
    mean = pooling.wkmedoids(x, 10, significance, iters=3, means=True)
    assert torch.equal(mean.assign, medoid.assign)
    expected, _ = pooling.cluster_means(x, significance, medoid.assign, 10)
    torch.testing.assert_close(mean.tokens, expected)


def test_mean_outputs_cost_one_cluster_sum_more(deit_tiny):
    medoid = count_macs(vitpool.convert(deit_tiny, output="medoid", **SCHEDULE)).blocks[2].pool_macs
    mean = count_macs(vitpool.convert(deit_tiny, output="mean", **SCHEDULE)).blocks[2].pool_macs
    # cluster sums and weights: one multiply-add per token element and per token weight (scatter-adds)
    assert mean - medoid == 196 * 192 + 196


def test_mean_norm_outputs_keep_the_members_norm_and_the_means_direction():
    """Two orthogonal unit tokens joined in one cluster: their mean is 1/sqrt(2) long, the kept-norm output 1 long
    along the same direction; a token of norm 3 alone stays as it is. Sizes weigh the norms as they weigh the mean."""
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-3.0, 0.0]]])
    significance = torch.tensor([[2.0, 1.0, 3.0]])
    mean = pooling.kmedoids(x, 2, significance, iters=0, means=True)
    kept = pooling.kmedoids(x, 2, significance, iters=0, means=True, keep_norm=True)
    assert torch.equal(kept.assign, mean.assign) and kept.assign.tolist() == [[0, 0, 1]]
    torch.testing.assert_close(mean.tokens[0, 0], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(kept.tokens[0], torch.tensor([[0.5**0.5, 0.5**0.5], [-3.0, 0.0]]))
    stretched = torch.tensor([[[1.0, 0.0], [0.0, 3.0], [-3.0, 0.0]]])  # norms 1 and 3, sizes 3 and 1: mean norm 1.5
    sized = pooling.kmedoids(stretched, 2, significance, iters=0, means=True, size=torch.tensor([[3.0, 1.0, 1.0]]),
                             keep_norm=True)
    torch.testing.assert_close(sized.tokens[0, 0].norm(), torch.tensor(1.5))
    torch.testing.assert_close(sized.tokens[0, 0] / 1.5, torch.nn.functional.normalize(torch.tensor([0.75, 0.75]), dim=0))


def test_mean_norm_outputs_with_k_equal_n_are_the_tokens():
    generator = torch.Generator().manual_seed(1)
    x, significance = torch.randn(2, 30, 16, generator=generator) * 3, torch.rand(2, 30, generator=generator)
    for iters in (0, 2):
        out = pooling.wkmedoids(x, 30, significance, iters=iters, means=True, size=torch.rand(2, 30) + 1, keep_norm=True)
        torch.testing.assert_close(pooling.gather_tokens(out.tokens, out.assign), x)


def test_mean_norm_outputs_cost_the_norms(deit_tiny):
    mean = count_macs(vitpool.convert(deit_tiny, output="mean", **SCHEDULE)).blocks[2].pool_macs
    kept = count_macs(vitpool.convert(deit_tiny, output="mean-norm", **SCHEDULE)).blocks[2].pool_macs
    k = SCHEDULE["k"][0]
    # the tokens' weighted norms summed (a scatter-add), the means' norms: the tokens' squared norms are the
    # assignment's, with no iteration (the default)
    assert kept - mean == 196 + k * 192


def test_variants_are_saved_and_validated(deit_tiny, tmp_path):
    converted = vitpool.convert(deit_tiny, output="mean", proportional=False, **SCHEDULE)
    vitpool.save(converted, tmp_path / "m")
    reloaded = vitpool.load(tmp_path / "m")
    assert reloaded.vitpool_config == converted.vitpool_config
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(reloaded(x), converted(x))
    for output in ("mean", "mean-norm"):
        with pytest.raises(VitpoolError, match=f"--output {output} applies to"):
            vitpool.convert(deit_tiny, method="tome", output=output, k=[150], layers=[2])
    with pytest.raises(VitpoolError, match="choose medoid, mean or mean-norm"):
        vitpool.convert(deit_tiny, output="norm", **SCHEDULE)


def test_a_token_counts_as_the_patches_it_stands_for():
    """Tokens at 0, 1 and 10 on a line: alone the middle one is the best medoid; once the token at 10 stands for
    five patches it is, and the mean moves towards it."""
    x = torch.tensor([[[0.0], [1.0], [10.0]]])
    significance = torch.ones(1, 3)
    assert pooling.kmedoids(x, 1, significance, iters=2).tokens.item() == 1.0
    size = torch.tensor([[1.0, 1.0, 5.0]])
    assert pooling.kmedoids(x, 1, significance, iters=2, size=size).tokens.item() == 10.0
    assert pooling.kmedoids(x, 1, significance, iters=2, means=True, size=size).tokens.item() == pytest.approx(51 / 7)
    assert pooling.wkmeans(x, 1, significance, iters=1, size=size).tokens.item() == pytest.approx(51 / 7)


def test_later_pooling_layers_weigh_tokens_by_size_only_with_proportional(deit_tiny):
    """The second pooling layer gets the first one's cluster sizes as weights when proportional is on."""
    seen = {}
    original = pooling.kmedoids

    def spy(x, k, significance, iters, means, size=None, spread=0, keep_norm=False):
        seen[x.shape[1]] = size
        return original(x, k, significance, iters, means, size, spread, keep_norm)

    x = torch.randn(1, 3, 224, 224)
    for proportional in (True, False):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(pooling, "kmedoids", spy)
            with torch.no_grad():
                vitpool.convert(deit_tiny, proportional=proportional, **SCHEDULE)(x)
        if proportional:
            assert seen[196] is not None and torch.equal(seen[196], torch.ones(1, 196))
            assert seen[128].sum().item() == 196 and seen[128].max().item() > 1
        else:
            assert seen[196] is None and seen[128] is None


def test_spread_seeds_are_for_the_clustering_methods_and_named_in_the_flags(deit_tiny):
    from vitpool.config import make_config

    default = vitpool.convert(deit_tiny, k=[100], layers=[5])
    assert default.vitpool_config.spread == 8 and "--spread 8" in default.vitpool_config.flags()
    assert default.blocks[5].token_pool.spread == 8
    assert make_config(preset="paper", layers=()).spread == 0  # the paper's top-K initialisation
    assert make_config(method="importance", layers=()).spread == 0 and "--spread" not in make_config(method="importance", k=(100,), layers=(5,)).flags()
    assert make_config(method="kmeans", layers=()).spread == 8
    x = torch.randn(2, 3, 224, 224)
    top_k = vitpool.convert(deit_tiny, k=[100], layers=[5], spread=0)
    assert not torch.equal(default(x), top_k(x))  # the setting reaches the pooling layer
    with pytest.raises(VitpoolError, match="--spread applies to"):
        vitpool.convert(deit_tiny, method="importance", spread=4, k=[100], layers=[5])
    with pytest.raises(VitpoolError, match="--spread must be 0 or more"):
        vitpool.convert(deit_tiny, spread=-1, k=[100], layers=[5])
