"""MAC-budget schedules: the solver lands within 1% of the budget, counted like `vitpool flops`."""

from __future__ import annotations

import pytest
from conftest import assert_user_error, run_in_process

import vitpool
from dataclasses import replace

from vitpool.adapter import apply_pooling
from vitpool.budget import FLOOR_SNAP, LATE_FLOOR, MacModel, default_shape, family_layers, family_schedule, solve, without_keep_all
from vitpool.config import AFTER_ATTENTION, AFTER_BLOCK, EVERY_BLOCK, LATE, PRESETS, SPREAD, PoolingConfig, PoolingStage, make_config
from vitpool.errors import VitpoolError
from vitpool.flops import count_macs, total_macs
from vitpool.methods import METHODS
from vitpool.models import create_model

MODELS = {}


def _model(name):
    if name not in MODELS:
        MODELS[name] = create_model(name, pretrained=False)
    return MODELS[name]


@pytest.mark.parametrize(
    "name,method,budget,target_gmacs",
    [
        ("deit_tiny", "wkmedoids", 0.5, None),
        ("deit_tiny", "tome", 0.75, None),
        ("deit_tiny", "grid", 0.6, None),
        ("deit_tiny", "importance", None, 0.9),
        ("deit_small", "kmeans", 0.6, None),
    ],
)
def test_solved_schedule_lands_within_one_percent(name, method, budget, target_gmacs):
    model = _model(name)
    config, reached, baseline = solve(model, make_config(method, layers=()), budget=budget, target_gmacs=target_gmacs)
    target = budget * baseline if budget is not None else target_gmacs * 1e9
    converted = vitpool.convert(model, method=method, k=config.k, layers=config.layers)
    assert total_macs(converted) == reached  # the figure reported is the whole converted model's count
    assert abs(reached - target) <= 0.01 * target
    assert config.layers == tuple(range(3, 11))[: len(config.k)], "every block from 3, less those that would keep every token"
    assert all(a > b for a, b in zip(config.k, config.k[1:])), "each layer removes tokens"


def test_families_place_their_layers():
    assert family_layers(12, LATE, AFTER_ATTENTION) == tuple(range(3, 12))
    assert family_layers(12, LATE, AFTER_ATTENTION, trimmed=True) == tuple(range(3, 11))
    assert family_layers(12, LATE, AFTER_BLOCK) == tuple(range(3, 11))  # pooling after the last block saves nothing
    assert family_layers(24, LATE, AFTER_ATTENTION) == tuple(range(6, 24))
    assert family_layers(12, SPREAD, AFTER_BLOCK) == (2, 5, 8)
    assert family_layers(12, EVERY_BLOCK, AFTER_ATTENTION) == tuple(range(12))
    assert family_layers(12, EVERY_BLOCK, AFTER_BLOCK) == tuple(range(11))
    assert family_layers(12, EVERY_BLOCK, AFTER_ATTENTION, trimmed=True) == tuple(range(11))


def test_paper_preset_is_the_papers_configuration():
    model = _model("deit_tiny")
    converted = vitpool.convert(model, budget=0.6, preset="paper")
    config = converted.vitpool_config
    assert (config.method, config.output, config.position, config.proportional) == ("wkmedoids", "medoid", "after-block", False)
    assert config.layers == (2, 5, 8)
    default = vitpool.convert(model, budget=0.6).vitpool_config
    assert (default.method, default.output, default.position) == ("kmedoids", "mean-norm", "after-attention")


@pytest.mark.parametrize("method", ["kmedoids", "wkmedoids", "kmeans", "tome", "grid", "random"])
def test_the_parts_model_adds_up_to_the_whole_model_count(method):
    model = _model("deit_tiny")
    k = (121, 81, 49) if method == "grid" else (150, 100, 60)
    config = make_config(method, k, (1, 4, 9), 5)
    assert config.position == "after-attention"
    assert MacModel(model, make_config(method, layers=())).total(config) == count_macs(vitpool.convert(model, method=method, k=k, layers=(1, 4, 9))).macs
    after_block = replace(config, position="after-block")
    assert MacModel(model, replace(after_block, k=())).total(after_block) == count_macs(apply_pooling(model, after_block)).macs


