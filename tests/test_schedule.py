"""`vitpool schedule`: a greedy search over per-layer K that stays within the budget and only improves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, noise_folder, run_in_process

import vitpool
from vitpool.adapter import apply_pooling
from vitpool.budget import LATE_FLOOR
from vitpool.config import make_config
from vitpool.flops import total_macs
from vitpool.schedule import search
from vitpool.evaluate import load_images
from vitpool.sweep import split

VITPOOL = Path(sys.executable).with_name("vitpool")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return noise_folder(tmp_path_factory.mktemp("calibration"), ("a", "b"), 4, (230, 230), seed=2)


def test_search_stays_in_budget_and_improves(tiny_model, folder):
    images = load_images(tiny_model, folder, 4, workers=0)  # what is asserted holds on any images; each costs ~100 passes
    first = search(tiny_model, images, make_config("wkmedoids", layers=(), iters=1), budget=0.6)
    baseline = total_macs(tiny_model)
    assert abs(total_macs(apply_pooling(tiny_model, first.config)) / baseline - 0.6) <= 0.006
    assert first.macs == total_macs(apply_pooling(tiny_model, first.config))
    placements = [tuple(range(3, 11))] * 3 + [(6,), (4, 8), (3, 6, 9)]
    assert [tuple(h["layers"]) for h in first.history[:6]] == placements, "the family's layers, then 1, 2 and 3 spread"
    assert [h["shape"] for h in first.history[:3]] == [1.25, 0.8, 1.0], "the budget's shape first"
    back, front, even = (first.history[i]["k"] for i in range(3))
    assert back[-1] < even[-1] < front[-1] and back[0] > even[0] > front[0], "shape < 1 keeps more tokens late"
    assert first.start.layers == placements[0] and list(first.start.k) == back  # the --budget schedule
    starts = min(h["kl"] for h in first.history[:6])
    moves = [step["kl"] for step in first.history[6:]]
    assert moves == sorted(moves, reverse=True) and all(kl < starts for kl in moves)
    assert first.best.kl <= starts and first.best.kl <= first.start.kl
    assert list(first.config.k) == first.history[-1]["k"] or not moves
    assert first.config.layers == first.best.layers and first.config.layers in set(placements)
    assert first.config.k[0] < 196 and all(a > b for a, b in zip(first.config.k, first.config.k[1:])), "no keep-all layer"
    assert list(first.config.k) == [h for h in first.history if tuple(h["layers"]) == first.config.layers][-1]["k"]
    # determinism: test_convert_calibrate_... runs one search twice, in the command line and here, and compares


def test_search_also_starts_without_the_floor_where_it_binds(tiny_model, folder):
    """At 0.5 the late family's floor leaves out its last layers; the search also scores the schedule without it,
    all eight layers, since which of the two keeps a model closer depends on the model."""
    images = load_images(tiny_model, folder, 2, workers=0)
    found = search(tiny_model, images, make_config(layers=()), budget=0.5, layers=tuple(range(3, 11)))
    starts = [h for h in found.history if "floor" in h]
    assert [(h["shape"], h["floor"]) for h in starts] == [(1.0, LATE_FLOOR), (0.8, LATE_FLOOR), (1.25, LATE_FLOOR), (1.0, 0.0)]
    floored, plain = starts[0], starts[-1]
    assert len(floored["layers"]) < len(plain["layers"]) == 8 and min(plain["k"]) < round(196 * LATE_FLOOR) <= min(floored["k"])
    assert found.best.kl <= min(h["kl"] for h in starts)


def test_search_keeps_tome_constraints_and_custom_layers(tiny_model, folder):
    images = load_images(tiny_model, folder, 4, workers=0)
    found = search(tiny_model, images, make_config("tome", layers=()), budget=0.7, layers=(3, 7))
    assert found.config.layers == (3, 7)
    tokens = 196
    for k in found.config.k:
        assert tokens - tokens // 2 <= k <= tokens
        tokens = k


def test_split_is_disjoint_and_spread(tiny_model, folder):
    images = load_images(tiny_model, folder, None, workers=0)
    calibration, rest = split(images, 3)
    assert len(calibration.labels) == 3 and len(rest.labels) == 5
    pairs = {tuple(t.flatten()[:8].tolist()) for t in calibration.images}
    assert not pairs & {tuple(t.flatten()[:8].tolist()) for t in rest.images}


def test_schedule_command_saves_flags_that_other_commands_accept(folder, tmp_path):
    out = tmp_path / "not" / "yet" / "schedule.json"  # folders are created, as for every output
    done = subprocess.run([str(VITPOOL), "schedule", "deit_tiny", "--no-pretrained", "--data", str(folder), "--budget", "0.75",
                           "--iters", "1", "--limit", "4", "--workers", "0", "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert json.loads(out.read_text()) == document
    assert document["calibration_images"] == 4 and abs(document["mac_ratio"] - 0.75) <= 0.0075
    flops = subprocess.run([str(VITPOOL), "flops", "deit_tiny", *document["flags"].split(), "--iters", "1", "--json"],
                           capture_output=True, text=True, timeout=900)
    assert flops.returncode == 0, flops.stderr
    assert json.loads(flops.stdout)["gmacs"] == pytest.approx(document["gmacs"])
    assert_user_error(run_in_process(["schedule", "deit_tiny", "--no-pretrained", "--data", folder, "--budget", "0.75", "--out", out]),
                      ["already exists"])
    assert json.loads(out.read_text()) == document


def test_convert_calibrate_saves_the_searched_schedule_and_what_it_was_scored_on(tiny_model, folder, tmp_path):
    weights = tmp_path / "tiny.pth"  # the fixture's own weights: --no-pretrained would draw other random ones
    torch.save(tiny_model.state_dict(), weights)
    out = tmp_path / "calibrated"
    done = subprocess.run([str(VITPOOL), "convert", "deit_tiny", "--checkpoint", str(weights), "--budget", "0.7", "--iters", "1",
                           "--calibrate", str(folder), "--calibrate-limit", "3", "--workers", "0", "--out", str(out), "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    saved = json.loads((out / "vitpool.json").read_text())
    record = saved["calibration"]
    assert record["images"] == 3 and record["data"] == str(folder.resolve()) and record["budget"] == 0.7
    assert record["kl"] <= record["family"]["kl"]
    # the same search, run here on the same three images, finds the schedule that was saved
    images = load_images(tiny_model, folder, 3, workers=0, labelled=False)
    found = search(tiny_model, images, make_config(layers=(), iters=1), budget=0.7)
    assert saved["pooling"]["k"] == list(found.config.k) and saved["pooling"]["layers"] == list(found.config.layers)
    assert record["kl"] == pytest.approx(found.best.kl)
    assert abs(total_macs(vitpool.load(out)) / total_macs(tiny_model) - 0.7) <= 0.007
    assert_user_error(run_in_process(["convert", "deit_tiny", "--no-pretrained", "--k", "100", "--calibrate", folder,
                                      "--out", tmp_path / "no"]), ["--calibrate"])
    assert not (tmp_path / "no").exists()
