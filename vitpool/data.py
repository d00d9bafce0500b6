"""Images through timm's data pipeline, named as timm's validate.py names them: `timm.data.create_dataset`
reads image folders, .tar files of class folders, WebDataset shards (`wds/NAME`) and Hugging Face datasets
(`hfds/NAME`); `resolve_data_config` and `create_transform` give the preprocessing, with its overrides.

What timm leaves to its caller is done here: folders named by ImageNet WordNet id keep their ImageNet-1k
indices (timm numbers folders in sorted order, which misreads a subset such as Imagenette), hidden and
`__MACOSX` folders are left out, and an image that cannot be decoded is skipped with a warning naming it
(timm's dataset would hand over the next image in its place). Warnings go to the `vitpool.data` logger;
the command line prints each as one `warning:` line.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from vitpool.errors import VitpoolError
from vitpool.models import import_timm

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")  # in folders; tar: timm's
PACKAGES = {"": None, "wds": "webdataset", "hfds": "datasets"}  # the kinds of --dataset read here, and what each needs
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos")
SHOWN = 3  # folders named in a warning
WDS_HINT = ("; wds/ reads the shard list of --split from ROOT/_info.json, or give --split as a shard pattern such as "
            "'imagenet-val-{000000..000049}.tar'")


@dataclass(frozen=True)
class Source:
    """Where images come from: `root` (--data), `dataset` ('' for an image folder or a .tar, by what `root` is;
    `wds/NAME`, `hfds/NAME`), `split` (a split subfolder of a folder if there is one, the shards of wds/, the
    split of hfds/) and `class_map` (a timm class-map file: .txt, one class name per line, or .pkl)."""

    root: str | None
    dataset: str = ""
    split: str = "validation"
    class_map: str | None = None

    @property
    def kind(self) -> str:
        prefix, slash, _ = self.dataset.partition("/")
        return prefix.lower() if slash else ""

    def __str__(self) -> str:
        if not self.kind:
            return str(self.root)
        return f"{self.dataset} split {self.split}" + (f" in {self.root}" if self.root else "")

    def location(self) -> str | None:
        """The root as an absolute path (a URL as given), for records."""
        if self.root is None or "://" in self.root:
            return self.root
        return str(Path(self.root).resolve())

    def record(self, default_split: str = "validation") -> dict:
        """The options that differ from their defaults, for settings that a rerun must match."""
        record = {"dataset": self.dataset or None, "class_map": self.class_map,
                  "split": self.split if self.split != default_split else None}
        return {key: value for key, value in record.items() if value is not None}


def as_source(data: Source | str | Path, split: str = "validation") -> Source:
    """A Source for a path (an image folder or a .tar), or the Source itself."""
    return data if isinstance(data, Source) else Source(str(data), split=split)


@dataclass(frozen=True)
class Preprocess:
    """Overrides of the model's preprocessing, as timm's validate.py names them; None keeps the model's."""

    img_size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def record(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in asdict(self).items() if value is not None}

    def check(self) -> None:
        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise VitpoolError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}; got {self.interpolation!r}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise VitpoolError(f"--crop-pct is the share of the resized image the centre crop keeps, in (0, 1]; got {self.crop_pct}")
        if self.img_size is not None and self.img_size < 1:
            raise VitpoolError(f"--img-size must be positive; got {self.img_size}")
        for flag, values in (("--mean", self.mean), ("--std", self.std)):
            if values is not None and len(values) not in (1, 3):
                raise VitpoolError(f"{flag} takes one value or one per RGB channel, e.g. {flag} 0.5 0.5 0.5; got {len(values)}")
        if self.std is not None and min(self.std) <= 0:
            raise VitpoolError(f"--std must be positive; got {' '.join(map(str, self.std))}")


def data_config(model, preprocess: Preprocess = Preprocess()) -> dict:
    """timm's data config for `model` (size, interpolation, crop, mean, std) with `preprocess`'s overrides, at
    the image size the model was built for unless --img-size names another one the model takes."""
    preprocess.check()
    built = tuple(int(v) for v in model.patch_embed.img_size)
    size = (preprocess.img_size,) * 2 if preprocess.img_size else built
    if size != built and not getattr(model, "dynamic_img_size", False):
        raise VitpoolError(f"--img-size {preprocess.img_size}: the model was built for {built[0]}x{built[1]} inputs and "
                           f"its position embedding is fixed; leave --img-size out or use a model made with dynamic_img_size")
    overrides = {"input_size": (3, *size), "crop_pct": preprocess.crop_pct, "interpolation": preprocess.interpolation,
                 "mean": preprocess.mean, "std": preprocess.std}
    return import_timm().data.resolve_data_config(overrides, model=model)


