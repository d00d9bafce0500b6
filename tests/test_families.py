"""timm model families beyond VisionTransformer, with small random models: Eva (EVA02, the RoPE ViTs with one
rotary embedding per block or per model, DINOv3 with registers), Beit and VisionTransformerRelPos (relative
position biases: per block, MLP-made, shared). K = N changes nothing, pooled forwards are deterministic,
save/load is exact, budgets land, ONNX agrees; a pooled token's rotation is its patches' mean rotation, and a
pair of pooled tokens gets the mean bias of the pairs of patches they stand for. `dynamic_img_size` models
take K as fractions of the incoming tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import run_in_process

import vitpool
from vitpool import pooling
from vitpool.errors import VitpoolError
from vitpool.flops import count_macs
from vitpool.models import create_model

SMALL = {"depth": 3, "embed_dim": 192, "num_heads": 3}
EVA = {  # timm name: small-model kwargs
    "eva02_tiny_patch14_224": {"depth": 3},
    "vit_small_patch16_rope_mixed_224": SMALL,
    "vit_small_patch16_dinov3": SMALL,
}
RELATIVE = {
    "beitv2_base_patch16_224": SMALL,  # a relative position table per block, CLS
    "vit_relpos_small_patch16_224": SMALL,  # an MLP over log coordinates per block, no CLS
    "vit_relpos_medium_patch16_cls_224": SMALL,  # the same with CLS
    "vit_srelpos_small_patch16_224": SMALL,  # one shared by all blocks
}
FAMILY_MODELS = {**EVA, **RELATIVE}


def small(name: str):
    torch.manual_seed(0)
    return create_model(name, pretrained=False, num_classes=10, **FAMILY_MODELS[name]).eval()


@pytest.fixture(scope="module", params=list(EVA))
def eva(request):
    return small(request.param)


@pytest.fixture(scope="module", params=list(FAMILY_MODELS))
def family_model(request):
    return small(request.param)


def methods_for(model, methods):
    """Beit's attention exposes no keys for tome to read (it is refused, tested below)."""
    return [m for m in methods if not (m == "tome" and type(model).__name__ == "Beit")]


