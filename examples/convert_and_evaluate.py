"""The Python API end to end: load a DeiT, pool it, count what it saves, check what it costs, save and reload.

    .venv/bin/python examples/convert_and_evaluate.py [--checkpoint PATH] [--data DIR]

Defaults read the real DeiT-Tiny and photos in ../shared/data; with the model hub reachable, drop
--checkpoint and timm downloads the pretrained weights.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import vitpool
from vitpool.evaluate import evaluate
from vitpool.flops import count_macs
from vitpool.models import create_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

parser = argparse.ArgumentParser()
parser.add_argument("--checkpoint", type=Path, default=SHARED / "weights" / "deit_tiny_patch16_224.pth")
parser.add_argument("--data", type=Path, default=SHARED / "imagenet-sample")
parser.add_argument("--limit", type=int, default=100)
args = parser.parse_args()

# Any timm VisionTransformer works: timm.create_model("deit_tiny_patch16_224", pretrained=True) as well.
model = create_model("deit_tiny", checkpoint=args.checkpoint)

# 60% of the MACs, pooling layers included, with the default (the best measured) settings;
# preset="paper" gives the paper's weighted K-Medoids after blocks 2, 5 and 8 instead.
pooled = vitpool.convert(model, budget=0.6)

macs = count_macs(pooled, baseline=model)
print(f"{macs.macs / 1e9:.3f} GMACs instead of {macs.baseline_macs / 1e9:.3f} (ratio {macs.ratio:.3f}; "
      f"the pooling layers themselves: {macs.pooling_macs / 1e9:.4f} GMACs)")

result = evaluate(pooled, args.data, baseline=model, limit=args.limit)
print(f"top-1 {result.top1:.1f}% (unpooled {result.baseline_top1:.1f}%), agreement {result.agreement:.1f}%, "
      f"KL {result.kl:.3f} on {result.n} images")

with tempfile.TemporaryDirectory() as tmp:
    vitpool.save(pooled, Path(tmp) / "deit_tiny_pooled")
    reloaded = vitpool.load(Path(tmp) / "deit_tiny_pooled")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(reloaded(x), pooled(x))
    print(f"saved and reloaded: {reloaded.vitpool_config.describe()}")
