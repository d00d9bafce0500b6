"""Model names and aliases (timm names, `hf-hub:` and `local-dir:` sources), timm pretrained and checkpoint
loading, and saved converted models.

A saved model is a directory in timm's `save_for_hf` layout, so timm tooling reads the base model from it
(`timm.create_model("local-dir:DIR")`): `config.json` (architecture, pretrained tag and preprocessing, model
arguments) and `model.safetensors` (the weights; pooling has none of its own), plus `vitpool.json` (the pooling
configuration, vitpool's version), from which vitpool rebuilds the pooling. It is written to a temporary
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
from vitpool.errors import VitpoolError
from vitpool.outputs import normal_mode, refuse_existing_output, remove_leftovers, temporary_prefix, writable_parent

ALIASES = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
}
CONFIG_FILE = "vitpool.json"
WEIGHTS_FILE = "model.safetensors"
TIMM_CONFIG_FILE = "config.json"
HUB_FILES = (CONFIG_FILE, TIMM_CONFIG_FILE, WEIGHTS_FILE)
FORMAT = "vitpool-converted-model"


def import_timm():
    """timm, imported after the torchvision repair this machine's CPU torch needs."""
    from vitpool._torchvision_compat import ensure_torchvision

    ensure_torchvision()
    import timm

    return timm


def split_source(name: str) -> tuple[str | None, str]:
    """("hf-hub" | "local-dir" | None, the rest) for a model name, as timm's `create_model` reads it."""
    source, colon, rest = name.partition(":")
    if colon and source.lower() in ("hf-hub", "hf_hub", "local-dir"):
        if not rest:
            raise VitpoolError(f"model name {name!r} names no repository or folder after {source}:")
        return source.lower().replace("_", "-"), rest
    return None, name


def resolve_name(name: str) -> str:
    """A timm model name from a name or alias; unknown names fail with close matches."""
    timm = import_timm()
    name = ALIASES.get(name, name)
    if split_source(name)[0]:
        return name  # timm reads the architecture from the source's config.json
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
    import torch

    damaged = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if damaged is not None:
        raise VitpoolError(f"{source} holds NaN or infinite values (first in {damaged}): the weights are damaged; "
                           f"use other weights, or convert or fine-tune the model again")
    model.load_state_dict(state, strict=True)


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why huggingface_hub's endpoint cannot be reached (a TCP connection, no request), or None if it can."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
    except OSError as error:
        return error.strerror or str(error) or type(error).__name__
    return None


@contextmanager
def _hub_offline_unless_reachable(timeout: float = 3.0) -> Iterator[None]:
    """Put huggingface_hub in offline (cache-only) mode while its endpoint cannot be reached.

    Without this an unreachable hub costs about 50 s of retries and a screen of warnings before timm gives up;
    in offline mode timm's own loading path still finds weights already in the local cache.
    """
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or hub_unreachable(timeout) is not None
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
        model = _create_unloaded(timm, name, **kwargs)
        load_weights(model, state, f"checkpoint {checkpoint}")
    elif pretrained:
        try:
            with _hub_offline_unless_reachable():
                model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as error:  # timm raises hub, HTTP, OS and runtime errors when offline
            raise VitpoolError(
                f"could not load pretrained weights for {name} (offline, no access to the model hub, or no "
                f"weights in the folder: {_first_sentence(error)}); pass --checkpoint PATH for local weights or "
                f"--no-pretrained for random weights"
            ) from None
    else:
        model = _create_unloaded(timm, name, **kwargs)
    return model.eval()


def _create_unloaded(timm, name: str, **kwargs):
    """timm's model without weights; a sourced name still reads its config.json (from the hub's cache offline)."""
    if not split_source(name)[0]:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        with _hub_offline_unless_reachable():
            return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as error:  # hub, HTTP, OS and JSON errors alike
        raise VitpoolError(f"could not read the configuration of {name} (offline, no access to the model hub, or no "
                           f"timm config.json there: {_first_sentence(error)})") from None


def _first_sentence(error: Exception) -> str:
    return " ".join(str(error).split()).split(". ")[0][:200] or type(error).__name__


def architecture(model) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        raise VitpoolError("the model has no timm architecture name (pretrained_cfg['architecture']); create it with timm.create_model")
    return name


