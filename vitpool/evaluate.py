"""Top-1/top-5 accuracy and, for a converted model, agreement with and KL divergence from the unpooled one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vitpool import data
from vitpool.errors import VitpoolError


@dataclass
class EvalResult:
    n: int
    top1: float  # percent
    top5: float  # percent
    agreement: float | None = None  # percent of images whose top-1 equals the unpooled model's
    kl: float | None = None  # mean KL(unpooled || pooled) over images, nats
    baseline_top1: float | None = None
    mapping: str = "imagenet"
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "n": self.n,
            "top1": self.top1,
            "top5": self.top5,
            "agreement": self.agreement,
            "kl": self.kl,
            "baseline_top1": self.baseline_top1,
            "class_mapping": self.mapping,
            "skipped": self.skipped,
        }


@dataclass
class Tally:
    """Running counts over batches of logits; `result()` turns them into an EvalResult."""

    n: int = 0
    top1: int = 0
    top5: int = 0
    agree: int = 0
    baseline_top1: int = 0
    kl_sum: float = 0.0
    compared: bool = False

    def add(self, logits, labels, reference=None) -> None:
        """Count one batch: `logits` of the evaluated model, `reference` the unpooled model's on the same images."""
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # top-5 of a head with fewer classes is all of them
        self.top1 += int((top[:, 0] == labels).sum())
        self.top5 += int((top == labels.unsqueeze(1)).any(1).sum())
        self.n += len(labels)
        if reference is not None:
            reference = reference.float()
            self.compared = True
            self.baseline_top1 += int((reference.argmax(-1) == labels).sum())
            self.agree += int((reference.argmax(-1) == top[:, 0]).sum())
            log_p, log_q = reference.log_softmax(-1), logits.log_softmax(-1)
            self.kl_sum += float((log_p.exp() * (log_p - log_q)).sum())

    def result(self, mapping: str = "imagenet", skipped: list[str] | None = None) -> EvalResult:
        n = self.n
        result = EvalResult(n, 100.0 * self.top1 / n, 100.0 * self.top5 / n, mapping=mapping, skipped=skipped or [])
        if self.compared:
            result.agreement = 100.0 * self.agree / n
            result.kl = self.kl_sum / n
            result.baseline_top1 = 100.0 * self.baseline_top1 / n
        return result


def count(model, baseline, batches, device=None, on_batch: Callable[[int], None] | None = None) -> tuple[Tally, list[str]]:
    """Tally `model` (in eval mode) over loader batches, against `baseline` when given; unreadable images are listed."""
    import torch

    tally = Tally()
    skipped: list[str] = []
    model.eval()
    with torch.inference_mode():
        for images, labels, bad in batches:
            skipped += bad
            if images is not None:
                if device is not None:
                    images, labels = images.to(device), labels.to(device)
                tally.add(model(images), labels, baseline(images) if baseline is not None else None)
            if on_batch:
                on_batch(tally.n + len(skipped))
    return tally, skipped


def evaluate(
    model,
    data_dir,
    baseline=None,
    limit: int | None = None,
    batch_size: int = 32,
    workers: int = 2,
    on_batch: Callable[[int, int | None], None] | None = None,
    preprocess: data.Preprocess = data.Preprocess(),
) -> EvalResult:
    """Evaluate `model` on labelled images (`data_dir`: a data.Source, or the path of an image folder or .tar);
    with `baseline` (its unpooled original), compare the two image by image.

    `on_batch(done, total)` reports progress; unreadable images are skipped with a warning and listed in the result.
    """
    images = data.open_images(data_dir, model.num_classes)
    transform, _ = data.transform_for(baseline if baseline is not None else model, preprocess)
    total = images.size(limit)
    batches = images.batches(transform, batch_size, workers, limit)
    progress = (lambda done: on_batch(done, total)) if on_batch else None
    tally, skipped = count(model, baseline, batches, on_batch=progress)
    if tally.n == 0:
        raise data.nothing_read(images, skipped)
    return tally.result(images.mapping, skipped)


MAX_IMAGE_BYTES = 4 * 2**30  # the decoded images a sweep or a schedule search keeps in memory


@dataclass
class ImageSet:
    """Decoded, preprocessed images with labels, and the unpooled model's logits on them."""

    images: object  # Tensor [M, 3, H, W]
    labels: object  # Tensor [M]
    reference: object  # Tensor [M, classes]
    mapping: str
    skipped: list[str]

    def subset(self, index: list[int]) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.reference[index], self.mapping, [])


def load_images(model, data_dir, limit: int | None, batch_size: int = 50, workers: int = 2,
                on_batch: Callable[[int, int | None], None] | None = None, labelled: bool = True,
                preprocess: data.Preprocess = data.Preprocess()) -> ImageSet:
    """Read images once (`data_dir`: a data.Source, or the path of an image folder or .tar; timm's preprocessing
    for `model`) and run the unpooled `model` on them. Unlabelled (calibration) images may be any images, label 0."""
    import torch

    source = data.open_images(data_dir, model.num_classes, labelled)
    transform, config = data.transform_for(model, preprocess)
    total = source.size(limit)
    per_image = 4 * 3 * config["input_size"][1] * config["input_size"][2]
    if total is not None and total * per_image > MAX_IMAGE_BYTES:
        raise VitpoolError(f"{total} images would take {total * per_image / 2**30:.1f} GB in memory; "
                           f"pass --limit (e.g. --limit 1000) to sweep a spread-out subset")
    images, labels, reference, skipped = [], [], [], []
    model.eval()
    with torch.inference_mode():
        for batch, batch_labels, bad in source.batches(transform, batch_size, workers, limit):
            skipped += bad
            if batch is not None:
                images.append(batch)
                labels.append(batch_labels)
                reference.append(model(batch).float())
            if on_batch:
                on_batch(sum(len(b) for b in labels) + len(skipped), total)
    if not images:
        raise data.nothing_read(source, skipped)
    return ImageSet(torch.cat(images), torch.cat(labels), torch.cat(reference), source.mapping, skipped)


def score(model, images: ImageSet, batch_size: int = 50):
    """EvalResult of `model` on the images, compared with the unpooled logits."""
    import torch

    tally = Tally()
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(images.labels), batch_size):
            part = slice(start, start + batch_size)
            tally.add(model(images.images[part]), images.labels[part], images.reference[part])
    return tally.result(images.mapping)
