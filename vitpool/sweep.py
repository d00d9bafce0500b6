"""The accuracy-compute trade-off: every method at every MAC budget on the user's images, resumably.

Images are decoded once and held in memory, and the unpooled model's logits are computed once, so each
point costs one forward pass of the converted model. After every point `results.json` and `results.csv`
are rewritten atomically, so an interrupted sweep keeps what it finished and a rerun with the same
settings skips it; `tradeoff.png` is drawn at the end.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from vitpool import data
from vitpool.config import EVERY_BLOCK, LATE, PRESETS, PoolingConfig, make_config
from vitpool.errors import VitpoolError
from vitpool.evaluate import ImageSet, Tally, load_images, score
from vitpool.methods import CLUSTERING_METHODS, MEDOID_METHODS, METHODS
from vitpool.outputs import writable_parent, write_atomically

CSV_FIELDS = ("method", "budget", "schedule", "k", "layers", "gmacs", "mac_ratio", "top1", "top5", "agreement", "kl",
              "n", "seconds", "error")


def image_hash(images: ImageSet) -> str:
    """A fingerprint of the images as the model sees them, with their labels: a resumed sweep must read the same."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    digest.update(images.images.contiguous().numpy().tobytes())
    digest.update(images.labels.numpy().tobytes())
    return digest.hexdigest()


def sweep_settings(model_name: str, checkpoint, pretrained: bool, data_dir, limit: int | None, preset: str,
                   template: PoolingConfig, calibration: int | None, preprocess: data.Preprocess = data.Preprocess()) -> dict:
    """What a sweep's results depend on: a rerun with the same settings resumes it, other settings are refused.
    `template` holds the pooling setting every method shares (its method, K and layers are not used), and
    `preset` names the budget family. Data options at their defaults are left out, so older sweeps resume."""
    source = data.as_source(data_dir)
    return {"model": model_name, "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
            "pretrained": pretrained if checkpoint is None else False, "data": source.location(), **source.record(),
            **({"preprocess": preprocess.record()} if preprocess.record() else {}),
            "limit": limit, "preset": preset, "iters": template.iters, "output": template.output,
            "proportional": template.proportional, "position": template.position, "trim_last": template.trim_last,
            "spread": template.spread, "calibration": calibration}


def settings_data(settings: dict) -> tuple[data.Source, data.Preprocess]:
    """The images and preprocessing of a sweep's settings."""
    source = data.Source(settings["data"], settings.get("dataset", ""), settings.get("split", "validation"),
                         settings.get("class_map"))
    preprocess = {key: tuple(value) if isinstance(value, list) else value
                  for key, value in settings.get("preprocess", {}).items()}
    return source, data.Preprocess(**preprocess)


def settings_template(settings: dict) -> PoolingConfig:
    """The shared pooling setting of a sweep's settings."""
    return make_config(iters=settings["iters"], layers=(), output=settings["output"],
                       proportional=settings["proportional"], position=settings["position"], preset=settings["preset"],
                       trim_last=settings.get("trim_last", False), spread=settings.get("spread", 0))


def parse_methods(text: str | None) -> list[str]:
    if text is None:
        return list(METHODS)
    methods = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))  # each once, in order
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise VitpoolError(f"--methods takes a comma list of {', '.join(METHODS)}; got {text!r}")
    return methods


def parse_budgets(text: str) -> list[float]:
    try:
        budgets = list(dict.fromkeys(float(b) for b in text.split(",") if b.strip()))  # each once, in order
    except ValueError:
        budgets = []
    if not budgets or not all(0 < b <= 1 for b in budgets):
        raise VitpoolError(f"--budgets takes a comma list of fractions of the unpooled MACs in (0, 1], e.g. 0.5,0.6,0.75,0.9; got {text!r}")
    return budgets