def _constructor_kwargs(model) -> dict:
    """Arguments that make timm.create_model rebuild the same shapes (read where config.json is missing)."""
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
    """Write a model's files into an existing folder: timm's own `save_for_hf` (config.json, model.safetensors),
    then vitpool.json. Each file is renamed into place, so a reader never sees half of one (fine-tuning rewrites
    them every epoch)."""
    timm = import_timm()
    directory = Path(directory)
    writable_parent(directory / CONFIG_FILE)
    try:
        staging = Path(tempfile.mkdtemp(prefix=".vitpool-", suffix=".tmp", dir=directory))
    except OSError as error:
        raise VitpoolError(f"cannot write {directory}: {error.strerror or error}") from None
    try:
        timm.models.save_for_hf(model, staging, safe_serialization=True)
        (staging / CONFIG_FILE).write_text(json.dumps(describe(model, calibration), indent=2) + "\n")
        for name in (WEIGHTS_FILE, TIMM_CONFIG_FILE, CONFIG_FILE):
            (staging / name).chmod(normal_mode())  # safetensors writes its file private
            os.replace(staging / name, directory / name)
    except OSError as error:
        raise VitpoolError(f"cannot write {directory}: {error.strerror or error}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save(model, directory: str | Path, force: bool = False, calibration: dict | None = None) -> Path:
    """Write a (converted or plain) timm model as a self-describing directory, atomically.

    `force` replaces only a directory that holds a saved model, never a folder of the user's own files.
    Without it, of two writers racing for the same directory one wins and the other is told it exists.
    """
    directory = Path(directory)
    refuse_existing_output(directory, force)
    if directory.exists() and not (directory.is_dir() and is_saved_model(directory)):
        raise VitpoolError(f"output {directory} exists and is not a saved model, so --force does not replace it; "
                           f"choose another path or remove it yourself")
    parent = directory.parent
    writable_parent(directory)
    remove_leftovers(directory)
    try:
        staging = Path(tempfile.mkdtemp(prefix=temporary_prefix(directory), suffix=".tmp", dir=parent))
        staging.chmod(normal_mode(directory=True))
    except OSError as error:
        raise VitpoolError(f"cannot write {directory}: {error.strerror or error}") from None
    try:
        write_into(model, staging, calibration)
        if force and directory.exists():
            retired = Path(tempfile.mkdtemp(prefix=temporary_prefix(directory), suffix=".old", dir=parent))
            os.replace(directory, retired / "x")
            os.replace(staging, directory)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, directory)  # fails if another writer got there first
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if directory.exists() and not force:
            raise VitpoolError(f"output {directory} already exists (written meanwhile by another process); choose "
                               f"another path or pass --force to replace it") from None
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


POOLING_FIELD_TYPES = {"method": str, "k": list, "layers": list, "iters": int, "seed": int, "output": str,
                       "proportional": bool, "position": str, "trim_last": bool, "spread": int}


def _numbers(values: list, fractions: bool) -> bool:
    """All integers, or (where `fractions`) all numbers in (0, 1)."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return True
    return fractions and all(isinstance(v, float) and 0 < v < 1 for v in values)


def read_description(directory: Path) -> dict:
    """A saved model's vitpool.json, checked field by field so that a damaged file is named, not a traceback."""
    path = directory / CONFIG_FILE
    try:
        description = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise VitpoolError(f"{path} could not be read: {error}") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        found = description.get("format") if isinstance(description, dict) else type(description).__name__
        raise VitpoolError(f"{directory} is not a vitpool model directory ({CONFIG_FILE} format {found!r})")
    problems = []
    if not isinstance(description.get("base_model"), str):
        problems.append("'base_model' must be a timm model name")
    if not isinstance(description.get("model_kwargs", {}), dict):
        problems.append("'model_kwargs' must be an object")
    pooling = description.get("pooling")
    if not isinstance(pooling, dict):
        problems.append("'pooling' must be an object (the pooling configuration)")
    else:
        for name, kind in POOLING_FIELD_TYPES.items():
            value = pooling.get(name)
            if name in pooling and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))
                                    or (kind is list and not _numbers(value, fractions=name == "k"))):
                listed = "a list of integers" + (" or of fractions in (0, 1)" if name == "k" else "")
                problems.append(f"'pooling.{name}' must be {listed if kind is list else 'a ' + kind.__name__}")
    if problems:
        raise VitpoolError(f"{path} is damaged: {'; '.join(problems)}; convert the model again")
    return description


