"""Sharing a saved model on the Hugging Face Hub: one commit with timm's files, vitpool.json and a model card.

The repository then loads as `hf-hub:ORG/NAME` in vitpool (pooling included) and in timm (the base model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vitpool.errors import VitpoolError
from vitpool.models import HUB_FILES, Loaded, read_saved, saved_location


@dataclass
class CardFacts:
    """What the model card states: the pooling, the MACs counted by vitpool, and accuracy if measured."""

    loaded: Loaded
    macs: object  # flops.MacReport
    accuracy: object | None  # evaluate.EvalResult against the unpooled model, or None
    data: str | None


def measure(directory: Path, data: str | None = None, limit: int | None = None) -> CardFacts:
    """Count the saved model's MACs and, with `data`, its accuracy and agreement with the unpooled model."""
    from vitpool.adapter import apply_pooling
    from vitpool.evaluate import evaluate
    from vitpool.flops import count_macs

    loaded = read_saved(directory)
    model = apply_pooling(loaded.model, loaded.config) if loaded.config else loaded.model
    macs = count_macs(model, baseline=loaded.model if loaded.config else None)
    accuracy = evaluate(model, data, baseline=loaded.model if loaded.config else None, limit=limit) if data else None
    return CardFacts(loaded, macs, accuracy, data)


def model_card(repo_id: str, facts: CardFacts) -> str:
    """A Hub model card (README.md with timm's metadata) that says how the model was pooled and what it costs."""
    from huggingface_hub import ModelCardData

    from vitpool import __version__

    model, config, macs, accuracy = facts.loaded.model, facts.loaded.config, facts.macs, facts.accuracy
    cfg = model.pretrained_cfg
    base = f"{facts.loaded.name}.{cfg['tag']}" if cfg.get("tag") else facts.loaded.name
    metadata = ModelCardData(library_name="timm", license=cfg.get("license"), pipeline_tag="image-classification",
                             tags=["image-classification", "timm", "vitpool", "token-pooling"])
    lines = [f"---\n{metadata.to_yaml()}\n---", f"# {repo_id.split('/')[-1]}", "",
             f"`{base}` with Token Pooling (Marin et al., WACV 2023), converted by vitpool {__version__}.", "",
             "## Pooling", "", f"{config.describe() if config else 'none (the unpooled model)'}", ""]
    if config:
        lines += [f"Flags: `{config.flags()}`", ""]
    lines += ["## Compute (multiply-accumulates at batch 1, pooling layers included)", "",
              "| model | input | GMACs | ratio |", "|---|---|---|---|",
              f"| unpooled | {'x'.join(map(str, macs.input_size))} | {macs.baseline_macs / 1e9:.3f} | 1.000 |",
              f"| this model | {'x'.join(map(str, macs.input_size))} | {macs.macs / 1e9:.3f} | {macs.ratio:.3f} |", ""]
    lines += ["## Accuracy", ""]
    if accuracy is None:
        lines += ["Not measured when this card was written (`vitpool push --data DIR` measures it).", ""]
    else:
        lines += [f"Measured on {accuracy.n} images of `{Path(str(facts.data)).name}` ({accuracy.mapping} labels):", "",
                  "| top-1 | top-5 | unpooled top-1 | agreement with unpooled | KL(unpooled \\|\\| pooled) |",
                  "|---|---|---|---|---|",
                  f"| {accuracy.top1:.1f} | {accuracy.top5:.1f} | {_percent(accuracy.baseline_top1)} | "
                  f"{_percent(accuracy.agreement)} | {'' if accuracy.kl is None else f'{accuracy.kl:.4f}'} |", ""]
    lines += ["## Use", "", "```python", "import vitpool", "", f'model = vitpool.load("hf-hub:{repo_id}")', "```", "",
              f"or `vitpool eval hf-hub:{repo_id} --data DIR`. timm alone reads the base model without pooling: "
              f'`timm.create_model("hf-hub:{repo_id}", pretrained=True)`.', ""]
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def push(directory: str | Path, repo_id: str, *, data: str | None = None, limit: int | None = None,
         private: bool = False, token: str | None = None, api=None) -> str:
    """Upload a saved model and its card to `repo_id` in one commit; returns the commit's URL.

    `api` is a `huggingface_hub.HfApi` (one with `create_repo` and `create_commit`); None makes one for the Hub.
    """
    from huggingface_hub import CommitOperationAdd

    location = saved_location(str(directory))
    if location is None or not Path(location).is_dir():
        raise VitpoolError(f"{directory} is not a model saved by vitpool (no vitpool.json); convert one with `vitpool convert`")
    if "/" not in repo_id or repo_id.count("/") > 1:
        raise VitpoolError(f"repository id {repo_id!r} should be ORG/NAME (or USER/NAME)")
    api = api if api is not None else _hub_api(token)
    card = model_card(repo_id, measure(Path(location), data, limit))
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(location) / name)) for name in HUB_FILES
                  if (Path(location) / name).is_file()]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.create_commit(repo_id, operations=operations, commit_message=f"Add {Path(location).name} (vitpool)")
    except Exception as error:  # huggingface_hub raises HTTP, auth and validation errors
        message = " ".join(str(error).split())[:200] or type(error).__name__
        raise VitpoolError(f"could not push to {repo_id}: {message}; log in with `hf auth login` or pass --token") from None
    return str(getattr(commit, "commit_url", commit))


def _hub_api(token: str | None):
    """An HfApi for the Hub; one clear line, before any measurement is wasted, if the Hub cannot be reached."""
    from huggingface_hub import HfApi, constants

    from vitpool.models import hub_unreachable

    if constants.HF_HUB_OFFLINE:
        raise VitpoolError("pushing needs the model hub, and HF_HUB_OFFLINE is set; unset it on a machine with network")
    reason = hub_unreachable(timeout=5.0)
    if reason is not None:
        raise VitpoolError(f"the model hub at {constants.ENDPOINT} cannot be reached ({reason}); push from a machine with network")
    return HfApi(token=token)