class Results:
    """results.json of a sweep: the settings it was run with, the unpooled reference, and one row per point."""

    def __init__(self, out_dir: Path, settings: dict, force: bool) -> None:
        self.out_dir, self.settings = out_dir, settings
        self.path = out_dir / "results.json"
        self.reference: dict | None = None
        self.rows: list[dict] = []
        if self.path.exists() and not force:
            try:
                saved = json.loads(self.path.read_text())
                previous = saved["settings"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise VitpoolError(f"{self.path} is not a vitpool sweep ({error}); choose another --out or pass --force") from None
            if previous != settings:
                changed = sorted(key for key in set(previous) | set(settings) if previous.get(key) != settings.get(key))
                raise VitpoolError(f"{out_dir} holds a sweep with other settings ({', '.join(changed)} differ); "
                                   f"choose another --out, or pass --force to start it again")
            self.reference, self.rows = saved.get("reference"), saved.get("points", [])
        elif out_dir.exists() and not out_dir.is_dir():
            raise VitpoolError(f"--out {out_dir} is a file; give a directory")

    def done(self, method: str, budget: float, schedule: str) -> bool:
        return any(r["method"] == method and r["budget"] == budget and r["schedule"] == schedule for r in self.rows)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.save()

    def save(self) -> None:
        writable_parent(self.path)
        document = {"settings": self.settings, "reference": self.reference, "points": self.rows}
        write_atomically(self.path, json.dumps(document, indent=2) + "\n")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        rows = ([{**self.reference, "method": "unpooled", "budget": 1.0, "schedule": ""}] if self.reference else []) + self.rows
        for row in rows:
            writer.writerow({**row, "k": " ".join(map(str, row.get("k") or [])), "layers": " ".join(map(str, row.get("layers") or []))})
        write_atomically(self.out_dir / "results.csv", buffer.getvalue())


def metrics_row(result) -> dict:
    return {"top1": result.top1, "top5": result.top5, "agreement": result.agreement, "kl": result.kl, "n": result.n}


def run_point(model, method: str, budget: float, images: ImageSet, template: PoolingConfig, baseline_macs: int,
              schedule: str = "family", calibration: ImageSet | None = None, family: str = LATE) -> dict:
    """One row of the sweep: the `family` schedule for `budget` (or the one `vitpool schedule` finds on the
    calibration images) of `method` with `template`'s setting, converted, its MACs counted and scored on
    `images`. The template's output concerns the K-Medoids methods; the others have one kind of output.
    The "every-block" schedule is ToMe as published (the tome preset), whatever the template."""
    from vitpool.adapter import apply_pooling
    from vitpool.budget import solve
    from vitpool.schedule import search

    started = time.perf_counter()
    row = {"method": method, "budget": budget, "schedule": schedule}
    template = replace(template, method=method, output=template.output if method in MEDOID_METHODS else "medoid",
                       spread=template.spread if method in CLUSTERING_METHODS else 0)
    if schedule == EVERY_BLOCK:
        template, family = PRESETS["tome"].template, EVERY_BLOCK
    try:
        if schedule == "searched":
            found = search(model, calibration, template, budget)
            config, reached = found.config, found.macs
            row["search"] = {"evaluations": found.evaluations, "calibration_kl": found.best.kl,
                             "family_k": list(found.start.k), "family_calibration_kl": found.start.kl}
        else:
            config, reached, _ = solve(model, template, budget, family=family)
    except VitpoolError as error:
        return {**row, "error": str(error)}
    result = score(apply_pooling(model, config), images)
    return {**row, "k": list(config.k), "layers": list(config.layers), "gmacs": reached / 1e9,
            "mac_ratio": reached / baseline_macs, **metrics_row(result), "seconds": round(time.perf_counter() - started, 1)}


def plot(results: Results, path: Path) -> None:
    """Top-1 and agreement against GMACs, one line per method, the unpooled model as a star (like the paper's Fig. 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, reference = results.settings, results.reference
    figure, axes = plt.subplots(1, 2, figsize=(12, 5), dpi=100)
    panels = (("top1", "top-1 accuracy (%)"), ("agreement", "top-1 agreement with the unpooled model (%)"))
    methods = list(dict.fromkeys(r["method"] for r in results.rows))
    colours = plt.get_cmap("tab10")
    for axis, (key, label) in zip(axes, panels):
        for i, method in enumerate(methods):
            for schedule, style in (("family", "-"), ("searched", "--"), ("every-block", ":")):
                points = sorted((r["gmacs"], r[key]) for r in results.rows
                                if r["method"] == method and r["schedule"] == schedule and "error" not in r)
                if points:
                    xs, ys = zip(*points)
                    name = method if schedule == "family" else f"{method} ({schedule})"
                    axis.plot(xs, ys, style, marker="o", markersize=4, color=colours(i % 10), label=name)
        if reference is not None:
            value = reference["top1"] if key == "top1" else 100.0
            axis.plot([reference["gmacs"]], [value], marker="*", markersize=14, color="black", linestyle="none", label="unpooled")
        axis.set_xlabel("GMACs per image (multiply-accumulates, pooling included)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    n = reference["n"] if reference else 0
    figure.suptitle(f"{settings['model']} on {settings.get('dataset') or Path(settings['data']).name} ({n} images), no fine-tuning")
    figure.tight_layout(rect=(0, 0, 0.82, 1))  # the legend goes in the right-hand strip
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    write_atomically(path, buffer.getvalue())


def split(images: ImageSet, calibration: int) -> tuple[ImageSet, ImageSet]:
    """(calibration images spread over the set, the rest): searched schedules are scored on images they never saw."""
    n = len(images.labels)
    if not 0 < calibration < n:
        raise VitpoolError(f"--search {calibration} must leave images to evaluate on: the data gives {n}; lower --search or raise --limit")
    chosen = sorted({(i * n) // calibration for i in range(calibration)})
    rest = [i for i in range(n) if i not in set(chosen)]
    return images.subset(chosen), images.subset(rest)


def sweep(model, settings: dict, out_dir: Path, methods: list[str], budgets: list[float], force: bool = False, workers: int = 2,
          on_progress: Callable[[str, int, int], None] | None = None, calibration: int | None = None) -> Results:
    """Run every (method, budget, schedule) point not already in `out_dir/results.json`; returns all results.

    Schedules are the preset's budget family (`vitpool.budget`), and for `tome` also ToMe as published: the
    same number of tokens merged after the attention of every block ("every-block").

    With `calibration` N, also the searched schedule of every point, searched on N of the images; then
    every point, family ones included, is scored on the other images only.
    """
    from vitpool.flops import total_macs

    results = Results(out_dir, settings, force)
    schedules = ("family", "searched") if calibration else ("family",)
    points = [(m, b, s) for s in schedules for m in methods for b in budgets]
    points += [("tome", b, EVERY_BLOCK) for b in budgets if "tome" in methods]  # ToMe as published
    todo = [point for point in points if not results.done(*point)]
    total = len(points)
    progress = on_progress or (lambda text, done, total: None)
    progress("reading images", total - len(todo), total)
    baseline_macs = total_macs(model)
    if todo or results.reference is None:
        source, preprocess = settings_data(settings)
        images = load_images(model, source, settings["limit"], workers=workers, preprocess=preprocess)
        fingerprint = image_hash(images)
        if results.reference is not None and results.reference.get("image_hash", fingerprint) != fingerprint:
            raise VitpoolError(f"the images of {source} are not the ones {out_dir} was swept on (files were added, removed "
                               f"or changed); pass --force to start the sweep again, or another --out")
        calibration_images = None
        if calibration:
            calibration_images, images = split(images, calibration)
        if results.reference is None:
            tally = Tally()
            tally.add(images.reference, images.labels)
            results.reference = {"gmacs": baseline_macs / 1e9, "mac_ratio": 1.0, **metrics_row(tally.result()),
                                 "skipped": images.skipped, "image_hash": fingerprint}
            results.save()
        for done, (method, budget, schedule) in enumerate(todo, start=total - len(todo)):
            progress(f"{method} at {budget:g}" + (" (searching)" if schedule == "searched" else ""), done, total)
            results.add(run_point(model, method, budget, images, settings_template(settings), baseline_macs, schedule,
                                  calibration_images, PRESETS[settings["preset"]].family))
    progress("drawing", total, total)
    results.save()
    plot(results, out_dir / "tradeoff.png")
    return results
