"""`--data` through timm's data pipeline: a .tar, WebDataset shards and a local Hugging Face dataset give the
image folder's predictions; WordNet-id labels survive every format; unreadable images, decompression bombs,
hidden and unreadable folders and a fallback to sorted labels are warnings; bad input is one `error:` line;
timm validate.py's preprocessing options change the transform.

A few real photos from ../shared/data (copied into tmp_path only) and the real DeiT-Tiny, in process
(conftest.run_in_process, --workers 0), so each command costs about a second.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
import torch
from conftest import noise_folder, run_in_process
from PIL import Image

from vitpool import data
from vitpool.errors import VitpoolError

PHOTOS = 8  # from 8 classes spread over ImageNet-1k


def vitpool(*args) -> tuple[int, str, list[str]]:
    """(exit code, stdout, stderr lines) of the command line, run in this process."""
    result = run_in_process(args)
    assert result.rc in (0, 2) and "Traceback" not in result.stderr, str(result)
    return result.rc, result.stdout, result.lines()


@pytest.fixture(scope="module")
def photos(imagenet_sample, tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """An image folder <wnid>/<photo> of 8 real photos, and each photo's ImageNet-1k index."""
    with open(imagenet_sample / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    chosen = rows[:: len(rows) // PHOTOS][:PHOTOS]
    folder = tmp_path_factory.mktemp("photos") / "folder"
    for row in chosen:
        (folder / row["wnid"]).mkdir(parents=True)
        shutil.copy(imagenet_sample / row["wnid"] / row["filename"], folder / row["wnid"] / row["filename"])
    return folder, {row["filename"]: int(row["class_index"]) for row in chosen}


@pytest.fixture(scope="module")
def formats(photos) -> dict[str, list[str]]:
    """The same photos as a .tar (with a macOS resource fork to ignore), a WebDataset shard with its
    _info.json, and a local Hugging Face dataset (parquet, class names = the 8 WordNet ids in sorted order)."""
    folder, labels = photos
    root = folder.parent
    files = sorted(folder.rglob("*.JPEG"))
    with tarfile.open(root / "photos.tar", "w") as tar:
        for path in files:
            tar.add(path, arcname=f"{path.parent.name}/{path.name}")
        junk = root / "junk"
        junk.write_bytes(b"\x00\x05\x16\x07 AppleDouble, not a JPEG")
        tar.add(junk, arcname=f"__MACOSX/{files[0].parent.name}/._{files[0].name}")
    (root / "wds").mkdir()
    with tarfile.open(root / "wds" / "sample-val-000000.tar", "w") as tar:
        for i, path in enumerate(files):
            tar.add(path, arcname=f"{i:06d}.jpg")
            (root / "cls").write_text(str(labels[path.name]))
            tar.add(root / "cls", arcname=f"{i:06d}.cls")
    info = {"name": "sample", "splits": {"validation": {"name": "validation", "num_samples": len(files),
                                                         "filenames": ["sample-val-000000.tar"], "shard_lengths": [len(files)]}}}
    (root / "wds" / "_info.json").write_text(json.dumps(info))
    found = {"tar": ["--data", root / "photos.tar"], "wds": ["--data", root / "wds", "--dataset", "wds/sample"]}
    try:
        import datasets
    except ImportError:
        return found
    wnids = sorted(path.parent.name for path in files)
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": path.read_bytes(), "path": path.name} for path in files],
         "label": [wnids.index(path.parent.name) for path in files]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=wnids)}))
    (root / "hf" / "data").mkdir(parents=True)
    table.to_parquet(str(root / "hf" / "data" / "validation-00000-of-00001.parquet"))
    found["hfds"] = ["--data", root / "hf-cache", "--dataset", f"hfds/{root / 'hf'}"]
    return found


def evaluated(weights, *args) -> dict:
    code, stdout, stderr = vitpool("eval", "deit_tiny", "--checkpoint", weights, "--batch-size", "3", "--workers", "0",
                                   "--json", *args)
    assert code == 0, stderr
    assert not [line for line in stderr if line.startswith("warning:")], stderr
    return json.loads(stdout)


@pytest.mark.parametrize("kind", ["tar", "wds", "hfds"])
def test_tar_wds_and_hfds_score_as_the_folder_does(kind, photos, formats, deit_tiny_weights):
    if kind not in formats:
        pytest.skip(f"{kind} needs the datasets package (make install adds it)")
    folder = evaluated(deit_tiny_weights, "--data", photos[0])
    assert folder["n"] == PHOTOS and folder["class_mapping"] == "imagenet"
    assert folder["top1"] >= 50, "the real DeiT-Tiny gets most of these photos; far less means wrong labels"
    other = evaluated(deit_tiny_weights, *formats[kind])
    assert {key: other[key] for key in ("n", "top1", "top5")} == {key: folder[key] for key in ("n", "top1", "top5")}
    assert other["class_mapping"] == {"tar": "imagenet", "wds": "dataset", "hfds": "imagenet"}[kind]


