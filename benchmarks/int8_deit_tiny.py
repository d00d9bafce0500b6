"""What dynamic int8 quantization (`vitpool export --quantize int8`) costs in accuracy: the real DeiT-Tiny, unpooled
and converted with `--budget` 0.5, 0.6 and 0.75 (the defaults), on the 500 shared photos. Each model is exported,
quantized as `vitpool.export.GraphPasses(quantize="int8")` does, and run in ONNX Runtime; top-1, agreement with
the unpooled float model (the project's agreement) and agreement with the same model in float32 PyTorch.
Writes benchmarks/results/int8_deit_tiny.json.

    .venv/bin/python benchmarks/int8_deit_tiny.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS, SHARED_DATA, deit_tiny_weights, imagenet_sample, run_environment, write_json

import vitpool
from vitpool.evaluate import load_images
from vitpool.export import INPUT_NAME, GraphPasses, session, to_onnx
from vitpool.models import create_model

BUDGETS = (0.5, 0.6, 0.75)
BATCH = 50


def top1_in_onnxruntime(path: Path, images: torch.Tensor) -> np.ndarray:
    runtime = session(path, threads=torch.get_num_threads())
    return np.concatenate([runtime.run(None, {INPUT_NAME: part.numpy()})[0].argmax(-1) for part in images.split(BATCH)])


def top1_in_pytorch(model, images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([model(part).argmax(-1) for part in images.split(BATCH)]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    args = parser.parse_args()
    unpooled = create_model("deit_tiny", checkpoint=deit_tiny_weights(args.data)).eval()
    photos = load_images(unpooled, imagenet_sample(args.data), None)
    labels, reference = photos.labels.numpy(), photos.reference.argmax(-1).numpy()
    models = {"unpooled": unpooled, **{f"budget {budget}": vitpool.convert(unpooled, budget=budget) for budget in BUDGETS}}
    percent = lambda hits: round(100.0 * float(np.mean(hits)), 1)  # noqa: E731
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, model in models.items():
            path = Path(workdir) / "model.onnx"
            to_onnx(model, path)
            GraphPasses(quantize="int8").apply(path, model)
            float32, int8 = top1_in_pytorch(model, photos.images), top1_in_onnxruntime(path, photos.images)
            rows.append({"model": name, "fp32_top1": percent(float32 == labels), "fp32_agreement": percent(float32 == reference),
                         "int8_top1": percent(int8 == labels), "int8_agreement": percent(int8 == reference),
                         "int8_agreement_with_own_fp32": percent(int8 == float32)})
            print(rows[-1], flush=True)
    write_json(RESULTS / "int8_deit_tiny.json", {"images": len(labels), "env": run_environment(), "rows": rows})


if __name__ == "__main__":
    main()
