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


def evaluate(
    model,
    data_dir,
    baseline=None,
    limit: int | None = None,
    batch_size: int = 32,
    workers: int = 2,
    on_batch: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Evaluate `model` on an image folder; with `baseline` (its unpooled original), compare the two image by image.

    `on_batch(done, total)` reports progress; unreadable images are skipped and listed in the result.
    """
    import torch

    folder = data.scan(data_dir, model.num_classes)
    samples = data.spread(folder.samples, limit)
    batches = data.loader(samples, baseline if baseline is not None else model, batch_size, workers)
    n = top1 = top5 = agree = 0
    baseline_top1 = 0
    kl_sum = 0.0
    skipped: list[str] = []
    model.eval()
    with torch.inference_mode():
        for images, labels, bad in batches:
            skipped += bad
            if images is not None:
                logits = model(images).float()
                top = logits.topk(5, dim=-1).indices
                top1 += int((top[:, 0] == labels).sum())
                top5 += int((top == labels.unsqueeze(1)).any(1).sum())
                n += len(labels)
                if baseline is not None:
                    reference = baseline(images).float()
                    baseline_top1 += int((reference.argmax(-1) == labels).sum())
                    agree += int((reference.argmax(-1) == top[:, 0]).sum())
                    log_p, log_q = reference.log_softmax(-1), logits.log_softmax(-1)
                    kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
            if on_batch:
                on_batch(n + len(skipped), len(samples))
    if n == 0:
        raise VitpoolError(f"none of the {len(samples)} images in {data_dir} could be read: {'; '.join(skipped[:3])}")
    result = EvalResult(n, 100.0 * top1 / n, 100.0 * top5 / n, mapping=folder.mapping, skipped=skipped)
    if baseline is not None:
        result.agreement = 100.0 * agree / n
        result.kl = kl_sum / n
        result.baseline_top1 = 100.0 * baseline_top1 / n
    return result
