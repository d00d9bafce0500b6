from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEIT_TINY_WEIGHTS = SHARED_DATA / "weights" / "deit_tiny_patch16_224.pth"
IMAGENET_SAMPLE = SHARED_DATA / "imagenet-sample"


@pytest.fixture(scope="session")
def deit_tiny_weights() -> Path:
    if not DEIT_TINY_WEIGHTS.is_file():
        pytest.skip(f"real DeiT-Tiny weights not found at {DEIT_TINY_WEIGHTS} (see ../shared/data/README.md)")
    return DEIT_TINY_WEIGHTS


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"real ImageNet sample not found at {IMAGENET_SAMPLE} (see ../shared/data/README.md)")
    return IMAGENET_SAMPLE


@pytest.fixture(scope="session")
def real_deit_tiny(deit_tiny_weights):
    from vitpool.models import create_model

    return create_model("deit_tiny", checkpoint=deit_tiny_weights)


@pytest.fixture(scope="session")
def tiny_model():
    """DeiT-Tiny with seeded random weights, for tests about mechanics rather than accuracy (never modified)."""
    import torch

    from vitpool.models import create_model

    torch.manual_seed(0)
    return create_model("deit_tiny", pretrained=False).eval()


def noise_folder(root: Path, classes: tuple[str, ...], per_class: int, size: tuple[int, int], seed: int) -> Path:
    """An image folder root/<class>/<i>.png of seeded noise photos, `size` = (height, width)."""
    import torch
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    for name in classes:
        (root / name).mkdir()
        for i in range(per_class):
            pixels = torch.randint(0, 256, (*size, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


class _RunsCommand:
    """Unpickling this calls os.system: the classic malicious checkpoint."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def pickle_that_runs_code(path: Path, marker: Path) -> Path:
    """A .pth at `path` whose unpickling would create `marker` (an unsafe torch.load does run it)."""
    import torch

    torch.save({"weight": torch.zeros(2), "payload": _RunsCommand(f"touch {marker}")}, path)
    return path
