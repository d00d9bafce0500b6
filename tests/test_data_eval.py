"""Image folders, class mapping and evaluation, on the real DeiT-Tiny and ImageNet photos where present."""

from __future__ import annotations

import csv

import pytest
import torch
from PIL import Image

import vitpool
from vitpool import data
from vitpool.errors import VitpoolError
from vitpool.evaluate import evaluate


def test_wordnet_folders_map_to_imagenet_indices(imagenet_sample):
    images = data.open_images(imagenet_sample, num_classes=1000)
    assert images.mapping == "imagenet" and len(images.samples) == 500
    with open(imagenet_sample / "labels.csv") as f:
        expected = {row["filename"]: int(row["class_index"]) for row in csv.DictReader(f)}
    assert {images.dataset.filename(index, basename=True): label for index, label in images.samples} == expected


def _write_image(path, mode="RGB", size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=128 if mode == "L" else (200, 10, 10)).save(path)


def _read_all(images, transform):
    batches = list(images.batches(transform, batch_size=8, workers=0))
    labels = [label for _, labels, _ in batches if labels is not None for label in labels.tolist()]
    return batches, labels, [name for _, _, names in batches for name in names]


def test_other_folders_map_in_sorted_order_and_grayscale_is_converted(tmp_path):
    _write_image(tmp_path / "zebra" / "a.png", mode="L")
    _write_image(tmp_path / "ant" / "b.jpg")
    _write_image(tmp_path / "ant" / "c.JPEG")
    (tmp_path / "empty").mkdir()
    images = data.open_images(tmp_path, num_classes=10)
    assert images.mapping == "sorted"
    assert sorted((images.dataset.filename(i), label) for i, label in images.samples) == [
        ("ant/b.jpg", 0), ("ant/c.JPEG", 0), ("zebra/a.png", 1)]
    batches, _, _ = _read_all(images, lambda image: torch.tensor(image.size + (len(image.getbands()),)))
    assert all(int(bands) == 3 for batch, _, _ in batches for bands in batch[:, 2])


def test_a_class_is_the_folder_an_image_is_in_as_timm_names_it(tmp_path):
    _write_image(tmp_path / "ant" / "nested" / "c.png")
    _write_image(tmp_path / "bee" / "d.png")
    images = data.open_images(tmp_path, num_classes=10)
    assert sorted((images.dataset.filename(i), label) for i, label in images.samples) == [("ant/nested/c.png", 1), ("bee/d.png", 0)]


def test_unreadable_images_are_skipped_and_named(tmp_path):
    _write_image(tmp_path / "a" / "good.png")
    (tmp_path / "a" / "bad.jpg").write_bytes(b"not a jpeg")
    _, labels, skipped = _read_all(data.open_images(tmp_path, num_classes=10), lambda image: torch.zeros(3, 2, 2))
    assert labels == [0]
    assert len(skipped) == 1 and "bad.jpg" in skipped[0]


def test_folder_problems_are_reported(tmp_path):
    with pytest.raises(VitpoolError, match="nothing is there"):
        data.open_images(tmp_path / "missing", num_classes=10)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("x")
    with pytest.raises(VitpoolError, match="no images found"):
        data.open_images(tmp_path, num_classes=10)
    for name in "abc":
        _write_image(tmp_path / name / "x.png")
    with pytest.raises(VitpoolError, match="3 class folders but the model predicts 2"):
        data.open_images(tmp_path, num_classes=2)


def test_limit_spreads_over_the_folder():
    assert data.spread(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert data.spread(list(range(3)), 5) == [0, 1, 2]


def test_preprocessing_comes_from_the_pretrained_config(real_deit_tiny):
    _, config = data.transform_for(real_deit_tiny)
    assert config["input_size"] == (3, 224, 224) and config["interpolation"] == "bicubic"
    pretrained = real_deit_tiny.pretrained_cfg
    assert config["crop_pct"] == pretrained["crop_pct"] and config["mean"] == pretrained["mean"]
    assert config["std"] == pretrained["std"]


def test_real_deit_tiny_scores_on_real_photos(real_deit_tiny, imagenet_sample):
    result = evaluate(real_deit_tiny, imagenet_sample, limit=100, batch_size=50)
    assert result.n == 100 and result.agreement is None
    # The DeiT-Tiny in ../shared/data scores about 79% top-1 on the 500 photos; chance is 0.1%.
    assert result.top1 > 65 and result.top5 > result.top1


def test_agreement_is_total_when_pooling_keeps_every_token(real_deit_tiny, imagenet_sample):
    identity = vitpool.convert(real_deit_tiny, k=[196], layers=[3])
    result = evaluate(identity, imagenet_sample, baseline=real_deit_tiny, limit=40, batch_size=20)
    assert result.agreement == 100.0 and result.kl < 1e-6
    assert result.top1 == result.baseline_top1


def test_pooling_costs_some_agreement(real_deit_tiny, imagenet_sample):
    pooled = vitpool.convert(real_deit_tiny, k=[96, 48], layers=[2, 5])
    result = evaluate(pooled, imagenet_sample, baseline=real_deit_tiny, limit=60, batch_size=30)
    assert 40 < result.agreement < 100 and result.kl > 0.01