def transform_for(model, preprocess: Preprocess = Preprocess()):
    """timm's evaluation transform (resize, centre crop, normalize) for `model`, and the data config it follows."""
    config = data_config(model, preprocess)
    return import_timm().data.create_transform(**config), config


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order, as timm ships them."""
    import_timm()
    from timm.data import ImageNetInfo

    return list(ImageNetInfo("imagenet-1k").label_names())


def spread(samples: list, limit: int | None) -> list:
    """`limit` samples spread evenly over the list (datasets are sorted by class, so the first N would be few classes)."""
    if limit is None or limit >= len(samples):
        return samples
    if limit < 1:
        raise VitpoolError(f"--limit must be at least 1; got {limit}")
    return [samples[(i * len(samples)) // limit] for i in range(limit)]


def hidden(name: str) -> bool:
    """Whether a path inside a dataset lies in (or is) a hidden or macOS resource-fork entry."""
    return any(part.startswith(".") and part not in (".", "..") or part == "__MACOSX" for part in Path(name).parts)


def check_source(source: Source) -> None:
    """One line for a dataset this cannot read: its kind, its package, its root, its class map."""
    kind = source.kind
    if kind not in PACKAGES:
        raise VitpoolError(f"--dataset {source.dataset}: vitpool reads image folders and .tar files (no --dataset), "
                           f"wds/NAME (WebDataset shards) and hfds/NAME (Hugging Face datasets); not {kind}/")
    package = PACKAGES[kind]
    if package and importlib.util.find_spec(package) is None:
        raise VitpoolError(f"--dataset {kind}/ needs the {package} package: pip install {package} (make install adds it)")
    if source.class_map is not None:
        if kind == "wds":
            raise VitpoolError("--class-map names classes, which wds/ shards do not carry (their .cls files are class "
                               "indices); use it with image folders, .tar files or hfds/")
        if not Path(source.class_map).is_file() or Path(source.class_map).suffix.lower() not in (".txt", ".pkl"):
            raise VitpoolError(f"--class-map {source.class_map}: expected a .txt file (one class name per line, in index "
                               f"order) or a .pkl of {{name: index}}")
    if source.root is None:
        if kind != "hfds":
            raise VitpoolError("give --data ROOT: the image folder, the .tar, or the folder holding the wds/ shards")
        return
    root = Path(source.root)
    if kind == "" and not root.is_dir() and not (root.is_file() and root.suffix == ".tar"):
        raise VitpoolError(f"--data {root}: expected an image folder ROOT/<class>/<image> or a .tar of class folders"
                           + ("" if root.exists() else " (nothing is there)"))
    if kind == "wds" and "://" not in source.root and not root.is_dir():
        raise VitpoolError(f"--data {root}: expected the folder holding the wds/ shards (and their _info.json)")


def report_unreadable_folders(root: Path) -> None:
    """Warn about each folder under `root` that cannot be listed: timm's walk passes over it in silence."""

    def warn(error: OSError) -> None:
        log.warning("cannot read folder %s (%s); its images are left out", error.filename, error.strerror or error)

    for _, subfolders, _ in os.walk(root, onerror=warn, followlinks=True):
        subfolders[:] = [name for name in subfolders if not hidden(name)]


def class_indices(names: set[str], num_classes: int, source: Source, where: str) -> tuple[dict[str, int], str]:
    """Class folder name -> the model's class index, and the mapping's name: the --class-map file's,
    ImageNet-1k's for WordNet ids, or else timm's sorted order (with a warning when ImageNet's was on offer)."""
    from timm.data.readers.class_map import load_class_map
    from timm.utils import natural_key

    shown = lambda some: ", ".join(name or f"(images directly in {where})" for name in sorted(some)[:SHOWN]) + (  # noqa: E731
        ", ..." if len(some) > SHOWN else "")
    if source.class_map is not None:
        try:
            classes = load_class_map(source.class_map)
        except Exception as error:  # timm raises assorted types for a damaged file
            raise VitpoolError(f"--class-map {source.class_map} could not be read: {error}") from None
        if not all(isinstance(index, int) and 0 <= index < num_classes for index in classes.values()):
            raise VitpoolError(f"--class-map {source.class_map} holds indices outside the model's {num_classes} classes")
        unmapped = names - set(classes)
        if unmapped:
            log.warning("%d class folder(s) of %s are not in --class-map and are left out: %s", len(unmapped), where, shown(unmapped))
        return classes, "class-map"
    if num_classes == 1000:
        wnids = {wnid: index for index, wnid in enumerate(imagenet_wnids())}
        others = names - set(wnids)
        if not others:
            return {name: wnids[name] for name in names}, "imagenet"
        log.warning("class folders of %s are not all ImageNet WordNet ids (%s), so labels follow their sorted order, "
                    "not ImageNet-1k's; rename them or pass --class-map", where, shown(others))
    if len(names) > num_classes:
        raise VitpoolError(f"{where} has {len(names)} class folders but the model predicts {num_classes} classes; "
                           f"name folders by ImageNet WordNet id (n01440764), pass --class-map, or use a model with a matching head")
    return {name: index for index, name in enumerate(sorted(names, key=natural_key))}, "sorted"


