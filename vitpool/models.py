"""Model names and aliases, timm pretrained and checkpoint loading, and saved converted models.

A saved model is a directory: `vitpool.json` (base timm model, its constructor arguments, the pooling
configuration, vitpool's version) and `model.safetensors` (the weights). It is written to a temporary
sibling directory and renamed into place, so a failed save leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from vitpool.config import PoolingConfig
from vitpool.errors import VitpoolError, refuse_existing_output, writable_parent, write_atomically

ALIASES = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
}
CONFIG_FILE = "vitpool.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "vitpool-converted-model"


def import_timm():
    """timm, imported after the torchvision repair this machine's CPU torch needs."""
    from vitpool._torchvision_compat import ensure_torchvision

    ensure_torchvision()
    import timm

    return timm


def resolve_name(name: str) -> str:
    """A timm model name from a name or alias; unknown names fail with close matches."""
    timm = import_timm()
    name = ALIASES.get(name, name)
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see timm.list_models('vit_*'))"
        raise VitpoolError(f"unknown model {name!r}{hint}; aliases: {', '.join(ALIASES)}")
    return name


def read_state_dict(path: str | Path) -> dict:
    """Tensors from a `.safetensors` file or a `.pth`/`.pt` state dict, never unpickling code."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise VitpoolError(f"checkpoint {path} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VitpoolError(
            f"checkpoint {path} holds more than tensors and was refused (loading it would run pickled code): "
            f"{first[:160]}; save a plain state dict or safetensors"
        ) from None
    except Exception as error:  # torch and safetensors raise several types for damaged files
        message = " ".join(str(error).split())[:200] or type(error).__name__
        raise VitpoolError(f"checkpoint {path} could not be read (truncated or not a checkpoint?): {message}") from None
    if isinstance(state, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VitpoolError(f"checkpoint {path} is not a state dict of tensors (nor holds one under 'model' or 'state_dict')")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model, state: dict, source: str) -> None:
    """Load `state` into `model` strictly; a mismatch names the keys or shapes that differ."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''})")
        raise VitpoolError(f"{source} does not match the model: {'; '.join(parts)}; is it for another architecture?")
    wrong = [k for k in own if own[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        raise VitpoolError(
            f"{source} does not match the model: {len(wrong)} tensors have other shapes, e.g. {k} is "
            f"{tuple(state[k].shape)} in the file and {tuple(own[k].shape)} in the model"
        )
    model.load_state_dict(state, strict=True)


@contextmanager
def _hub_offline_unless_reachable(timeout: float = 3.0) -> Iterator[None]:
    """Put huggingface_hub in offline (cache-only) mode while its endpoint cannot be reached.

    Without this an unreachable hub costs about 50 s of retries and a screen of warnings before timm gives up;
    in offline mode timm's own loading path still finds weights already in the local cache.
    """
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        reachable = True
    except OSError:
        reachable = False
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or not reachable
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def create_model(name: str, pretrained: bool = True, checkpoint: str | Path | None = None, **kwargs):
    """An unpooled timm model, in eval mode: pretrained through timm, from a local checkpoint, or random."""
    timm = import_timm()
    name = resolve_name(name)
    if checkpoint is not None:
        state = read_state_dict(checkpoint)
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_weights(model, state, f"checkpoint {checkpoint}")
    elif pretrained:
        try:
            with _hub_offline_unless_reachable():
                model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as error:  # timm raises hub, HTTP, OS and runtime errors when offline
            reason = " ".join(str(error).split()).split(". ")[0][:200] or type(error).__name__
            raise VitpoolError(
                f"could not load pretrained weights for {name} (offline or no access to the model hub: "
                f"{reason}); pass --checkpoint PATH for local weights or --no-pretrained for random weights"
            ) from None
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    return model.eval()


def architecture(model) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        raise VitpoolError("the model has no timm architecture name (pretrained_cfg['architecture']); create it with timm.create_model")
    return name


def _constructor_kwargs(model) -> dict:
    """Arguments that make timm.create_model rebuild the same shapes."""
    return {"num_classes": int(model.num_classes), "img_size": [int(v) for v in model.patch_embed.img_size]}


def describe(model, calibration: dict | None = None) -> dict:
    """The `vitpool.json` of a (converted or plain) timm model; `calibration` records how a calibrated
    schedule was found (`vitpool convert --calibrate`)."""
    from vitpool import __version__
    from vitpool.adapter import pooling_config

    config = pooling_config(model) or PoolingConfig(k=(), layers=())
    return {
        "format": FORMAT,
        "vitpool_version": __version__,
        "base_model": architecture(model),
        "model_kwargs": _constructor_kwargs(model),
        "pooling": config.to_dict(),
        **({"calibration": calibration} if calibration else {}),
    }


def write_into(model, directory: str | Path, calibration: dict | None = None) -> None:
    """Write a model's two files into an existing folder, each atomically (fine-tuning rewrites them every epoch)."""
    from safetensors.torch import save as safetensors_bytes

    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_atomically(directory / WEIGHTS_FILE, safetensors_bytes(state, metadata={"format": "pt"}))
    write_atomically(directory / CONFIG_FILE, json.dumps(describe(model, calibration), indent=2) + "\n")


def save(model, directory: str | Path, force: bool = False, calibration: dict | None = None) -> Path:
    """Write a (converted or plain) timm model as a self-describing directory, atomically."""
    directory = Path(directory)
    refuse_existing_output(directory, force)
    if directory.exists() and not directory.is_dir():
        raise VitpoolError(f"output {directory} exists and is not a directory")
    parent = directory.parent
    writable_parent(directory)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=parent))
    except OSError as error:
        raise VitpoolError(f"cannot write {directory}: {error.strerror or error}") from None
    try:
        write_into(model, staging, calibration)
        if directory.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=parent))
            os.replace(directory, retired / "x")
            os.replace(staging, directory)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, directory)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise VitpoolError(f"cannot write {directory}: {error.strerror or error}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def is_saved_model(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


@dataclass
class Loaded:
    """An unpooled model and, for a saved converted model, the pooling it was saved with."""

    model: object
    name: str
    config: PoolingConfig | None


def read_saved(directory: str | Path) -> Loaded:
    """The unpooled model and pooling configuration stored in a directory written by `save`."""
    directory = Path(directory)
    try:
        description = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise VitpoolError(f"{directory / CONFIG_FILE} could not be read: {error}") from None
    if description.get("format") != FORMAT:
        raise VitpoolError(f"{directory} is not a vitpool model directory (format {description.get('format')!r})")
    timm = import_timm()
    model = timm.create_model(resolve_name(description["base_model"]), pretrained=False, **description.get("model_kwargs", {}))
    weights = directory / WEIGHTS_FILE
    load_weights(model, read_state_dict(weights), f"weights {weights}")
    config = PoolingConfig.from_dict(description["pooling"])
    return Loaded(model.eval(), description["base_model"], config if config.k else None)


def load(directory: str | Path):
    """A model saved by `save`, converted again with its saved pooling configuration."""
    from vitpool.adapter import apply_pooling

    loaded = read_saved(directory)
    return apply_pooling(loaded.model, loaded.config) if loaded.config else loaded.model


def load_model_or_dir(spec: str, checkpoint: str | None = None, pretrained: bool = True) -> Loaded:
    """MODEL_OR_DIR of every command: a saved directory, or a timm name/alias with its weight options."""
    path = Path(spec)
    if path.is_dir():
        if not is_saved_model(path):
            raise VitpoolError(f"{spec} is a directory but not a saved vitpool model (no {CONFIG_FILE} in it)")
        if checkpoint is not None:
            raise VitpoolError(f"{spec} is a saved model with its own weights; --checkpoint applies to a model name")
        return read_saved(path)
    model = create_model(spec, pretrained=pretrained, checkpoint=checkpoint)
    return Loaded(model, architecture(model), None)
