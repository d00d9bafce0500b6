"""`vitpool.sweep`: every (method, budget) point, resumable, with a CSV and a plot that are what they claim."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import noise_folder
from PIL import Image

import vitpool.sweep as sweep_module
from vitpool.errors import VitpoolError
from vitpool.evaluate import evaluate
from vitpool.flops import total_macs
from vitpool.evaluate import load_images, score
from vitpool.sweep import parse_budgets, parse_methods, sweep


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Six noise photos in two class folders (not WordNet ids: sorted class mapping)."""
    return noise_folder(tmp_path_factory.mktemp("images"), ("cat", "dog"), 3, (240, 260), seed=1)


def settings_for(folder, **changes):
    return {"model": "deit_tiny_patch16_224", "checkpoint": None, "pretrained": False, "data": str(folder),
            "limit": None, "preset": "vitpool", "iters": 2, "output": "medoid", "proportional": True,
            "position": "after-attention", "trim_last": True, "calibration": None, **changes}


def run(tiny_model, folder, out, methods, budgets, **kwargs):
    settings = settings_for(folder, **kwargs.pop("settings", {}))
    return sweep(tiny_model, settings, out, methods, budgets, workers=0, **kwargs)


def test_sweep_writes_every_point_and_resumes_without_recomputing(tiny_model, folder, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    first = run(tiny_model, folder, out, ["importance", "tome"], [0.6, 0.9])
    assert [(r["method"], r["budget"], r["schedule"]) for r in first.rows] == [
        ("importance", 0.6, "family"), ("importance", 0.9, "family"), ("tome", 0.6, "family"), ("tome", 0.9, "family"),
        ("tome", 0.6, "every-block"), ("tome", 0.9, "every-block")]
    assert first.rows[4]["layers"] == list(range(12)) and first.rows[2]["layers"] == list(range(3, 11))
    baseline = total_macs(tiny_model)
    for row in first.rows:
        assert abs(row["mac_ratio"] - row["budget"]) <= 0.01 * row["budget"], row
        assert row["gmacs"] == pytest.approx(row["mac_ratio"] * baseline / 1e9)
        assert row["n"] == 6 and 0 <= row["agreement"] <= 100 and row["kl"] >= 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["points"] == first.rows and saved["reference"]["n"] == 6

    with (out / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["method"] for r in table] == ["unpooled", "importance", "importance", "tome", "tome", "tome", "tome"]
    assert float(table[1]["top1"]) == pytest.approx(first.rows[0]["top1"])

    calls = []
    real_run_point = sweep_module.run_point
    monkeypatch.setattr(sweep_module, "run_point", lambda *a, **k: calls.append(a[1:3]) or real_run_point(*a, **k))
    second = run(tiny_model, folder, out, ["importance", "tome", "random"], [0.6, 0.9])
    assert calls == [("random", 0.6), ("random", 0.9)], "finished points were computed again"
    assert second.rows[:6] == first.rows
    with Image.open(out / "tradeoff.png") as image:
        assert image.format == "PNG" and image.size == (1200, 500)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 20, "the plot is blank"


def test_sweep_refuses_an_out_dir_with_other_settings(tiny_model, folder, tmp_path):
    out = tmp_path / "sweep"
    run(tiny_model, folder, out, ["grid"], [0.9])
    before = (out / "results.json").read_bytes()
    with pytest.raises(VitpoolError, match="other settings.*iters"):
        run(tiny_model, folder, out, ["grid"], [0.9], settings={"iters": 3})
    assert (out / "results.json").read_bytes() == before
    again = run(tiny_model, folder, out, ["grid"], [0.9], settings={"iters": 3}, force=True)
    assert len(again.rows) == 1 and json.loads((out / "results.json").read_text())["settings"]["iters"] == 3


def test_unreachable_budget_is_recorded_not_fatal(tiny_model, folder, tmp_path):
    result = run(tiny_model, folder, tmp_path / "sweep", ["tome"], [0.1])
    assert "error" in result.rows[0] and "1%" in result.rows[0]["error"]
    assert (tmp_path / "sweep" / "tradeoff.png").is_file()


def test_cached_scoring_matches_streaming_evaluation(tiny_model, folder):
    import vitpool

    pooled = vitpool.convert(tiny_model, method="wkmedoids", k=[100, 50], layers=[3, 7], iters=2)
    images = load_images(tiny_model, folder, None, workers=0)
    cached = score(pooled, images)
    streamed = evaluate(pooled, folder, baseline=tiny_model, workers=0)
    assert (cached.top1, cached.top5, cached.agreement) == (streamed.top1, streamed.top5, streamed.agreement)
    assert cached.kl == pytest.approx(streamed.kl, rel=1e-5)


def test_parsing_methods_and_budgets():
    assert parse_methods(None)[0] == "wkmedoids" and "tome" in parse_methods(None)
    assert parse_methods("tome, grid") == ["tome", "grid"]
    with pytest.raises(VitpoolError, match="--methods"):
        parse_methods("tome,kmedians")
    assert parse_budgets("0.5,0.9") == [0.5, 0.9]
    for bad in ("0", "1.5", "half", ""):
        with pytest.raises(VitpoolError, match="--budgets"):
            parse_budgets(bad)


def test_searched_points_are_scored_on_images_the_search_never_saw(tiny_model, folder, tmp_path):
    result = run(tiny_model, folder, tmp_path / "sweep", ["wkmedoids"], [0.7], settings={"calibration": 2}, calibration=2)
    family, searched = result.rows
    assert (family["schedule"], searched["schedule"]) == ("family", "searched")
    assert family["n"] == searched["n"] == 4 and result.reference["n"] == 4
    assert searched["search"]["family_k"] == family["k"]
    assert searched["search"]["calibration_kl"] <= searched["search"]["family_calibration_kl"]
    assert abs(searched["mac_ratio"] - 0.7) <= 0.007


def test_output_mean_applies_to_the_k_medoids_methods_and_leaves_the_others_alone(tiny_model, folder, tmp_path):
    means = run(tiny_model, folder, tmp_path / "mean", ["importance", "wkmedoids"], [0.6], settings={"output": "mean"})
    medoids = run(tiny_model, folder, tmp_path / "medoid", ["importance", "wkmedoids"], [0.6])
    assert all("error" not in row for row in means.rows), means.rows
    assert means.rows[0]["kl"] == medoids.rows[0]["kl"]  # importance: the same model either way
    assert means.rows[1]["kl"] != medoids.rows[1]["kl"]  # wkmedoids: cluster means, not medoids


def test_a_sweep_does_not_resume_into_changed_images(tiny_model, folder, tmp_path):
    """Reruns match on the images read, not only on the path: a class folder added since is refused."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(folder, data)
    out = tmp_path / "sweep"
    run(tiny_model, data, out, ["grid"], [0.9])
    before = (out / "results.json").read_bytes()
    noise_folder(data, ("eel",), 2, (240, 260), seed=7)
    with pytest.raises(VitpoolError, match="are not the ones .* was swept on .* --force"):
        run(tiny_model, data, out, ["grid", "random"], [0.9])
    assert (out / "results.json").read_bytes() == before
    again = run(tiny_model, data, out, ["grid", "random"], [0.9], force=True)
    assert again.reference["n"] == 8 and len(again.rows) == 2