def read_saved(directory: str | Path) -> Loaded:
    """The unpooled model and pooling configuration stored in a directory written by `save`."""
    directory = Path(directory)
    description = read_description(directory)
    timm = import_timm()
    if (directory / TIMM_CONFIG_FILE).is_file():
        model = _create_unloaded(timm, f"local-dir:{directory}")
    else:  # written before vitpool saved timm's config.json
        model = timm.create_model(resolve_name(description["base_model"]), pretrained=False, **description.get("model_kwargs", {}))
    weights = directory / WEIGHTS_FILE
    load_weights(model, read_state_dict(weights), f"weights {weights}")
    try:
        config = PoolingConfig.from_dict(description["pooling"])
    except TypeError as error:
        raise VitpoolError(f"{directory / CONFIG_FILE} is damaged: {error}; convert the model again") from None
    return Loaded(model.eval(), description["base_model"], config if config.k else None)


def _hub_snapshot(repo: str) -> Path | None:
    """The local copy of a model saved by vitpool on the Hub (`repo` is `org/name` or `org/name@revision`);
    None where the repository holds no vitpool.json, a plain timm model (offline: none in the local cache)."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    repo_id, _, revision = repo.partition("@")
    try:
        with _hub_offline_unless_reachable():
            hf_hub_download(repo_id, CONFIG_FILE, revision=revision or None)
            return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=list(HUB_FILES)))
    except EntryNotFoundError:
        return None
    except Exception as error:  # unknown repository, gated, HTTP, offline with nothing cached
        raise VitpoolError(f"could not read hf-hub:{repo} (offline, no access to the model hub, or no such "
                           f"repository: {_first_sentence(error)})") from None


def saved_location(spec: str) -> Path | None:
    """Where a saved vitpool model named by `spec` (a directory, `local-dir:DIR` or `hf-hub:REPO`) lies; None
    if `spec` names something else (a timm name, or a folder of timm's own layout)."""
    source, target = split_source(spec)
    if source == "hf-hub":
        return _hub_snapshot(target)
    path = Path(target)
    if is_saved_model(path):
        return path
    if source == "local-dir" and not (path / TIMM_CONFIG_FILE).is_file():
        raise VitpoolError(f"{spec}: {path} is not a folder holding a saved model ({CONFIG_FILE}) or timm's "
                           f"{TIMM_CONFIG_FILE} (as timm's save_for_hf writes it)")
    return None


def load(spec: str | Path):
    """A model saved by `save` (a directory, `local-dir:DIR` or `hf-hub:REPO`), converted again with its saved
    pooling configuration."""
    from vitpool.adapter import apply_pooling

    location = saved_location(str(spec))
    if location is None:
        raise VitpoolError(f"{spec} is not a model saved by vitpool (no {CONFIG_FILE}); for a plain timm model use "
                           f"timm.create_model")
    loaded = read_saved(location)
    return apply_pooling(loaded.model, loaded.config) if loaded.config else loaded.model


def load_model_or_dir(spec: str, checkpoint: str | None = None, pretrained: bool = True) -> Loaded:
    """MODEL_OR_DIR of every command: a saved model (directory, `local-dir:`, `hf-hub:`), a folder in timm's
    layout, or a timm name/alias (`hf-hub:` and `local-dir:` sources included) with its weight options."""
    location = saved_location(spec)
    if location is not None:
        if checkpoint is not None:
            raise VitpoolError(f"{spec} is a saved model with its own weights; --checkpoint applies to a model name")
        return read_saved(location)
    if split_source(spec)[0] is None and Path(spec).is_dir():
        if not (Path(spec) / TIMM_CONFIG_FILE).is_file():
            raise VitpoolError(f"{spec} is a directory but not a saved model (no {CONFIG_FILE} or {TIMM_CONFIG_FILE} in it)")
        spec = f"local-dir:{spec}"
    model = create_model(spec, pretrained=pretrained, checkpoint=checkpoint)
    return Loaded(model, architecture(model), None)