def images(model, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("position", ["after-attention", "after-block"])
def test_keeping_every_token_changes_nothing(family_model, position):
    n = family_model.patch_embed.num_patches
    x = images(family_model)
    for method in methods_for(family_model, ["kmedoids", "tome", "importance"]):
        converted = vitpool.convert(family_model, method=method, k=[n, n], layers=[0, 1], position=position)
        with torch.no_grad():
            torch.testing.assert_close(converted(x), family_model(x), rtol=1e-5, atol=1e-5)


def test_pooled_forward_is_deterministic_and_saved_exactly(family_model, tmp_path):
    n = family_model.patch_embed.num_patches
    x = images(family_model)
    for method in methods_for(family_model, ["kmedoids", "wkmeans", "tome", "random"]):
        converted = vitpool.convert(family_model, method=method, k=[n // 2, n // 4], layers=[0, 1])
        with torch.no_grad():
            first, features = converted(x), converted.forward_features(x)
            assert torch.equal(first, converted(x))
            assert features.shape[1] == family_model.num_prefix_tokens + n // 4
            vitpool.save(converted, tmp_path / method)
            assert torch.equal(vitpool.load(tmp_path / method)(x), first)


def test_the_rotation_follows_the_tokens(eva):
    """The block after a pooling layer rotates each pooled token of each image by its own position."""
    n = eva.patch_embed.num_patches
    converted = vitpool.convert(eva, method="kmedoids", k=[n // 2], layers=[0], position="after-block")
    seen = []
    converted.blocks[1].attn.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs["rope"]), with_kwargs=True)
    with torch.no_grad():
        converted(images(eva))
    rope = seen[0]
    assert rope.shape[0] == 2 and rope.shape[-2] == n // 2  # per image, one row per pooled token


def test_a_pooled_tokens_rotation_is_the_mean_of_its_patches():
    """Rotation is linear in (sin, cos): the mean embedding rotates a query into the mean of its rotations."""
    from timm.layers import apply_rot_embed_cat

    torch.manual_seed(0)
    n, width = 6, 8
    angles = (torch.rand(n, width // 2) * 6).repeat_interleave(2, dim=-1)  # timm's interleaved layout
    positions = torch.cat([angles.sin(), angles.cos()], dim=-1).view(1, 1, 1, n, 2 * width)
    assign = torch.tensor([[0, 1, 1, 2, -1, 2]])  # patch 4 dropped
    size = torch.tensor([[1.0, 1.0, 2.0, 1.0, 1.0, 3.0]])
    merged = pooling.merged_sizes(assign, size, 3)
    pooled = pooling.merged_positions(positions, assign, size, merged)[0, 0, 0]
    query = torch.randn(width)
    rotated = apply_rot_embed_cat(query.expand(n, width), positions[0, 0, 0])
    torch.testing.assert_close(apply_rot_embed_cat(query.expand(3, width), pooled)[1], (rotated[1] + 2 * rotated[2]) / 3)
    torch.testing.assert_close(apply_rot_embed_cat(query.expand(3, width), pooled)[2], (rotated[3] + 3 * rotated[5]) / 4)
    assert torch.equal(pooled[0], positions[0, 0, 0, 0])  # a token of one patch keeps its rotation exactly


def test_budgets_land_and_the_mac_model_counts_what_fvcore_counts(family_model):
    from vitpool.budget import MacModel
    from vitpool.flops import total_macs

    for budget in (0.5, 0.75):
        converted = vitpool.convert(family_model, budget=budget)
        assert abs(count_macs(converted, family_model).ratio - budget) <= 0.01 * budget
    config = converted.vitpool_config
    counted = total_macs(converted)
    assert abs(MacModel(family_model, config).total(config) - counted) <= 1e-5 * counted


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "beitv2_base_patch16_224", "vit_relpos_medium_patch16_cls_224"])
def test_onnx_export_matches_pytorch(name, tmp_path):
    from vitpool.export import export

    converted = vitpool.convert(small(name), k=[120, 60], layers=[0, 1])
    result = export(converted, tmp_path / "model.onnx", limit=4)
    assert result.check.passed and result.check.agreement == 100.0 and result.check.max_abs_diff < 1e-4


def test_a_pair_of_pooled_tokens_gets_the_mean_bias_of_its_pairs_of_patches():
    torch.manual_seed(0)
    bias = torch.randn(1, 2, 1 + 5, 1 + 5)  # CLS and 5 patches, 2 heads
    origin = torch.tensor([[0, 1, 0, -1, 1]])  # patches 0, 2 -> token 0; 1, 4 -> token 1; 3 dropped
    size = torch.tensor([[2.0, 2.0]])
    pooled = pooling.merged_pair_bias(bias, origin, size)
    assert pooled.shape == (1, 2, 3, 3)
    members = {1: [1, 3], 2: [2, 5]}  # pooled token (after CLS) -> its patches' rows in `bias`
    for a, rows in members.items():
        for b, cols in members.items():
            torch.testing.assert_close(pooled[0, :, a, b], bias[0][:, rows][:, :, cols].mean(dim=(1, 2)))
        torch.testing.assert_close(pooled[0, :, 0, a], bias[0, :, 0, rows].mean(dim=1))  # CLS to a pooled token
    assert torch.equal(pooled[0, :, 0, 0], bias[0, :, 0, 0])  # CLS stands for itself


def test_blocks_after_pooling_add_the_pooled_bias_not_their_own():
    """timm's own bias method is bypassed only for the call, so the block is unchanged afterwards."""
    model = small("beitv2_base_patch16_224")
    converted = vitpool.convert(model, k=[98], layers=[0], position="after-block")
    seen = []
    attention = converted.blocks[1].attn
    attention.register_forward_hook(lambda module, _i, _o: seen.append(module._get_rel_pos_bias().shape))
    with torch.no_grad():
        converted(images(model, 1))
    assert seen == [(1, 3, 1 + 98, 1 + 98)]  # pooled to the 98 tokens, per image, with log sizes
    assert "_get_rel_pos_bias" not in vars(attention) and attention._get_rel_pos_bias().shape[-1] == 1 + 196


def test_tome_on_beit_is_refused_in_one_line():
    with pytest.raises(VitpoolError, match="block 0 is a Block, whose attention keys vitpool cannot read for --method tome"):
        vitpool.convert(small("beitv2_base_patch16_224"), k=[98], layers=[0], method="tome")


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "eva02_tiny_patch14_224"])
def test_fractions_of_the_incoming_tokens_pool_any_input_size(name, tmp_path):
    model = create_model(name, pretrained=False, depth=4, dynamic_img_size=True, num_classes=10).eval()
    converted = vitpool.convert(model, k=[0.67, 0.45, 0.3], layers=[1, 2, 3])
    patch = model.patch_embed.patch_size[0]
    vitpool.save(converted, tmp_path / "saved")
    reloaded = vitpool.load(tmp_path / "saved")
    assert reloaded.vitpool_config.k == (0.67, 0.45, 0.3)
    for side in (10, 14, 18):
        x = torch.randn(2, 3, side * patch, side * patch)
        tokens = side * side
        for fraction in (0.67, 0.45, 0.3):
            tokens = max(1, round(fraction * tokens))
        with torch.no_grad():
            features = converted.forward_features(x)
            assert features.shape[1] == model.num_prefix_tokens + tokens
            assert torch.equal(reloaded.forward_features(x), features)


def test_counts_planned_for_one_size_refuse_an_input_they_do_not_fit():
    model = create_model("deit_tiny_patch16_224", pretrained=False, depth=3, dynamic_img_size=True).eval()
    counted = vitpool.convert(model, k=[100, 50], layers=[0, 1])
    with pytest.raises(VitpoolError, match=r"brings 49 patch tokens .* planned for 196 \(K=100\).* fractions"):
        counted(torch.randn(1, 3, 112, 112))
    assert counted.forward_features(torch.randn(1, 3, 288, 288)).shape[1] == 1 + 50  # K fits: pooled as asked
    selected = vitpool.convert(model, k=[100], layers=[0], method="random")
    with pytest.raises(VitpoolError, match="fixed order and grid are counted for the model's own input size"):
        selected(torch.randn(1, 3, 288, 288))


@pytest.mark.parametrize("k, message", [
    ([0.5, 100], "all token counts .* or all fractions"),
    ([1.5], "all token counts .* or all fractions"),
    ([0.0], "all token counts .* or all fractions"),
])
def test_k_is_counts_or_fractions_not_both(k, message):
    model = create_model("deit_tiny_patch16_224", pretrained=False, depth=3)
    with pytest.raises(VitpoolError, match=message):
        vitpool.convert(model, k=k, layers=list(range(len(k))))
    with pytest.raises(VitpoolError, match="planned for one token count"):
        vitpool.convert(model, k=[0.5], layers=[0], method="grid")


def test_the_command_line_takes_fractions():
    from vitpool.config import parse_k

    assert parse_k("0.67,0.45,0.3") == (0.67, 0.45, 0.3) and parse_k("128,96") == (128, 96)
    for text in ("0.5,x", "0.5,100", "1.5"):
        with pytest.raises(VitpoolError, match="--k must be|all token counts"):
            parse_k(text)
    result = run_in_process(["flops", "deit_tiny", "--k", "0.5,0.5", "--layers", "3,6", "--json"])
    assert result.rc == 0, result
    report = __import__("json").loads(result.stdout)
    assert [block["tokens_out"] for block in report["blocks"]][3:7] == [99, 99, 99, 50]  # 196 -> 98 -> 49, CLS kept


def test_onnx_export_of_parallel_blocks_matches_pytorch(tmp_path):
    from vitpool.export import export

    torch.manual_seed(0)
    model = create_model("vit_pwee_patch16_reg1_gap_256", pretrained=False, depth=2, num_classes=10).eval()
    converted = vitpool.convert(model, k=[128, 64], layers=[0, 1], position="after-block")
    result = export(converted, tmp_path / "model.onnx", limit=4)
    assert result.check.passed and result.check.agreement == 100.0 and result.check.max_abs_diff < 1e-4
