"""Image folders (`DIR/<class>/<image>`) with ImageNet WordNet-id class mapping and timm preprocessing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vitpool.errors import VitpoolError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}


@dataclass
class ImageFolder:
    """Image paths with class indices. `mapping` is "imagenet" (WordNet-id folders) or "sorted" (folder order)."""

    samples: list[tuple[Path, int]]
    classes: list[str]
    mapping: str


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order, as timm ships them."""
    from vitpool.models import import_timm

    import_timm()
    from timm.data import ImageNetInfo

    return list(ImageNetInfo("imagenet-1k").label_names())


def existing_folder(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise VitpoolError(f"data folder {root} does not exist or is not a folder")
    return root


def images_under(folder: Path) -> list[Path]:
    """Image files at any depth under `folder`, sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def scan(root: str | Path, num_classes: int) -> ImageFolder:
    """Find the images under `root`; WordNet-id folders map to ImageNet-1k indices, others to sorted order."""
    root = existing_folder(root)
    per_class = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = images_under(folder)
        if images:
            per_class[folder.name] = images
    if not per_class:
        raise VitpoolError(
            f"no images found in {root}: expected {root}/<class>/<image> with extensions {', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    classes = list(per_class)
    wnid_index = {wnid: i for i, wnid in enumerate(imagenet_wnids())} if num_classes == 1000 else {}
    if wnid_index and all(name in wnid_index for name in classes):
        labels, mapping = {name: wnid_index[name] for name in classes}, "imagenet"
    else:
        if len(classes) > num_classes:
            raise VitpoolError(
                f"{root} has {len(classes)} class folders but the model predicts {num_classes} classes; "
                f"name folders by ImageNet WordNet id (n01440764) or use a model with a matching head"
            )
        labels, mapping = {name: i for i, name in enumerate(classes)}, "sorted"
    samples = [(path, labels[name]) for name, images in per_class.items() for path in images]
    return ImageFolder(samples, classes, mapping)


def scan_unlabelled(root: str | Path) -> list[tuple[Path, int]]:
    """Every image under `root`, at any depth, with label 0: distillation from a teacher needs no labels."""
    root = existing_folder(root)
    images = images_under(root)
    if not images:
        raise VitpoolError(f"no images found under {root} (extensions {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return [(path, 0) for path in images]


def spread(samples: list, limit: int | None) -> list:
    """`limit` samples spread evenly over the list (folders are sorted by class, so the first N would be few classes)."""
    if limit is None or limit >= len(samples):
        return samples
    if limit < 1:
        raise VitpoolError(f"--limit must be at least 1; got {limit}")
    return [samples[(i * len(samples)) // limit] for i in range(limit)]


class ImageDataset:
    """A map-style dataset of (image tensor, label, path); an unreadable image yields None and is skipped."""

    def __init__(self, samples: list[tuple[Path, int]], transform) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert("RGB")), label, str(path)
        except (OSError, ValueError, SyntaxError) as error:
            return None, label, f"{path} ({' '.join(str(error).split())[:120]})"


def collate(batch):
    """Stack the readable images; report the unreadable ones by path."""
    import torch

    good = [item for item in batch if item[0] is not None]
    skipped = [item[2] for item in batch if item[0] is None]
    if not good:
        return None, None, skipped
    return torch.stack([item[0] for item in good]), torch.tensor([item[1] for item in good]), skipped


def data_config(model) -> dict:
    """timm's data config for `model` (interpolation, crop, mean, std) at the image size it was built for."""
    from vitpool.models import import_timm

    timm = import_timm()
    size = tuple(int(v) for v in model.patch_embed.img_size)
    return timm.data.resolve_data_config({"input_size": (3, *size)}, model=model)


def transform_for(model):
    """The evaluation transform from the model's timm data config (resize, crop, interpolation, mean, std)."""
    from vitpool.models import import_timm

    config = data_config(model)
    return import_timm().data.create_transform(**config), config


def loader(samples, model, batch_size: int, workers: int):
    import torch

    transform, _ = transform_for(model)
    return torch.utils.data.DataLoader(
        ImageDataset(samples, transform), batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate
    )
