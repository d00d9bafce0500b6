"""Does the default chosen on DeiT-Tiny hold on a larger, differently trained ViT? CLIP ViT-B/16's image tower.

CLIP has no class head here (its 512-d image projection is the head), so the measure is how much pooling
changes the embeddings of the 500 shared photos: the cosine to the unpooled embedding, and how often each
photo's nearest neighbour among the photos (all embedded by the same model) is the one the unpooled model
finds. The three presets at MAC budgets 0.5, 0.6 and 0.75, and with `--iters N` a preset's clustering run for N
iterations instead (rows "vitpool --iters N"), with `--spread N` from N spread seeds (rows "vitpool --spread N"),
with `--output KIND` another K-Medoids output (rows "vitpool --output mean");
a run of some rows keeps the other rows of the file it replaces. The model is built on demand by ../shared/tools/clip-vit-b16 into ~/.cache/vitpool (never into the
repository). Writes benchmarks/results/clip_embeddings.json.

    .venv/bin/python benchmarks/clip_embeddings.py [--presets vitpool,tome,paper] [--budgets 0.5,0.6,0.75] [--iters N] [--spread N] [--output KIND]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import RESULTS, SHARED_DATA, imagenet_sample, run_environment, write_json

from vitpool.adapter import apply_pooling
from vitpool.budget import solve
from vitpool.config import PRESETS, make_config
from vitpool.flops import total_macs
from vitpool.models import create_model
from vitpool.evaluate import load_images

WEIGHTS = Path.home() / ".cache" / "vitpool" / "clip_vit_b16.safetensors"
ARCHITECTURE = "vit_base_patch16_clip_quickgelu_224"


def clip_model():
    if not WEIGHTS.is_file():
        WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(SHARED_DATA.parent / "tools" / "clip-vit-b16"), sys.executable, str(WEIGHTS)], check=True)
    return create_model(ARCHITECTURE, checkpoint=WEIGHTS, num_classes=512)


def embed(model, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = torch.cat([model(images[i : i + 50]).float() for i in range(0, len(images), 50)])
    return torch.nn.functional.normalize(out, dim=-1)


def nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-2.0)
    return similarity.argmax(-1)


def unpooled_neighbours(images) -> tuple[torch.Tensor, torch.Tensor]:
    """The unpooled model's embeddings of `images` (an ImageSet: its reference outputs), normalised, and each
    photo's nearest neighbour among them."""
    reference = torch.nn.functional.normalize(images.reference, dim=-1)
    return reference, nearest_neighbours(reference)


def closeness(pooled, images, reference: torch.Tensor, neighbours: torch.Tensor) -> dict:
    """How close `pooled`'s embeddings stay to the unpooled ones: mean and 10th-percentile cosine, and the %
    of photos whose nearest neighbour is unchanged."""
    embeddings = embed(pooled, images.images)
    cosine = (embeddings * reference).sum(-1)
    return {"cosine_mean": cosine.mean().item(), "cosine_p10": cosine.quantile(0.1).item(),
            "same_neighbour": 100 * (nearest_neighbours(embeddings) == neighbours).float().mean().item()}


def earlier_rows() -> list[dict]:
    path = RESULTS / "clip_embeddings.json"
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="vitpool,tome,paper")
    parser.add_argument("--budgets", default="0.5,0.6,0.75")
    parser.add_argument("--iters", type=int, default=None, help="clustering iterations instead of the preset's")
    parser.add_argument("--spread", type=int, default=None, help="spread seeds instead of the preset's")
    parser.add_argument("--output", default=None, help="K-Medoids outputs instead of the preset's")
    args = parser.parse_args()
    model = clip_model()
    images = load_images(model, imagenet_sample(), None)
    reference, reference_neighbours = unpooled_neighbours(images)
    baseline_macs = total_macs(model)
    presets = args.presets.split(",")
    changed = "".join(f" --{name} {value}" for name, value in (("iters", args.iters), ("spread", args.spread),
                                                               ("output", args.output)) if value is not None)
    labels = {preset: preset + changed for preset in presets}
    rows = [row for row in earlier_rows() if row["preset"] not in labels.values()]
    for preset in presets:
        for budget in (float(b) for b in args.budgets.split(",")):
            started = time.perf_counter()
            template = make_config(layers=(), preset=preset, iters=args.iters, spread=args.spread, output=args.output)
            config = solve(model, template, budget, family=PRESETS[preset].family)[0]
            pooled = apply_pooling(model, config)
            rows.append({"preset": labels[preset], "budget": budget, "k": list(config.k), "layers": list(config.layers),
                         "config": config.to_dict(), "mac_ratio": total_macs(pooled) / baseline_macs,
                         **closeness(pooled, images, reference, reference_neighbours),
                         "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(rows[-1]), flush=True)
    write_json(RESULTS / "clip_embeddings.json", {
        "model": f"{ARCHITECTURE}, num_classes=512 (OpenAI CLIP ViT-B/16 image tower, ../shared/tools/clip-vit-b16)",
        "images": "../shared/data/imagenet-sample (500)", "env": run_environment(), "rows": rows})


if __name__ == "__main__":
    main()
