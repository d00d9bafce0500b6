"""Library-level tests of vitpool.models: reading checkpoints safely, building models, saving and loading.

Everything runs offline on small random-weight models; the real DeiT-Tiny checkpoint and ImageNet photos in
../shared/data are read in place where present and the tests that need them skip where they are absent.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import pickle_that_runs_code
import torch

import vitpool
from vitpool import models
from vitpool.adapter import pooled_layers
from vitpool.errors import VitpoolError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_WEIGHTS = DATA / "weights" / "deit_tiny_patch16_224.pth"
IMAGES = DATA / "imagenet-sample"
TINY = "deit_tiny_patch16_224"
SMALL = "deit_small_patch16_224"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data {path} is absent (see ../shared/data/README.md); this test reads it in place")
    return path


def hidden_entries(folder: Path) -> list[str]:
    """Names starting with '.' in `folder`: the staging/retired directories `save` must never leave behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def assert_same_state(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


@pytest.fixture(scope="module")
def timm():
    return models.import_timm()


@pytest.fixture(scope="module")
def tiny_state(timm) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(TINY, pretrained=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory, tiny_state) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(tiny_state, path)
    return path


# --- read_state_dict -------------------------------------------------------------------------------


def test_reads_safetensors(tmp_path, tiny_state):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file(tiny_state, str(path))
    assert_same_state(models.read_state_dict(path), tiny_state)


def test_reads_plain_pth(tiny_pth, tiny_state):
    assert_same_state(models.read_state_dict(tiny_pth), tiny_state)


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_reads_state_dict_nested_in_training_checkpoint(tmp_path, tiny_state, wrapper):
    path = tmp_path / "train.pth"
    torch.save({wrapper: tiny_state, "epoch": 299, "arch": "deit_tiny", "lr": 1e-5}, path)
    assert_same_state(models.read_state_dict(path), tiny_state)


def test_strips_module_prefix(tmp_path, tiny_state):
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny_state.items()}}, path)
    state = models.read_state_dict(path)
    assert not any(k.startswith("module.") for k in state)
    assert_same_state(state, tiny_state)


UNPICKLED: list[str] = []


class CarriesState:
    """A custom class: unpickling it would import this module and run __setstate__."""

    def __init__(self, note: str) -> None:
        self.note = note

    def __setstate__(self, state) -> None:
        UNPICKLED.append("ran")
        self.__dict__.update(state)


def test_refuses_pickle_with_custom_class(tmp_path, tiny_state):
    path = tmp_path / "custom.pth"
    torch.save({"model": tiny_state, "extra": CarriesState("hello")}, path)
    UNPICKLED.clear()
    with pytest.raises(VitpoolError) as info:
        models.read_state_dict(path)
    message = str(info.value)
    assert "refused" in message and str(path) in message
    assert UNPICKLED == [], "the custom class was unpickled"


def test_refuses_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    path = pickle_that_runs_code(tmp_path / "evil.pth", marker)
    with pytest.raises(VitpoolError) as info:
        models.read_state_dict(path)
    assert "refused" in str(info.value) and "pickled code" in str(info.value)
    assert not marker.exists(), "reading the checkpoint ran the pickled command"
    # The payload is live: an unsafe load does run it (so the check above could have failed).
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("source", ["generated", "real"])
def test_truncated_pth_is_an_error(tmp_path, tiny_pth, source):
    original = tiny_pth if source == "generated" else require(REAL_WEIGHTS)
    blob = original.read_bytes()
    path = tmp_path / "half.pth"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(VitpoolError, match="could not be read") as info:
        models.read_state_dict(path)
    assert str(path) in str(info.value)


def test_truncated_safetensors_is_an_error(tmp_path, tiny_state):
    from safetensors.torch import save_file

    full = tmp_path / "full.safetensors"
    save_file(tiny_state, str(full))
    path = tmp_path / "half.safetensors"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(VitpoolError, match="could not be read"):
        models.read_state_dict(path)


def test_missing_checkpoint_is_an_error(tmp_path):
    path = tmp_path / "nowhere.pth"
    with pytest.raises(VitpoolError, match="does not exist") as info:
        models.read_state_dict(path)
    assert str(path) in str(info.value)


