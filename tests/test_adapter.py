"""Model surgery on real timm architectures (random weights): prefix tokens, LayerScale, fused attention."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch

import vitpool
from vitpool.adapter import PooledBlocks, pooled_layers, significance_from_attention
from vitpool.config import default_layers, grid_shape
from vitpool.errors import VitpoolError
from vitpool.methods import METHODS
from vitpool.models import create_model

ARCHITECTURES = {
    # name: (timm kwargs, prefix tokens)
    "deit_tiny_patch16_224": ({}, 1),
    "deit_tiny_distilled_patch16_224": ({}, 2),
    "deit3_small_patch16_224": ({"depth": 4}, 1),  # LayerScale
    "vit_little_patch16_reg4_gap_256": ({"depth": 4}, 4),  # register tokens, no CLS, average pooling
}
SCHEDULES = {"tome": ([120, 80], [1, 2]), "grid": ([100, 49], [1, 2])}


def _model(name: str):
    torch.manual_seed(0)
    kwargs, _ = ARCHITECTURES[name]
    return create_model(name, pretrained=False, **kwargs)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request):
    return request.param, _model(request.param)


def _image(batch: int, model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=generator)


def test_no_pooling_layers_leave_outputs_unchanged(arch):
    name, model = arch
    converted = vitpool.convert(model, k=[], trim_last=False)
    x = _image(2, model)
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))
        torch.testing.assert_close(vitpool.convert(model, k=[])(x), model(x), rtol=1e-5, atol=1e-5)  # trimmed
    assert isinstance(converted.blocks, PooledBlocks)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_keeps_k_patch_tokens_and_the_prefix(arch, method):
    name, model = arch
    prefix = ARCHITECTURES[name][1]
    assert model.num_prefix_tokens == prefix
    patches = model.patch_embed.num_patches
    side = model.patch_embed.grid_size[0]
    k = {"tome": [patches * 3 // 4, patches // 2], "grid": [(side * 3 // 4) ** 2, (side // 2) ** 2]}.get(
        method, [patches * 3 // 4, patches // 3]
    )
    layers = [0, 2]
    converted = vitpool.convert(model, method=method, k=k, layers=layers)
    x = _image(2, model)
    with torch.no_grad():
        features = converted.forward_features(x)
        reference = model.forward_features(x)
        logits = converted.forward_head(features)
    assert features.shape == (2, prefix + k[-1], model.embed_dim)
    assert logits.shape == (2, model.num_classes) and torch.isfinite(logits).all()
    assert converted.num_prefix_tokens == prefix
    # Prefix tokens pass through the first pooling layer untouched: before it they equal the original's.
    with torch.no_grad():
        first = converted.blocks[: layers[0] + 1](converted.norm_pre(converted._pos_embed(converted.patch_embed(x))))
        original = model.blocks[: layers[0] + 1](model.norm_pre(model._pos_embed(model.patch_embed(x))))
    torch.testing.assert_close(first[:, :prefix], original[:, :prefix])
    assert not torch.equal(features, reference[:, : features.shape[1]])


def test_original_model_is_not_modified():
    model = _model("deit_tiny_patch16_224")
    x = _image(1, model)
    with torch.no_grad():
        before = model(x)
    fused = [block.attn.fused_attn for block in model.blocks]
    vitpool.convert(model, k=[100, 50], layers=[3, 6])
    assert type(model.blocks) is torch.nn.Sequential
    assert [block.attn.fused_attn for block in model.blocks] == fused
    assert not any(hasattr(block, "token_pool") for block in model.blocks)
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_state_dict_keys_and_values_are_the_originals():
    model = _model("deit3_small_patch16_224")
    converted = vitpool.convert(model, k=[150, 90], layers=[0, 2])
    original, new = model.state_dict(), converted.state_dict()
    assert list(original) == list(new)
    assert all(torch.equal(original[key], new[key]) for key in original)


@pytest.mark.parametrize("method,expect_fused", [("wkmedoids", False), ("importance", False), ("tome", True), ("grid", True)])
def test_fused_attention_is_given_up_only_where_significance_is_needed(method, expect_fused):
    model = _model("deit_tiny_patch16_224")
    assert all(block.attn.fused_attn for block in model.blocks), "timm's fused attention should be on by default"
    k, layers = SCHEDULES.get(method, ([150, 100], [1, 2]))
    converted = vitpool.convert(model, method=method, k=k, layers=layers)
    for i, block in enumerate(converted.blocks):
        assert block.attn.fused_attn == (expect_fused or i not in layers), f"block {i}"


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "deit3_small_patch16_224"])
def test_significance_is_attention_received_from_explicit_softmax(name):
    """Importance keeps exactly the tokens ranked by an independently computed significance."""
    model = _model(name)
    layer, k = 1, 60
    converted = vitpool.convert(model, method="importance", k=[k], layers=[layer])
    prefix = model.num_prefix_tokens
    x = _image(2, model)
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        tokens = model.blocks[:layer](tokens)
        block = model.blocks[layer]
        attn = block.attn
        qkv = attn.qkv(block.norm1(tokens)).reshape(2, tokens.shape[1], 3, attn.num_heads, attn.head_dim)
        q, key = qkv.permute(2, 0, 3, 1, 4)[:2]
        probabilities = (q @ key.transpose(-2, -1) * attn.scale).softmax(-1)
        significance = probabilities.mean(1).sum(1)[:, prefix:]
        after = block(tokens)
        keep = significance.topk(k, dim=-1).indices.sort(-1).values
        expected = torch.cat([after[:, :prefix], after[:, prefix:].gather(1, keep[..., None].expand(-1, -1, after.shape[-1]))], 1)
        pooled = converted.blocks[: layer + 1](converted.norm_pre(converted._pos_embed(converted.patch_embed(x))))
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(significance_from_attention(probabilities, prefix), significance)


def test_attention_probabilities_are_freed_before_the_mlp_runs():
    """The hook keeps only the significance; holding the N x N probabilities through the MLP raised the peak."""
    model = _model("deit_tiny_patch16_224")
    converted = vitpool.convert(model, k=[100], layers=[1])
    block = converted.blocks[1]
    probabilities, alive_in_mlp = [], []
    block.attn.attn_drop.register_forward_hook(lambda _m, _i, out: probabilities.append(weakref.ref(out)))
    block.mlp.register_forward_pre_hook(lambda _m, _i: alive_in_mlp.append(probabilities[-1]() is not None))
    with torch.no_grad():
        converted(_image(2, model))
    assert alive_in_mlp == [False]


def test_pooled_model_is_deterministic_and_batch_independent():
    model = _model("deit_tiny_patch16_224")
    converted = vitpool.convert(model, k=[150, 100, 60], layers=[1, 4, 7])
    x = _image(3, model)
    with torch.no_grad():
        first, second = converted(x), converted(x)
        alone = torch.cat([converted(x[i : i + 1]) for i in range(3)])
    assert torch.equal(first, second)
    torch.testing.assert_close(first, alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_pool(dtype):
    model = _model("deit_tiny_patch16_224")
    converted = vitpool.convert(model, k=[150, 100], layers=[1, 4]).to(dtype)
    with torch.no_grad():
        logits = converted(_image(2, model).to(dtype))
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_nan_input_raises_a_clear_error():
    model = _model("deit_tiny_patch16_224")
    converted = vitpool.convert(model, k=[100], layers=[2])
    x = _image(1, model)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        with torch.no_grad():
            converted(x)


def test_grid_pooling_follows_the_grid_through_layers():
    model = _model("deit_tiny_patch16_224")
    converted = vitpool.convert(model, method="grid", k=[49, 16], layers=[2, 5])
    pools = pooled_layers(converted)
    assert (pools[2].grid_in, pools[2].grid_out) == ((14, 14), (7, 7))
    assert (pools[5].grid_in, pools[5].grid_out) == ((7, 7), (4, 4))
    assert grid_shape(12, (14, 14)) == (3, 4)


def test_default_layers_spread_evenly():
    assert default_layers(1, 12) == (5,)
    assert default_layers(3, 12) == (2, 5, 8)
    assert default_layers(11, 12) == tuple(range(11))
    assert default_layers(3, 12, "after-attention") == (3, 6, 9)
    assert default_layers(12, 12, "after-attention") == tuple(range(12))  # the last block's MLP saves too
    converted = vitpool.convert(_model("deit_tiny_patch16_224"), k=[150, 100, 50])
    assert converted.vitpool_config.layers == (3, 6, 9)
    converted = vitpool.convert(_model("deit_tiny_patch16_224"), k=[150, 100, 50], position="after-block")
    assert converted.vitpool_config.layers == (2, 5, 8)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"k": [197], "layers": [0]}, "larger than the 196"),
        ({"k": [100, 120], "layers": [1, 2]}, "larger than the 100"),
        ({"k": [0], "layers": [0]}, "at least 1"),
        ({"k": [100, 50], "layers": [1]}, "one block per K"),
        ({"k": [100], "layers": [12]}, "out of range"),
        ({"k": [100, 50], "layers": [5, 2]}, "strictly increasing"),
        ({"k": [100], "layers": [1], "method": "kmedian"}, "unknown method"),
        ({"k": [90], "layers": [1], "method": "tome"}, "at most half"),
        ({"k": [17], "layers": [1], "method": "grid"}, "grid pooling cannot make 17"),
        ({"k": [100] * 13}, "blocks to pool"),
        ({"k": [100] * 12, "position": "after-block"}, "blocks to pool after"),
    ],
)
def test_bad_schedules_are_rejected_with_a_reason(kwargs, message):
    with pytest.raises(VitpoolError, match=message):
        vitpool.convert(_model("deit_tiny_patch16_224"), **kwargs)


def test_converting_twice_is_refused():
    converted = vitpool.convert(_model("deit_tiny_patch16_224"), k=[100], layers=[2])
    with pytest.raises(VitpoolError, match="already converted"):
        vitpool.convert(converted, k=[50], layers=[4])


@pytest.mark.parametrize("position", ["after-attention", "after-block"])
@pytest.mark.parametrize("method", list(METHODS))
def test_k_equal_to_n_is_the_identity_at_both_positions(method, position):
    """Keeping every token changes nothing, token by token and in order, wherever the pooling layer sits (the
    explicit attention path that significance needs rounds differently from the fused one, hence the tolerance)."""
    model = _model("deit_tiny_patch16_224")
    converted = vitpool.convert(model, method=method, k=[196, 196], layers=[3, 11], position=position)
    x = _image(2, model)
    with torch.no_grad():
        torch.testing.assert_close(converted.forward_features(x), model.forward_features(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["after-attention", "after-block"])
def test_gradient_checkpointing_keeps_the_pooling_and_the_gradients(tiny_model, position):
    """timm's checkpoint_seq would run the blocks without their pooling layers; the converted model's
    set_grad_checkpointing checkpoints inside PooledBlocks instead: same outputs and gradients, recomputed."""
    images = _image(2, tiny_model)

    def run(checkpointing: bool):
        model = vitpool.convert(tiny_model, k=[120, 60], layers=[4, 8], position=position)
        model.set_grad_checkpointing(checkpointing)
        calls = []
        # a pre-hook: the recomputation stops early, once it has what the backward pass needs
        model.blocks[10].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        tokens = model.forward_features(images)
        tokens.sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return tokens.detach(), grads, len(calls), model

    plain_tokens, plain_grads, plain_calls, _ = run(False)
    tokens, grads, calls, checkpointed = run(True)
    assert tokens.shape[1] == 1 + 60  # the pooling layers ran
    torch.testing.assert_close(tokens, plain_tokens)
    torch.testing.assert_close(grads, plain_grads)
    assert (plain_calls, calls) == (1, 2)  # the block after pooling was recomputed in the backward pass
    assert checkpointed.blocks.grad_checkpointing and not checkpointed.grad_checkpointing  # timm's loop stays off


def test_forward_intermediates_is_refused_not_run_without_pooling(tiny_model):
    pooled = vitpool.convert(tiny_model, k=[120], layers=[4])
    with pytest.raises(VitpoolError, match="forward_intermediates .* without their pooling layers"):
        pooled.forward_intermediates(_image(1, pooled))
    assert tiny_model.forward_intermediates(_image(1, tiny_model), intermediates_only=True)  # the original keeps it


UNSUPPORTED_FAMILIES = {  # timm name: (small-model kwargs, class)
    "swin_tiny_patch4_window7_224": ({"depths": (1, 1, 1, 1)}, "SwinTransformer"),
    "samvit_base_patch16": ({"depth": 2, "embed_dim": 96, "num_heads": 2, "img_size": 256}, "VisionTransformerSAM"),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED_FAMILIES))
def test_unsupported_families_get_one_reason_not_a_traceback(name):
    kwargs, kind = UNSUPPORTED_FAMILIES[name]
    model = create_model(name, pretrained=False, **kwargs)
    for request in ({"k": [50]}, {"budget": 0.6}):
        with pytest.raises(VitpoolError, match=f"^{kind} models cannot be converted: .*; vitpool converts"):
            vitpool.convert(model, **request)


@pytest.mark.parametrize("name", ["vit_small_patch16_18x2_224", "vit_pwee_patch16_reg1_gap_256"])
def test_parallel_blocks_pool_after_the_block_with_every_method(name):
    """Attention and MLP run side by side, so pooling goes after the block; significance and keys are read from
    each attention branch (ParallelThingsBlock: their mean) or from the block itself (ParallelScalingBlock)."""
    torch.manual_seed(0)
    model = create_model(name, pretrained=False, depth=2).eval()
    n = model.patch_embed.num_patches
    x = _image(2, model)
    with pytest.raises(VitpoolError, match="cannot split between attention and MLP"):
        vitpool.convert(model, k=[n // 2], layers=[0], method="random", position="after-attention")
    for method in ("kmedoids", "wkmeans", "importance", "tome", "random"):
        same = vitpool.convert(model, k=[n], layers=[0], method=method, position="after-block")
        pooled = vitpool.convert(model, k=[n // 2], layers=[0], method=method, position="after-block")
        with torch.no_grad():
            torch.testing.assert_close(same(x), model(x), rtol=1e-5, atol=1e-5)
            assert pooled.forward_features(x).shape[1] == model.num_prefix_tokens + n // 2
            assert torch.equal(pooled(x), pooled(x))


def test_a_parallel_blocks_significance_is_the_mean_over_its_attention_branches():
    from vitpool.adapter import TokenPool, reading

    torch.manual_seed(0)
    model = create_model("vit_small_patch16_18x2_224", pretrained=False, depth=1).eval()
    block = vitpool.convert(model, k=[98], layers=[0], method="kmedoids", position="after-block").blocks[0]
    branches = [branch.attn.attn_drop for branch in block.attns]
    probabilities = []
    handles = [module.register_forward_hook(lambda _m, _i, out: probabilities.append(out)) for module in branches]
    tokens = torch.randn(2, 197, model.embed_dim)
    with torch.no_grad():
        _, seen = reading(block.token_pool, lambda: block(tokens))
        block(tokens)  # outside `reading`: nothing is kept
    for handle in handles:
        handle.remove()
    assert len(probabilities) == 4 and isinstance(block.token_pool, TokenPool) and block.token_pool.inbox == []
    expected = torch.stack([p.sum(dim=2).mean(dim=1)[:, 1:] for p in probabilities[:2]]).mean(dim=0)
    torch.testing.assert_close(seen, expected)


@pytest.mark.parametrize("method", ["kmedoids", "tome"])  # reads the attention / the keys
def test_a_compiled_model_is_one_graph(tiny_model, method):
    # torch._dynamo.explain traces without compiling: the taps, the pooling layers and timm's blocks, whole.
    pooled = vitpool.convert(tiny_model, budget=0.6, method=method)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(pooled)(torch.randn(2, 3, 224, 224))
    assert explained.graph_count == 1, [reason.reason for reason in explained.break_reasons]


def test_a_copied_model_reads_through_its_own_taps(tiny_model):
    pooled = vitpool.convert(tiny_model, budget=0.6)
    copied = copy.deepcopy(pooled)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = pooled(x)
        torch.testing.assert_close(copied(x), expected, rtol=0, atol=0)
    assert all(pool.inbox == [] for pool in pooled_layers(copied).values())
