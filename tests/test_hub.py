"""A converted model as a timm artifact: timm's config.json beside vitpool.json, `hf-hub:` and `local-dir:` names,
and `vitpool push`, all offline. The Hub is stood in for by a local huggingface_hub cache (the layout
`hf_hub_download` reads in offline mode), which `push` fills through a stand-in for HfApi."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitpool
from vitpool import models
from vitpool.errors import VitpoolError
from vitpool.hub import push

VITPOOL = Path(sys.executable).parent / "vitpool"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class CacheHub:
    """Stands in for HfApi: a commit lands in a huggingface_hub cache, where `hf-hub:` names find it offline."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.created: list[tuple[str, bool]] = []

    def snapshot(self, repo_id: str) -> Path:
        return self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.created.append((repo_id, private))

    def create_commit(self, repo_id, operations, commit_message):
        snapshot = self.snapshot(repo_id)
        snapshot.mkdir(parents=True, exist_ok=True)
        for operation in operations:
            content = operation.path_or_fileobj
            data = Path(content).read_bytes() if isinstance(content, str) else content
            (snapshot / operation.path_in_repo).write_bytes(data)
        (snapshot.parents[1] / "refs").mkdir(exist_ok=True)
        (snapshot.parents[1] / "refs" / "main").write_text(COMMIT)
        return f"https://hub.invalid/{repo_id}/commit/{COMMIT}"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return CacheHub(cache)


def outputs(model, size: int = 224) -> torch.Tensor:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return model.eval()(x)


@pytest.fixture(scope="module")
def tagged():
    """A random DeiT-III whose pretrained tag's preprocessing (crop 1.0) is not the architecture's default tag's."""
    timm = models.import_timm()
    torch.manual_seed(0)
    base = timm.create_model("deit3_small_patch16_224.fb_in22k_ft_in1k", pretrained=False).eval()
    assert base.pretrained_cfg["crop_pct"] != timm.create_model("deit3_small_patch16_224").pretrained_cfg["crop_pct"]
    return base, vitpool.convert(base, k=[120, 64], layers=[3, 7])


def test_saved_directory_is_a_timm_artifact(tmp_path, tagged):
    base, pooled = tagged
    target = vitpool.save(pooled, tmp_path / "pooled")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "vitpool.json"]
    config = json.loads((target / "config.json").read_text())
    assert config["architecture"] == "deit3_small_patch16_224"
    assert config["pretrained_cfg"]["tag"] == "fb_in22k_ft_in1k" and config["pretrained_cfg"]["crop_pct"] == 1.0
    # timm alone reads the base model (no pooling) with its weights and preprocessing
    timm = models.import_timm()
    plain = timm.create_model(f"local-dir:{target}", pretrained=True)
    torch.testing.assert_close(outputs(plain), outputs(base), rtol=0, atol=0)
    assert timm.data.resolve_data_config({}, model=plain)["crop_pct"] == 1.0
    # vitpool rebuilds the pooling, and the tag's preprocessing travels
    loaded = vitpool.load(target)
    assert loaded.pretrained_cfg["tag"] == "fb_in22k_ft_in1k" and loaded.pretrained_cfg["crop_pct"] == 1.0
    torch.testing.assert_close(outputs(loaded), outputs(pooled), rtol=0, atol=0)
    torch.testing.assert_close(outputs(vitpool.load(f"local-dir:{target}")), outputs(pooled), rtol=0, atol=0)


def test_directory_saved_without_timm_config_still_loads(tmp_path, tiny_model):
    pooled = vitpool.convert(tiny_model, k=[100], layers=[4])
    target = vitpool.save(pooled, tmp_path / "old")
    (target / "config.json").unlink()  # as vitpool wrote it before config.json
    torch.testing.assert_close(outputs(vitpool.load(target)), outputs(pooled), rtol=0, atol=0)