@pytest.mark.parametrize("method", [name for name, method in METHODS.items() if method.cubic_macs] + ["wkmedoids-medoid"])
def test_a_pooling_layers_count_off_the_fitted_cubic_is_fvcores(method):
    # The bisection reads a pooling layer's MACs off a cubic in (N, K) fitted near N = 196, K = 98; far from there too
    # it must be fvcore's count of the layer.
    method, _, output = method.partition("-")
    macs = MacModel(_model("deit_tiny"), make_config(method, layers=(), output=output or None))
    for sizes_live in (True, False):
        for n, k in [(196, 15), (142, 103), (39, 29), (21, 15), (60, 60), (30, 1)]:
            stage = PoolingStage(0, n, k)
            assert macs.pool(stage, sizes_live) == macs._pool(stage, sizes_live, True), (n, k, sizes_live)
    assert macs._pool_count(True, True) is not None, "no cubic fitted: every count was traced"


def test_family_keeps_method_constraints():
    assert family_schedule(0.3, 196, (14, 14), 3, "tome") == (98, 49, 25)  # never more than half a layer
    for k in family_schedule(0.7, 196, (14, 14), 3, "grid"):
        assert any(k == a * b for a in range(1, 15) for b in range(1, 15))
    assert family_schedule(1.0, 196, (14, 14), 3, "wkmedoids") == (196, 196, 196)


def test_late_family_shape_bends_the_schedule():
    """Shape 1 (the default at 0.5) keeps the same fraction r in every layer; below 1 each layer removes a smaller
    fraction than the one before, so at the same MACs the last blocks keep more tokens."""
    assert family_schedule(0.7, 196, (14, 14), 8, "kmedoids", LATE) == tuple(round(196 * 0.7 ** (i + 1)) for i in range(8))
    front = family_schedule(0.75, 196, (14, 14), 8, "kmedoids", LATE, 0.8)
    kept = [k / before for before, k in zip((196,) + front, front)]
    assert all(b > a - 0.02 for a, b in zip(kept, kept[1:])) and kept[-1] - kept[0] > 0.1, kept  # 0.02: rounding
    model = _model("deit_tiny")
    macs = MacModel(model, make_config(layers=()))
    even = solve(model, make_config(layers=()), budget=0.5, macs=macs, floor=0.0)  # the shape alone
    bent = solve(model, make_config(layers=()), budget=0.5, macs=macs, shape=0.8, floor=0.0)
    assert abs(even[1] / even[2] - 0.5) <= 0.005 and abs(bent[1] / bent[2] - 0.5) <= 0.005
    assert bent[0].k[-1] > even[0].k[-1] and bent[0].k[0] < even[0].k[0]  # same MACs, more tokens late


def test_late_family_shape_follows_the_budget():
    """The late family keeps the same fraction in every layer up to 0.55 and removes more in later layers from
    0.6 on, linearly between; --target-gmacs takes the shape of the budget it amounts to; the paper's spread
    family keeps p = 1."""
    shapes = [default_shape(LATE, f) for f in (0.3, 0.5, 0.55, 0.575, 0.6, 0.75, 1.0)]
    assert shapes == pytest.approx([1, 1, 1, 1.125, 1.25, 1.25, 1.25])
    assert default_shape(SPREAD, 0.75) == 1
    model = _model("deit_tiny")
    macs = MacModel(model, make_config(layers=()))
    solved = solve(model, make_config(layers=()), budget=0.75, macs=macs)
    assert solved[0] == solve(model, make_config(layers=()), budget=0.75, macs=macs, shape=1.25)[0]
    assert solved[0] != solve(model, make_config(layers=()), budget=0.75, macs=macs, shape=1.0)[0]
    by_gmacs = solve(model, make_config(layers=()), target_gmacs=0.75 * macs.baseline / 1e9, macs=macs)
    assert by_gmacs[0] == solved[0]


