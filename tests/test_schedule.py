"""`vitpool schedule`: a greedy search over per-layer K that stays within the budget and only improves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import noise_folder

from vitpool.adapter import apply_pooling
from vitpool.config import PoolingConfig
from vitpool.flops import total_macs
from vitpool.schedule import search
from vitpool.sweep import load_images, split

VITPOOL = Path(sys.executable).with_name("vitpool")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return noise_folder(tmp_path_factory.mktemp("calibration"), ("a", "b"), 4, (230, 230), seed=2)


def test_search_stays_in_budget_improves_and_is_deterministic(tiny_model, folder):
    images = load_images(tiny_model, folder, None, workers=0)
    first = search(tiny_model, images, PoolingConfig("wkmedoids", iters=1), budget=0.6)
    baseline = total_macs(tiny_model)
    assert abs(total_macs(apply_pooling(tiny_model, first.config)) / baseline - 0.6) <= 0.006
    assert first.macs == total_macs(apply_pooling(tiny_model, first.config))
    assert [tuple(h["layers"]) for h in first.history[:3]] == [(5,), (3, 7), (2, 5, 8)], "1, 2 and 3 pooling layers"
    assert first.start.layers == (2, 5, 8) and list(first.start.k) == first.history[2]["k"]  # the --budget schedule
    moves = [step["kl"] for step in first.history[3:]]
    assert moves == sorted(moves, reverse=True) and all(kl < min(h["kl"] for h in first.history[:3]) for kl in moves)
    assert first.best.kl <= min(h["kl"] for h in first.history[:3]) and first.best.kl <= first.start.kl
    assert list(first.config.k) == first.history[-1]["k"] or not moves
    assert first.config.layers == first.best.layers and first.config.layers in {(5,), (3, 7), (2, 5, 8)}
    assert all(a >= b for a, b in zip(first.config.k, first.config.k[1:])), "K must not grow"
    assert list(first.config.k) == [h for h in first.history if tuple(h["layers"]) == first.config.layers][-1]["k"]
    again = search(tiny_model, images, PoolingConfig("wkmedoids", iters=1), budget=0.6)
    assert again.config == first.config and again.best == first.best


def test_search_keeps_tome_constraints_and_custom_layers(tiny_model, folder):
    images = load_images(tiny_model, folder, None, workers=0)
    found = search(tiny_model, images, PoolingConfig("tome", iters=1), budget=0.7, layers=(3, 7))
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
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert json.loads(out.read_text()) == document
    assert document["calibration_images"] == 4 and abs(document["mac_ratio"] - 0.75) <= 0.0075
    flops = subprocess.run([str(VITPOOL), "flops", "deit_tiny", *document["flags"].split(), "--iters", "1", "--json"],
                           capture_output=True, text=True, timeout=300)
    assert flops.returncode == 0, flops.stderr
    assert json.loads(flops.stdout)["gmacs"] == pytest.approx(document["gmacs"])
    again = subprocess.run([str(VITPOOL), "schedule", "deit_tiny", "--no-pretrained", "--data", str(folder), "--budget", "0.75",
                            "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr and json.loads(out.read_text()) == document