def test_push_then_load_by_hub_name(tmp_path, offline_cache, tagged, imagenet_sample):
    base, pooled = tagged
    target = vitpool.save(pooled, tmp_path / "pooled")
    url = push(target, "someone/deit3-pooled", data=str(imagenet_sample), limit=4, private=True, api=offline_cache)
    assert url.endswith(COMMIT) and offline_cache.created == [("someone/deit3-pooled", True)]
    snapshot = offline_cache.snapshot("someone/deit3-pooled")
    assert sorted(p.name for p in snapshot.iterdir()) == ["README.md", "config.json", "model.safetensors", "vitpool.json"]
    card = (snapshot / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: timm" in card and "vitpool" in card
    assert pooled.vitpool_config.flags() in card
    from vitpool.flops import count_macs

    macs = count_macs(pooled, baseline=base)
    assert f"{macs.macs / 1e9:.3f}" in card and f"{macs.baseline_macs / 1e9:.3f}" in card and f"{macs.ratio:.3f}" in card
    assert "Measured on 4 images" in card and "Not measured" not in card
    torch.testing.assert_close(outputs(vitpool.load("hf-hub:someone/deit3-pooled")), outputs(pooled), rtol=0, atol=0)
    loaded = models.load_model_or_dir("hf-hub:someone/deit3-pooled")
    assert loaded.config == pooled.vitpool_config and loaded.model.pretrained_cfg["crop_pct"] == 1.0


def test_card_without_data_says_accuracy_was_not_measured(tmp_path, offline_cache, tiny_model):
    target = vitpool.save(vitpool.convert(tiny_model, k=[100], layers=[4]), tmp_path / "pooled")
    push(target, "someone/tiny", api=offline_cache)
    assert "Not measured" in (offline_cache.snapshot("someone/tiny") / "README.md").read_text()


def test_plain_timm_model_from_the_hub_cache(tmp_path, offline_cache, tiny_model):
    timm = models.import_timm()
    timm.models.save_for_hf(tiny_model, offline_cache.snapshot("timm/tiny-plain"), safe_serialization=True)
    (offline_cache.snapshot("timm/tiny-plain").parents[1] / "refs").mkdir()
    (offline_cache.snapshot("timm/tiny-plain").parents[1] / "refs" / "main").write_text(COMMIT)
    loaded = models.load_model_or_dir("hf-hub:timm/tiny-plain")
    assert loaded.config is None and loaded.name == "deit_tiny_patch16_224"
    torch.testing.assert_close(outputs(loaded.model), outputs(tiny_model), rtol=0, atol=0)


def test_unknown_hub_model_offline_is_one_clear_error(offline_cache):
    with pytest.raises(VitpoolError, match="hf-hub:nobody/nothing"):
        models.load_model_or_dir("hf-hub:nobody/nothing")


def test_local_dir_without_a_model_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitpoolError, match="not a folder holding a saved model"):
        models.load_model_or_dir(f"local-dir:{tmp_path / 'empty'}")
    with pytest.raises(VitpoolError, match="not a saved model"):
        models.load_model_or_dir(str(tmp_path / "empty"))


def test_push_refuses_what_is_not_a_saved_model(tmp_path, offline_cache):
    with pytest.raises(VitpoolError, match="not a model saved by vitpool"):
        push(tmp_path, "someone/x", api=offline_cache)


def test_push_without_network_is_one_line(tmp_path, tiny_model):
    target = vitpool.save(vitpool.convert(tiny_model, k=[100], layers=[4]), tmp_path / "pooled")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf-home"), NO_COLOR="1")
    done = subprocess.run([str(VITPOOL), "push", str(target), "someone/tiny"], capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot be reached" in lines[0] and "Traceback" not in done.stderr


# --- saving: what --force may replace, racing writers, permissions, damaged files ---------------------------


def test_force_replaces_only_a_saved_model(tmp_path, tiny_model):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    with pytest.raises(VitpoolError, match="not a saved model"):
        vitpool.save(tiny_model, user, force=True)
    assert [p.name for p in user.iterdir()] == ["notes.txt"]


def test_a_writer_that_loses_the_race_is_told(tmp_path, tiny_model, monkeypatch):
    target = tmp_path / "out"
    write_into = models.write_into

    def meanwhile(model, staging, calibration=None):  # another process renames its model into place first
        write_into(model, staging, calibration)
        target.mkdir()
        (target / "vitpool.json").write_text("theirs")

    monkeypatch.setattr(models, "write_into", meanwhile)
    with pytest.raises(VitpoolError, match="meanwhile"):
        vitpool.save(tiny_model, target)
    assert (target / "vitpool.json").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_outputs_get_the_permissions_of_a_normal_write(tmp_path, tiny_model):
    previous = os.umask(0o022)
    try:
        target = vitpool.save(tiny_model, tmp_path / "out")
    finally:
        os.umask(previous)
    assert target.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in target.iterdir()} == dict.fromkeys(
        ["config.json", "model.safetensors", "vitpool.json"], 0o644)


@pytest.mark.parametrize("damage, field", [
    (lambda d: d.pop("pooling"), "'pooling'"),
    (lambda d: d.pop("base_model"), "'base_model'"),
    (lambda d: d["pooling"].update(k="120"), "'pooling.k'"),
    (lambda d: d["pooling"].update(k=None), "'pooling.k'"),
    (lambda d: d["pooling"].update(iters="2"), "'pooling.iters'"),
])
def test_damaged_vitpool_json_names_the_field(tmp_path, tiny_model, damage, field):
    target = vitpool.save(vitpool.convert(tiny_model, k=[100], layers=[4]), tmp_path / "out")
    description = json.loads((target / "vitpool.json").read_text())
    damage(description)
    (target / "vitpool.json").write_text(json.dumps(description))
    with pytest.raises(VitpoolError, match=f"damaged: {field}"):
        vitpool.load(target)


def test_vitpool_json_that_is_not_an_object(tmp_path, tiny_model):
    target = vitpool.save(tiny_model, tmp_path / "out")
    (target / "vitpool.json").write_text("[1, 2]")
    with pytest.raises(VitpoolError, match="not a vitpool model directory"):
        vitpool.load(target)
