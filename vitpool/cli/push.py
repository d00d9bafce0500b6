"""`vitpool push`: a converted model on the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


from vitpool.cli.common import app, emit_json, out, user_errors
from vitpool.cli.options import JsonOpt


@app.command()
@user_errors
def push(
    directory: Annotated[str, typer.Argument(metavar="DIR", help="A directory written by `vitpool convert` (or finetune).")],
    repo_id: Annotated[str, typer.Argument(metavar="REPO_ID", help="The Hub repository to create or update, ORG/NAME.")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Labelled images to measure top-1 and agreement with the unpooled model on, for the model card.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="At most this many images of --data.")] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    token: Annotated[Optional[str], typer.Option("--token", help="Hub token (default: the one `hf auth login` stored, or HF_TOKEN).")] = None,
    as_json: JsonOpt = False,
):
    """Upload a converted model to the Hugging Face Hub with a model card (pooling, MACs, accuracy); it then
    loads as hf-hub:REPO_ID in vitpool and, unpooled, in timm."""
    from vitpool.hub import push as push_model

    url = push_model(directory, repo_id, data=str(data) if data else None, limit=limit, private=private, token=token)
    if as_json:
        emit_json({"repo_id": repo_id, "commit_url": url})
    else:
        out.print(f"pushed {directory} to {repo_id}: {url}", highlight=False, soft_wrap=True)