def test_late_family_keeps_a_floor_and_leaves_out_layers_that_keep_every_token():
    """No layer keeps fewer than LATE_FLOOR N tokens (or K_0, where fewer); where the floor leaves a layer with
    every token it receives, the layer is not made, and the MACs it would have spent go to the tokens."""
    floor = round(196 * LATE_FLOOR)
    assert family_schedule(0.7, 196, (14, 14), 8, "kmedoids", LATE, 1.0, LATE_FLOOR) == tuple(
        max(round(196 * 0.7 ** (i + 1)), floor) for i in range(8))
    assert family_schedule(0.1, 196, (14, 14), 3, "kmedoids", LATE, 1.0, LATE_FLOOR) == (20, 20, 20)  # K_0 < floor
    for r in (0.151, 0.16, 0.2, 0.3, 0.5):  # grid counts round to a count above the floor, not below it
        k = family_schedule(r, 196, (14, 14), 8, "grid", LATE, 1.0, LATE_FLOOR)
        assert min(k) >= min(floor, k[0]) and all(any(n == a * b for a in range(1, 15) for b in range(1, 15)) for n in k)
    assert family_schedule(0.151, 196, (14, 14), 3, "grid", LATE, 1.0, LATE_FLOOR) == (30, 30, 30)  # 5x6 makes no 28
    # A layer before the last that would keep a few tokens above the floor keeps the floor: no next layer is left
    # to remove those alone.
    r = (30 / 196) ** (1 / 6)  # the sixth layer would keep 30, two above the floor of 28
    assert family_schedule(r, 196, (14, 14), 8, "kmedoids", LATE, 1.0, LATE_FLOOR) == (
        *(round(196 * r ** (i + 1)) for i in range(5)), floor, floor, floor)
    for r in (i / 100 for i in range(30, 90)):
        k = family_schedule(r, 196, (14, 14), 8, "kmedoids", LATE, 1.0, LATE_FLOOR)
        assert not any(b == floor and 0 < a - b < FLOOR_SNAP * 196 for a, b in zip(k, k[1:])), (r, k)
    r = (30 / 196) ** (1 / 8)  # the last layer keeps its 30: no layer after it would take the two alone
    assert family_schedule(r, 196, (14, 14), 8, "kmedoids", LATE, 1.0, LATE_FLOOR)[-1] == 30
    assert without_keep_all(make_config(k=(150, 150, 90, 90), layers=(3, 4, 5, 6)), 196) == make_config(k=(150, 90), layers=(3, 5))
    assert without_keep_all(make_config(k=(196, 196), layers=(3, 4)), 196) == make_config(k=(), layers=())
    model = _model("deit_tiny")
    macs = MacModel(model, make_config(layers=()))
    floored, reached, baseline = solve(model, make_config(layers=()), budget=0.5, macs=macs)
    plain = solve(model, make_config(layers=()), budget=0.5, macs=macs, floor=0.0)[0]
    assert abs(reached / baseline - 0.5) <= 0.005 and reached == total_macs(apply_pooling(model, floored))
    assert min(plain.k) < floor <= min(floored.k) and floored.k[-2] - floored.k[-1] >= FLOOR_SNAP * 196
    assert floored.layers == plain.layers[: len(floored.k)] and len(floored.k) < len(plain.k) == 8
    assert solve(model, make_config(layers=()), budget=0.75, macs=macs)[0] == solve(
        model, make_config(layers=()), budget=0.75, macs=macs, floor=0.0)[0], "not binding at 0.75"
    spread = solve(model, PRESETS["paper"].template, budget=0.5, family=SPREAD)[0]
    assert spread == solve(model, PRESETS["paper"].template, budget=0.5, family=SPREAD, floor=0.0)[0]


def test_python_api_and_unreachable_budgets():
    model = _model("deit_tiny")
    converted = vitpool.convert(model, budget=0.7)
    assert abs(total_macs(converted) / total_macs(model) - 0.7) <= 0.007
    with pytest.raises(VitpoolError, match="lands within 1%"):
        solve(model, PoolingConfig(), budget=0.1)
    with pytest.raises(VitpoolError, match=r"in \(0, 1\]"):
        solve(model, PoolingConfig(), budget=1.5)