def file_samples(dataset, source: Source, num_classes: int, labelled: bool) -> tuple[list[tuple[int, int]], str]:
    """(timm index, class index) of an image folder's or a tar's images outside hidden folders; the class is
    the image's folder, as timm's readers name it."""
    root = Path(dataset.reader.root)  # a split subfolder timm found, or --data itself
    if root.is_dir():
        report_unreadable_folders(root)
    visible = [(index, name) for index, name in enumerate(dataset.filenames()) if not hidden(name)]
    if not visible:
        where = root if root.is_dir() else f"{root} (timm reads {', '.join(import_timm().data.get_img_extensions())} from a .tar)"
        raise VitpoolError(f"no images found in {where}: expected ROOT/<class>/<image> with extensions {', '.join(IMAGE_EXTENSIONS)}")
    if not labelled:
        return [(index, 0) for index, _ in visible], "unlabelled"
    folders = {index: os.path.basename(os.path.dirname(name)) for index, name in visible}
    classes, mapping = class_indices(set(folders.values()), num_classes, source, str(root))
    samples = [(index, classes[folders[index]]) for index, _ in visible if folders[index] in classes]
    if not samples:
        raise VitpoolError(f"none of the class folders of {root} is in --class-map {source.class_map}")
    return samples, mapping


def hfds_samples(dataset, source: Source, num_classes: int, labelled: bool) -> tuple[list[tuple[int, int]], str]:
    """(index, class index) of a Hugging Face dataset's rows: its own label indices, ImageNet-1k's where its
    class names are WordNet ids (as `datasets`' imagefolder names a folder of WordNet-id folders)."""
    if not labelled:
        return [(index, 0) for index in range(len(dataset))], "unlabelled"
    reader = dataset.reader
    labels = list(reader.iter_targets())
    names = {index: name for name, index in reader.class_to_idx.items()}
    mapping = "class-map" if source.class_map else "dataset"
    if not source.class_map and names and num_classes == 1000:
        wnids = {wnid: index for index, wnid in enumerate(imagenet_wnids())}
        if all(name in wnids for name in names.values()):
            labels, mapping = [wnids[names[label]] if label in names else label for label in labels], "imagenet"
    if labels and not all(isinstance(label, int) and 0 <= label < num_classes for label in labels):
        raise VitpoolError(f"the labels of {source} are not all class indices of the model's {num_classes} classes "
                           f"(they run from {min(labels)} to {max(labels)}); choose a labelled --split or pass --class-map")
    return list(enumerate(labels)), mapping


@dataclass
class Images:
    """A timm dataset opened for reading: the samples to read with their class indices, or None for a stream
    (wds/ shards), whose labels are the shards' own."""

    dataset: object  # timm's ImageDataset, or IterableImageDataset for a stream
    source: Source
    mapping: str  # "imagenet", "sorted", "class-map", "dataset" (the dataset's own indices) or "unlabelled"
    samples: list[tuple[int, int]] | None

    def size(self, limit: int | None = None) -> int | None:
        """How many images a read with `limit` gives (a stream's count is known only from its _info.json)."""
        total = len(self.samples) if self.samples is not None else len(self.dataset) or None
        return total if limit is None else min(limit, total or limit)

    def name(self, index: int) -> str:
        """The sample as a user finds it: its file, its member of the .tar, or its row of the dataset."""
        if self.source.kind == "hfds":
            return f"{self.source.dataset} split {self.source.split}, row {index}"
        name = self.dataset.filename(index)
        return os.path.join(self.dataset.reader.root, name) if Path(self.dataset.reader.root).is_dir() else f"{self.dataset.reader.root}:{name}"

    def decoded(self, transform, limit: int | None = None, rank: int = 0, world_size: int = 1) -> Decoded:
        """The samples (`limit` of them spread evenly, this process's share) as a map-style dataset."""
        if self.samples is None:
            raise VitpoolError(f"{self.source} is read as a stream; here an image folder, a .tar or hfds/ is needed")
        return Decoded(self, spread(self.samples, limit)[rank::world_size], transform)

    def batches(self, transform, batch_size: int, workers: int, limit: int | None = None, rank: int = 0,
                world_size: int = 1) -> Iterator:
        """(images, labels, skipped names) batches in the dataset's order; `limit` images spread evenly over it
        (a stream's first `limit`); this process's share under torchrun (timm's reader shares a stream itself)."""
        import torch

        if self.samples is None:
            self.dataset.transform = transform
            self.dataset.set_loader_cfg(num_workers=workers)
            dataset = self.dataset
        else:
            dataset = self.decoded(transform, limit, rank, world_size)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                             collate_fn=collate)
        return reading(loader, limit if self.samples is None else None)