def predictions(model, source) -> list[tuple[int, int]]:
    """(label, predicted class) of every image, sorted: the same multiset means the same predictions."""
    images = data.open_images(source, model.num_classes)
    transform, _ = data.transform_for(model)
    pairs = []
    with torch.inference_mode():
        for batch, labels, skipped in images.batches(transform, batch_size=4, workers=0):
            assert not skipped
            pairs += zip(labels.tolist(), model(batch).argmax(-1).tolist())
    return sorted(pairs)


def test_every_format_gives_each_photo_its_imagenet_label_and_prediction(photos, formats, real_deit_tiny):
    folder, labels = photos
    expected = predictions(real_deit_tiny, folder)
    assert sorted(label for label, _ in expected) == sorted(labels.values())
    for kind, args in formats.items():
        options = dict(zip(args[::2], args[1::2]))
        source = data.Source(str(options["--data"]), options.get("--dataset", ""))
        assert predictions(real_deit_tiny, source) == expected, kind


def bomb_png(path: Path, side: int = 20000) -> None:
    """A valid 1-bit PNG of side x side pixels (400 M for 20000): over PIL's decompression-bomb limit, 50 kB on disk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = zlib.compress(bytes(side * (1 + side // 8)), 9)  # each row: filter byte 0, then side/8 bytes of black
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def test_bad_images_and_folders_are_warnings_not_crashes(tmp_path, caplog, monkeypatch):
    (tmp_path / "images").mkdir()
    root = noise_folder(tmp_path / "images", ("n01440764", "n01443537", "n01484850"), 2, (40, 40), seed=4)
    bomb_png(root / "n01440764" / "bomb.png")
    (root / "n01443537" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG" + bytes(64))
    for junk in (root / "__MACOSX" / "n01440764" / "._0.png", root / ".cache" / "n01440764" / "x.png"):
        junk.parent.mkdir(parents=True)
        junk.write_bytes(b"AppleDouble or cache, not an image")
    locked, scandir = root / "n01484850", os.scandir

    def denied(path="."):  # a folder without read permission (chmod 0 would not stop root)
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    with caplog.at_level(logging.WARNING, logger="vitpool"):
        images = data.open_images(root)
        batches = list(images.batches(lambda image: torch.zeros(3, 2, 2), batch_size=3, workers=0))
    warnings = [record.getMessage() for record in caplog.records]
    assert images.mapping == "imagenet"
    assert sorted(label for _, labels, _ in batches if labels is not None for label in labels.tolist()) == [0, 0, 1, 1]
    skipped = [name for _, _, names in batches for name in names]
    assert len(skipped) == 2 and "bomb.png" in skipped[0] and "decompression bomb" in skipped[0].lower()
    assert "broken.jpg" in skipped[1]
    assert sum("skipped unreadable image" in w for w in warnings) == 2
    assert [w for w in warnings if "cannot read folder" in w and "n01484850" in w and "Permission denied" in w], warnings
    assert not any("__MACOSX" in w or ".cache" in w for w in warnings), warnings


def test_the_command_line_prints_one_warning_line_per_problem(tmp_path):
    (tmp_path / "images").mkdir()
    root = noise_folder(tmp_path / "images", ("n01440764", "cats", "dogs"), 1, (40, 40), seed=5)
    bomb_png(root / "n01440764" / "bomb.png")
    code, stdout, stderr = vitpool("eval", "deit_tiny", "--no-pretrained", "--data", root, "--workers", "0", "--json")
    assert code == 0 and json.loads(stdout)["n"] == 3 and json.loads(stdout)["class_mapping"] == "sorted"
    assert len(stderr) == 2 and all(line.startswith("warning:") for line in stderr), stderr
    fallback, bomb = stderr
    assert "not all ImageNet WordNet ids" in fallback and "cats, dogs" in fallback and "sorted order" in fallback
    assert "bomb.png" in bomb
    assert not any("Traceback" in line for line in stderr)


def test_class_map_file_sets_the_indices(tmp_path, caplog):
    (tmp_path / "images").mkdir()
    root = noise_folder(tmp_path / "images", ("cat", "dog", "fox"), 1, (40, 40), seed=6)
    (tmp_path / "classes.txt").write_text("dog\ncat\n")
    with caplog.at_level(logging.WARNING, logger="vitpool"):
        images = data.open_images(data.Source(str(root), class_map=str(tmp_path / "classes.txt")), num_classes=10)
    assert images.mapping == "class-map"
    assert sorted(images.dataset.filename(index) for index, _ in images.samples) == ["cat/0.png", "dog/0.png"]
    assert {images.dataset.filename(index): label for index, label in images.samples} == {"cat/0.png": 1, "dog/0.png": 0}
    assert any("not in --class-map" in record.getMessage() and "fox" in record.getMessage() for record in caplog.records)


def test_preprocessing_options_change_the_transform(real_deit_tiny):
    import timm

    default, config = data.transform_for(real_deit_tiny)
    cropped, cropped_config = data.transform_for(real_deit_tiny, data.Preprocess(crop_pct=1.0, interpolation="bilinear",
                                                                                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    assert config["crop_pct"] == real_deit_tiny.pretrained_cfg["crop_pct"] == 0.9 and cropped_config["crop_pct"] == 1.0
    assert cropped_config["interpolation"] == "bilinear" and cropped_config["mean"] == (0.5, 0.5, 0.5)
    assert default.transforms[0].size == 248 and cropped.transforms[0].size == 224  # resize to 224 / crop_pct
    picture = Image.new("RGB", (300, 240), (255, 0, 0))
    assert not torch.equal(default(picture), cropped(picture))

    dynamic = timm.create_model("deit_tiny_patch16_224", pretrained=False, dynamic_img_size=True)
    small, small_config = data.transform_for(dynamic, data.Preprocess(img_size=160))
    assert small_config["input_size"] == (3, 160, 160) and small(picture).shape == (3, 160, 160)
    with pytest.raises(VitpoolError, match="--img-size 160: the model was built for 224x224"):
        data.transform_for(real_deit_tiny, data.Preprocess(img_size=160))


@pytest.fixture(scope="module")
def some_images(tmp_path_factory) -> Path:
    return noise_folder(tmp_path_factory.mktemp("bad_input"), ("n01440764",), 1, (40, 40), seed=7)


@pytest.mark.parametrize("args, expected", [
    (["--dataset", "torch/cifar10"], ["not torch/", "wds/NAME", "hfds/NAME"]),
    (["--dataset", "wds/sample"], ["cannot read wds/sample", "_info.json"]),
    (["--dataset", "hfds/{root}/no-such-dataset"], ["cannot read hfds/"]),
    (["--dataset", "wds/sample", "--class-map", "{root}/classes.txt"], ["--class-map", ".cls"]),
    (["--class-map", "{root}/missing.txt"], ["--class-map", "missing.txt", ".txt file"]),
    (["--data", "{root}/photos.zip"], ["photos.zip", "image folder", ".tar"]),
    (["--data", "{root}/nowhere"], ["nowhere", "nothing is there"]),
    (["--data", "{root}/empty"], ["no images found", "empty"]),
    (["--data", None], ["give --data ROOT"]),
    (["--interpolation", "cubic"], ["--interpolation", "bicubic"]),
    (["--crop-pct", "1.5"], ["--crop-pct", "(0, 1]"]),
    (["--img-size", "256"], ["--img-size 256", "224x224"]),
])
def test_bad_data_input_is_one_line_and_exit_code_2(args, expected, some_images, tmp_path):
    (tmp_path / "photos.zip").write_bytes(b"PK")
    (tmp_path / "empty" / "n01440764").mkdir(parents=True)
    (tmp_path / "classes.txt").write_text("n01440764\n")
    (tmp_path / "wds").mkdir()
    args = [a.format(root=tmp_path) if isinstance(a, str) else a for a in args]
    if "--data" not in args:
        args = ["--data", tmp_path / "wds" if "wds/sample" in args else some_images, *args]
    args = [a for pair in zip(args[::2], args[1::2]) if pair[1] is not None for a in pair]
    code, stdout, stderr = vitpool("eval", "deit_tiny", "--no-pretrained", "--workers", "0", *args)
    assert code == 2 and stdout == ""
    assert len(stderr) == 1 and stderr[0].startswith("error:"), stderr
    for text in expected:
        assert text in stderr[0], stderr[0]


def test_a_missing_package_is_named(some_images, monkeypatch):
    monkeypatch.setitem(data.PACKAGES, "wds", "no_such_webdataset_package")
    code, _, stderr = vitpool("eval", "deit_tiny", "--no-pretrained", "--data", some_images, "--dataset", "wds/x")
    assert code == 2 and len(stderr) == 1 and "pip install no_such_webdataset_package" in stderr[0]