def test_every_block_family_is_tomes_schedule():
    model = _model("deit_tiny")
    config, reached, baseline = solve(model, PRESETS["tome"].template, budget=0.6, family="every-block")
    assert config.layers == tuple(range(12)) and abs(reached / baseline - 0.6) <= 0.006
    removed = [a - b for a, b in zip((196,) + config.k, config.k)]
    assert max(removed) - min(removed) <= 1, f"ToMe removes the same number of tokens after every block: {removed}"
    with pytest.raises(VitpoolError, match="family"):
        solve(model, PRESETS["tome"].template, budget=0.6, family="spiral")


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_trimmed_last_block_is_exact_and_counted(name):
    """A class-token head reads the prefix tokens only, so the last block's MLP runs on them alone: the same
    logits, fewer MACs, and the parts model and the budget solver count what runs."""
    import torch

    model = _model(name)
    config = make_config(k=(150, 100, 60), layers=(1, 4, 9))
    assert config.trim_last  # the default
    trimmed, full = apply_pooling(model, config), apply_pooling(model, replace(config, trim_last=False))
    assert trimmed.blocks.head_tokens == model.num_prefix_tokens and full.blocks.head_tokens == 0
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(trimmed(images), full(images), rtol=1e-5, atol=1e-5)
        assert trimmed.forward_features(images).shape[1] == model.num_prefix_tokens + 60  # every token for features
    report = count_macs(trimmed)
    assert report.blocks[-1].tokens_out == model.num_prefix_tokens
    assert report.macs < count_macs(full).macs
    assert MacModel(model, replace(config, k=(), layers=())).total(config) == report.macs
    solved, reached, baseline = solve(model, make_config(layers=()), budget=0.6)
    assert 11 not in solved.layers  # a pooling layer in the trimmed block would pool tokens nothing reads
    assert total_macs(apply_pooling(model, solved)) == reached and abs(reached / baseline - 0.6) <= 0.006


def test_trim_applies_only_where_it_is_exact():
    model = _model("deit_tiny")
    in_last_block = make_config(k=(150, 100), layers=(5, 11))  # the last block's MLP runs on its K tokens
    assert apply_pooling(model, in_last_block).blocks.head_tokens == 0
    averaging = create_model("vit_tiny_patch16_224", pretrained=False, global_pool="avg")  # reads every token
    assert apply_pooling(averaging, make_config(k=(150,), layers=(5,))).blocks.head_tokens == 0
    assert family_layers(12, LATE, AFTER_ATTENTION, trimmed=True)[-1] < 11
    old = PoolingConfig.from_dict({"method": "kmedoids", "k": [150], "layers": [5], "position": "after-attention"})
    assert not old.trim_last and old.spread == 0  # saved before these existed: loads as it was built


def test_a_budget_is_solved_in_the_blocks_given():
    model = _model("deit_tiny")
    converted = vitpool.convert(model, budget=0.6, layers=(4, 8))
    config = converted.vitpool_config
    assert config.layers == (4, 8) and len(config.k) == 2
    assert abs(total_macs(converted) / total_macs(model) - 0.6) <= 0.006
    with pytest.raises(VitpoolError, match="not both"):
        vitpool.convert(model, budget=0.6, k=(100, 50))


def test_the_command_line_solves_a_budget_in_the_blocks_of_layers():
    import json

    result = run_in_process(["flops", "deit_tiny", "--no-pretrained", "--budget", "0.6", "--layers", "4,8", "--json"])
    assert result.rc == 0, str(result)
    document = json.loads(result.stdout)
    assert document["pooling"]["layers"] == [4, 8]
    assert abs(document["gmacs"] / document["baseline_gmacs"] - 0.6) <= 0.006
    assert_user_error(run_in_process(["flops", "deit_tiny", "--no-pretrained", "--budget", "0.6", "--k", "100"]), ["not both"])