def test_non_tensor_checkpoint_is_an_error(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(VitpoolError, match="not a state dict"):
        models.read_state_dict(path)


# --- create_model ----------------------------------------------------------------------------------


def test_checkpoint_with_missing_key_names_it(tmp_path, tiny_state):
    state = dict(tiny_state)
    del state["blocks.3.mlp.fc2.bias"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(VitpoolError) as info:
        models.create_model(TINY, checkpoint=path)
    message = str(info.value)
    assert "missing 1 keys" in message
    assert "blocks.3.mlp.fc2.bias" in message


def test_checkpoint_with_other_shapes_names_the_tensor(tmp_path, timm):
    small = timm.create_model(SMALL, pretrained=False).state_dict()
    path = tmp_path / "small.pth"
    torch.save(small, path)
    tiny = timm.create_model(TINY, pretrained=False).state_dict()
    with pytest.raises(VitpoolError) as info:
        models.create_model(TINY, checkpoint=path)
    message = str(info.value)
    named = re.search(r"e\.g\. (\S+) is", message)
    assert named, message
    key = named.group(1)
    assert key in small and key in tiny and small[key].shape != tiny[key].shape
    assert str(tuple(small[key].shape)) in message and str(tuple(tiny[key].shape)) in message


def test_checkpoint_loads_into_model(tiny_pth, tiny_state):
    model = models.create_model("deit_tiny", checkpoint=tiny_pth)
    assert not model.training
    assert_same_state(model.state_dict(), tiny_state)


def test_pretrained_offline_points_to_local_options(monkeypatch):
    import huggingface_hub.constants

    # Offline mode makes every hub request fail at once (no retries), whatever the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    try:
        models.create_model("deit_tiny", pretrained=True)
    except VitpoolError as error:
        message = str(error)
    else:
        pytest.skip("pretrained deit_tiny weights were found in a local cache, so nothing failed")
    assert "--checkpoint" in message and "--no-pretrained" in message
    assert TINY in message


def test_unknown_model_suggests_close_names():
    with pytest.raises(VitpoolError) as info:
        models.create_model("deit_tiny_patch16_22", pretrained=False)
    message = str(info.value)
    assert "unknown model" in message
    assert "did you mean" in message and TINY in message


def test_unknown_model_without_close_match_lists_aliases():
    with pytest.raises(VitpoolError) as info:
        models.resolve_name("qqqqqqqq")
    assert "deit_tiny" in str(info.value) and "deit_small" in str(info.value)


def test_aliases_resolve():
    assert models.resolve_name("deit_tiny") == TINY
    assert models.resolve_name("deit_small") == SMALL
    assert models.resolve_name(TINY) == TINY


# --- save / load -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(timm):
    torch.manual_seed(1)
    base = timm.create_model(TINY, pretrained=False).eval()
    return vitpool.convert(base, k=[120, 64], layers=[2, 6])


def logits(model, x):
    with torch.inference_mode():
        return model.eval()(x)


def test_save_load_roundtrip(tmp_path, converted):
    target = tmp_path / "pooled"
    assert vitpool.save(converted, target) == target
    assert sorted(p.name for p in target.iterdir()) == sorted(models.HUB_FILES)
    description = json.loads((target / models.CONFIG_FILE).read_text())
    assert description["base_model"] == TINY
    assert description["vitpool_version"] == vitpool.__version__
    assert description["pooling"] == converted.vitpool_config.to_dict()
    assert description["pooling"]["k"] == [120, 64] and description["pooling"]["layers"] == [2, 6]

    loaded = vitpool.load(target)
    assert loaded.vitpool_config == converted.vitpool_config
    assert sorted(pooled_layers(loaded)) == [2, 6]
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(loaded, x), logits(converted, x), rtol=0, atol=0)
    assert hidden_entries(tmp_path) == []


def test_save_plain_model_loads_unpooled(tmp_path, timm):
    # Constructor arguments (head size, input size) travel with the saved model.
    model = timm.create_model(TINY, pretrained=False, num_classes=10, img_size=96).eval()
    vitpool.save(model, tmp_path / "plain")
    loaded = vitpool.load(tmp_path / "plain")
    assert getattr(loaded, "vitpool_config", None) is None
    assert loaded.num_classes == 10 and tuple(loaded.patch_embed.img_size) == (96, 96)
    x = torch.randn(1, 3, 96, 96)
    torch.testing.assert_close(logits(loaded, x), logits(model, x), rtol=0, atol=0)


def test_save_refuses_existing_directory(tmp_path, converted):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(VitpoolError) as info:
        vitpool.save(converted, target)
    assert "already exists" in str(info.value) and "--force" in str(info.value)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "precious"
    assert hidden_entries(tmp_path) == []


def test_save_force_replaces_existing_model(tmp_path, converted, tiny_model):
    target = vitpool.save(tiny_model, tmp_path / "taken")
    vitpool.save(converted, target, force=True)
    assert sorted(p.name for p in target.iterdir()) == sorted(models.HUB_FILES)
    assert vitpool.load(target).vitpool_config == converted.vitpool_config
    assert hidden_entries(tmp_path) == []


@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_nothing_behind(tmp_path, converted, monkeypatch, existing):
    import safetensors.torch

    target = tmp_path / "out"
    if existing:
        vitpool.save(converted, target)
        before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken_save_file(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises((OSError, VitpoolError)):
        vitpool.save(converted, target, force=existing)
    assert hidden_entries(tmp_path) == []
    if existing:
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    else:
        assert not target.exists()


def test_save_creates_missing_parents(tmp_path, converted):
    target = vitpool.save(converted, tmp_path / "runs" / "nested" / "dir")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "vitpool.json"]


def test_save_under_a_file_is_an_error(tmp_path, converted):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(VitpoolError, match="cannot write"):
        vitpool.save(converted, tmp_path / "afile" / "sub" / "dir")
    assert (tmp_path / "afile").read_text() == "not a folder"


# --- the real DeiT-Tiny checkpoint -----------------------------------------------------------------


def test_real_deit_tiny_checkpoint_loads_strictly_and_classifies():
    from vitpool import data

    weights = require(REAL_WEIGHTS)
    model = models.create_model("deit_tiny", checkpoint=weights)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert_same_state(model.state_dict(), state)
    assert sum(v.numel() for v in state.values()) == 5_717_416

    images = data.open_images(require(IMAGES), model.num_classes)
    assert images.mapping == "imagenet"
    transform, _ = data.transform_for(model)
    x, labels, _ = next(iter(images.batches(transform, 16, workers=0, limit=16)))
    top1 = (logits(model, x).argmax(-1) == labels).float().mean().item()
    assert top1 >= 0.5, f"real DeiT-Tiny got only {top1:.0%} top-1 on 16 sample images (about 80% expected)"