class Decoded:
    """Map-style dataset over chosen (timm index, class index) samples: (tensor, class, "") for each image,
    (None, class, "name (error)") for one that cannot be decoded, so that it is skipped rather than replaced."""

    def __init__(self, images: Images, samples: list[tuple[int, int]], transform) -> None:
        self.images, self.samples, self.transform = images, samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, position: int):
        from PIL import Image

        index, label = self.samples[position]
        try:
            with self.images.dataset.reader[index][0] as file, Image.open(file) as image:
                return self.transform(image.convert("RGB")), label, ""
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            return None, label, f"{self.images.name(index)} ({' '.join(str(error).split())[:120]})"


def collate(batch):
    """Stack the readable images; name the unreadable ones."""
    import torch

    good = [item for item in batch if item[0] is not None]
    skipped = [item[2] for item in batch if item[0] is None]
    if not good:
        return None, None, skipped
    return torch.stack([item[0] for item in good]), torch.tensor([item[1] for item in good]), skipped


def reading(batches: Iterable, limit: int | None = None) -> Iterator:
    """The batches, with a warning for each unreadable image as its batch arrives; at most `limit` images."""
    seen = 0
    for images, labels, skipped in batches:
        for name in skipped:
            log.warning("skipped unreadable image %s", name)
        if limit is not None and images is not None:
            images, labels = images[: limit - seen], labels[: limit - seen]
            seen += len(images)
        yield images, labels, skipped
        if limit is not None and seen >= limit:
            return


def nothing_read(images: Images, skipped: list[str]) -> VitpoolError:
    """The error for a read that gave no image at all."""
    why = f": {'; '.join(skipped[:3])}" if skipped else (" (timm's warnings above say why)" if images.samples is None else "")
    return VitpoolError(f"no image of {images.source} could be read{why}")


def open_images(data: Source | str | Path, num_classes: int = 1000, labelled: bool = True) -> Images:
    """Open `data` (a Source, or the path of an image folder or .tar) through `timm.data.create_dataset`.
    Labelled images need a class per image; unlabelled ones (calibration, distillation) are any images."""
    source = as_source(data)
    check_source(source)
    timm = import_timm()
    options = {}
    if source.kind == "" and Path(source.root).is_dir():
        options["input_key"] = ";".join(IMAGE_EXTENSIONS)  # the extensions timm's folder reader looks for
    if source.kind == "hfds":
        options["class_map"] = source.class_map  # timm renumbers hfds labels by class name
    wds_log = logging.getLogger("timm.data.readers.reader_wds")
    level = wds_log.level
    wds_log.setLevel(logging.ERROR)  # a missing _info.json is normal with a shard pattern; fatal otherwise, said below
    try:
        dataset = timm.data.create_dataset(source.dataset, root=source.root, split=source.split, **options)
    except Exception as error:  # the readers fail with many types (tar, network, datasets, missing split)
        if source.kind == "" and isinstance(error, (RuntimeError, ValueError)):  # timm's ways of saying "no images"
            raise VitpoolError(f"no images found in {source.root}: expected ROOT/<class>/<image> with extensions "
                               f"{', '.join(IMAGE_EXTENSIONS)} (in a .tar: timm's {', '.join(timm.data.get_img_extensions())})") from None
        text = " ".join(str(error).split())[:300] or type(error).__name__
        raise VitpoolError(f"cannot read {source}: {text}" + (WDS_HINT if source.kind == "wds" else "")) from None
    finally:
        wds_log.setLevel(level)
    if source.kind == "wds":
        return Images(dataset, source, "dataset" if labelled else "unlabelled", None)
    samples, mapping = (hfds_samples if source.kind == "hfds" else file_samples)(dataset, source, num_classes, labelled)
    return Images(dataset, source, mapping, samples)
